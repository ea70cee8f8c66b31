"""cogprobe: where does a language model learn to perceive and produce a new language?

The public names below are imported on first use (PEP 562 `__getattr__`), so that
`import cogprobe` stays fast and loads neither torch nor transformers. Importing
cogprobe leaves the process environment alone: models and corpora are read with
`local_files_only`, and the Makefile (not this module) sets HF_HUB_OFFLINE.
"""
from __future__ import annotations

import importlib
import sys
import types

from cogprobe.errors import CogprobeError

__version__ = "0.1.0"

# public name -> the module that defines it (one dict: the whole public face)
_LAZY = {
    "load_model": "cogprobe.models",
    "load_corpus": "cogprobe.corpora",
    "split_corpus": "cogprobe.corpora",
    "train": "cogprobe.train",
    "TrainConfig": "cogprobe.trainconfig",
    "sweep_run": "cogprobe.probe",
    "capture_run": "cogprobe.probe",
    "select_run": "cogprobe.probe",
    "rank": "cogprobe.rank",
    "rank_run": "cogprobe.rank",
    "specialization_curves": "cogprobe.sweep_plots",
    "specialization_heatmaps": "cogprobe.sweep_plots",
    "logit_lens_heatmap": "cogprobe.plots",
    "plot_run": "cogprobe.plots",
    "apply_layer_set": "cogprobe.export",
    "export_layer_set": "cogprobe.export",
    "export_merged": "cogprobe.export",
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


class _PublicFace(types.ModuleType):
    """The first import of submodule `cogprobe.train` would set the package attribute `train` to
    that module; the public `cogprobe.train` is the function, so that assignment is skipped
    (the module stays importable as `cogprobe.train` through sys.modules)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicFace
