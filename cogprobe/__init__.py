"""cogprobe: where does a language model learn to perceive and produce a new language?

The public names below are imported on first use (PEP 562 `__getattr__`), so that
`import cogprobe` stays fast and loads neither torch nor transformers. Importing
cogprobe leaves the process environment alone: models and corpora are read with
`local_files_only`, and the Makefile (not this module) sets HF_HUB_OFFLINE.
"""
from __future__ import annotations

import importlib

from cogprobe.core.errors import CogprobeError

__version__ = "0.1.0"

# public name -> the module that defines it (one dict: the whole public face). Each verb has an
# in-memory form (objects in, a table or a Selection out) and, where it writes, a folder form (`*_run`,
# what the command line calls); both take the verb's options dataclass or its fields as keywords.
_LAZY = {
    # nouns
    "Checkpoints": "cogprobe.tuning.checkpoints",
    "EvalSet": "cogprobe.data.evalset",
    "Selection": "cogprobe.selection.rules",
    "TrainConfig": "cogprobe.tuning.config",
    "StudyConfig": "cogprobe.study.config",
    "build_config": "cogprobe.study.config",
    "SweepOptions": "cogprobe.probe.options",
    "CaptureOptions": "cogprobe.probe.options",
    "SelectOptions": "cogprobe.selection.options",
    "RankOptions": "cogprobe.selection.options",
    "ExportOptions": "cogprobe.exports",
    "EvalOptions": "cogprobe.probe.evaluate",
    # verbs, in the order of the chain
    "prepare": "cogprobe.models.loading",
    "load_model": "cogprobe.models.loading",
    "load_corpus": "cogprobe.data.corpora",
    "split_corpus": "cogprobe.data.corpora",
    "evaluate": "cogprobe.probe.evaluate",
    "prose_nll": "cogprobe.data.prose",
    "train": "cogprobe.tuning.loop",
    "ablate": "cogprobe.verbs",
    "sweep": "cogprobe.verbs",
    "sweep_run": "cogprobe.probe.folders",
    "capture": "cogprobe.verbs",
    "capture_run": "cogprobe.probe.folders",
    "rank": "cogprobe.selection.rankings",
    "rank_run": "cogprobe.selection.rankings",
    "select": "cogprobe.verbs",
    "select_run": "cogprobe.selection.folders",
    "compare": "cogprobe.verbs",
    "run": "cogprobe.study.pipeline",
    "verify": "cogprobe.checks",
    "apply_layer_set": "cogprobe.exports",
    "export_layer_set": "cogprobe.exports",
    "export_merged": "cogprobe.exports",
    # figures (matplotlib Figures, drawn from the tables)
    "specialization_curves": "cogprobe.plots.sweeps",
    "specialization_heatmaps": "cogprobe.plots.sweeps",
    "logit_lens_heatmap": "cogprobe.plots.runs",
    "plot_run": "cogprobe.study.figures",
}

__all__ = ["CogprobeError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cogprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
