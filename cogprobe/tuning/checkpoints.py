"""Checkpoints: written by `train`, read back from any supported source.

A cogprobe run keeps `checkpoints/step-N/` folders, each written into a
temporary folder and renamed (so a folder under its final name is complete):
  - step 0 is the base model itself and holds only `meta.json`;
  - full / layers runs: `trainable.safetensors` with exactly the tensors the
    strategy trains (frozen ones are the base's, bit for bit);
  - LoRA runs: peft's own adapter folder (`adapter_config.json` +
    `adapter_model.safetensors`), so `PeftModel.from_pretrained` reads it;
  - `meta.json`: step, train loss, tokens seen, base fingerprint, and the SHA-256
    of every other file in the folder (written last, in the same atomic step,
    so no crash leaves a checkpoint without its checksums);
  - `resume/` (latest checkpoint only): optimizer state, see `resume`.

Reading a run checks every checkpoint first (`problems`): a missing, truncated or
changed file fails in one line before any work starts, so no table gets rows
from the good checkpoints and then stops at the bad one.

`Checkpoints.open` lists and loads, in step order, a cogprobe run, an HF Trainer
output folder (`checkpoint-N/` with `trainer_state.json`; full models or peft
adapters) or a list of HF model folders. The base is read once and cloned in
memory for every checkpoint that is stored as a difference from it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogprobe.core import hub
from cogprobe.core import io
from cogprobe.tuning import resume
from cogprobe.core.artifacts import damaged
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import MANIFEST
from cogprobe.models.loading import (EMBEDDED, embedded_dir, has_tokenizer, load_config, load_model,
                                     load_tokenizer, model_fingerprint, model_folder, model_source)
from cogprobe.models.layersets import resolve, to_string
from cogprobe.models.params import aliases, load_tensors
from cogprobe.models.weights import FolderWeights, LoraWeights, OverlayWeights

CHECKPOINTS = "checkpoints"
META = "meta.json"
TENSORS = "trainable.safetensors"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
HF_DIR = re.compile(r"^checkpoint-(\d+)$")


def step_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step}"


def write_checkpoint(run: Path, step: int, model, kind: str, meta: dict,
                     tensors: dict[str, torch.Tensor] | None = None,
                     resume_state: resume.State | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `step-N/` atomically: kind "base" (meta only), "tensors" or "lora" (peft folder; from
    `state_dict` when given, as gathered under FSDP); with `resume_state`, its `resume/` too."""
    with io.atomic_dir(step_dir(run, step)) as tmp:
        if kind == "tensors":
            save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        elif kind == "lora":
            model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
            (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card stub
        if resume_state is not None:
            resume.write(tmp, resume_state)
        sha = {p.relative_to(tmp).as_posix(): io.file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        io.write_json(tmp / META, dict(meta, kind=kind, sha256=sha))
    return step_dir(run, step)


WEIGHTS = {"base": set(), "tensors": {TENSORS}, "lora": {ADAPTER, ADAPTER_CONFIG}}  # kind -> its weight files
KIND_OF = {"full": "tensors", "layers": "tensors", "lora": "lora", "lora-layers": "lora"}  # a strategy's checkpoints


def expected_files(kind: str, recorded: dict, path: Path) -> list[str]:
    """The files a complete checkpoint of `kind` holds: its weights, and whatever meta.json recorded
    (the resume state only while it is there: it is dropped from older checkpoints on purpose)."""
    names = WEIGHTS.get(kind, set()) | set(recorded)
    if resume.present(path):
        return sorted(names | set(resume.FILES))
    return sorted(n for n in names if not n.startswith(resume.DIR + "/"))


def problems(path: Path, meta: dict) -> list[tuple[Path, str]]:
    """(file, what is wrong) for each damaged file of checkpoint folder `path`; empty when it is whole.

    The record must agree with the folder, not only the files with the record: a `kind` that does not
    fit the step and the files would make a reader take the base for a trained checkpoint (or the
    reverse), and a weight file without a recorded hash could change unseen."""
    recorded = meta.get("sha256") or {}
    found = _record_problems(path, meta)
    for name in expected_files(meta.get("kind"), recorded, path):
        problem = io.file_problem(path / name, recorded.get(name))
        if problem is None and name not in recorded and (path / name).is_file():
            problem = "has no SHA-256 in meta.json, so a change to its bytes would go unseen"
        if problem:
            found.append((path / name, problem))
    return found


def _record_problems(path: Path, meta: dict) -> list[tuple[Path, str]]:
    """What meta.json says that its folder contradicts: the step, and the kind against step, files and
    strategy (base: step 0 only, no weight file; lora: an adapter; tensors: trainable.safetensors)."""
    found, kind, record = [], meta.get("kind"), path / META
    step = STEP_DIR.match(path.name)
    if step and meta.get("step") != int(step.group(1)):
        found.append((record, f"is the record of step {meta.get('step')}, not of {path.name}"))
    if kind not in WEIGHTS:
        return found + [(record, f"names kind {kind!r}, which is none of {', '.join(WEIGHTS)}")]
    others = sorted(n for k, names in WEIGHTS.items() if k != kind for n in names - WEIGHTS[kind]
                    if (path / n).exists())
    if others:
        found.append((record, f"says kind {kind!r} but the folder holds {', '.join(others)}"))
    if step and (kind == "base") != (int(step.group(1)) == 0):
        found.append((record, f"says kind {kind!r} at {path.name}: only step 0 is the base model"))
    strategy = meta.get("strategy")
    if kind != "base" and strategy in KIND_OF and kind != KIND_OF[strategy]:
        found.append((record, f"says kind {kind!r} for a {strategy!r} run"))
    return found


def layer_problems(run: Path, manifest: dict) -> list[tuple[Path, str]]:
    """Where the manifest's layer set disagrees with itself, with its config, or with the blocks the
    checkpoints of a layered run store: the manifest is what a study copies into its tables, so a
    set that is not what was trained must not be read as if it were."""
    layers, n = manifest.get("layers"), manifest.get("base", {}).get("n_layers")
    path, found = Path(run) / MANIFEST, []
    if manifest.get("layers_string") != (to_string(layers) if layers else None):
        found.append((path, f"gives the layer set as {manifest.get('layers_string')!r} and as {layers!r}"))
    wanted, kind = manifest.get("config", {}).get("layers"), KIND_OF.get(manifest.get("strategy"))
    if layers is None or kind is None:  # every block trains: nothing to disagree with
        return found
    spelled = wanted is not None and not (str(wanted).endswith(".json") or Path(str(wanted)).is_file())
    with contextlib.suppress(CogprobeError):  # a selection file may have changed since: the stored blocks tell
        if n is not None and spelled and resolve(wanted, n) != list(layers):
            found.append((path, f"lists blocks {to_string(layers)}, its config asked for {wanted!r}"))
    for step, folder in step_folders(run):
        weights = folder / (ADAPTER if kind == "lora" else TENSORS)
        stored = stored_blocks(weights) if step and weights.is_file() else None
        if stored is not None and stored != set(layers):
            found.append((path, f"lists blocks {to_string(layers)}, but {weights} stores blocks "
                                f"{to_string(sorted(stored))}"))
            break
    return found


def stored_blocks(path: Path) -> set[int] | None:
    """The block indices of the tensors in a weight file (the first number in each name, as in
    `model.layers.3.mlp.up_proj.weight`), read from its header; None when it cannot be read."""
    from safetensors import SafetensorError
    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError):  # a damaged file: `problems` reports it
        return None
    return {int(m.group(1)) for name in names if (m := re.search(r"\.(\d+)\.", name))}


def check(path: Path, meta: dict) -> None:
    """Fail in one line on the first damaged file of checkpoint folder `path`."""
    for file, problem in problems(path, meta):
        raise damaged(file, problem)


def own_steps(run: Path) -> list[tuple[int, Path]]:
    """Complete `step-N` folders (meta.json present), in step order; `.tmp-*` leftovers ignored."""
    return [(step, p) for step, p in step_folders(run) if (p / META).is_file()]


def step_folders(run: Path) -> list[tuple[int, Path]]:
    """Every `step-N` folder, in step order. Unlike `own_steps`, one without meta.json is not skipped:
    a folder under its final name was written whole, so a missing meta.json is damage, not a leftover."""
    folder = Path(run) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))] if folder.is_dir() else []
    return sorted(found)


# ------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Entry:
    step: int
    path: Path | None   # None: the base model itself
    kind: str           # base | tensors | lora | model (a full HF folder) | adapter (a peft folder)
    meta: dict = field(default_factory=dict)


class Checkpoints:
    """Checkpoints in step order, each loadable as a full model.

    `load(step)` returns a fresh `(model, tokenizer)`: the caller may change the
    model. The tokenizer is shared between loads.
    """

    def __init__(self, entries: list[Entry], base_spec: str | Path, *, source: str,
                 base_fingerprint: str | None = None):
        if not entries:
            raise CogprobeError(f"no complete checkpoints in {source}; train with save steps, or "
                                "check the folder")
        self.entries = {e.step: e for e in sorted(entries, key=lambda e: e.step)}
        self.base_spec = base_spec
        self.source = source
        self._fingerprint = base_fingerprint
        self._base = None
        self._changed: dict[int, set[str]] = {}
        self.device = torch.device("cpu")  # where loaded models go (set before the first load)
        self.dtype = torch.float32         # and in which precision (`to`)
        self._weights: FolderWeights | None = None
        self.tokenizer: Path | None = None  # for folders saved without one (default: the base's)

    # ---- opening
    @classmethod
    def open(cls, source: str | Path | Sequence[str | Path], base: str | Path | None = None,
             tokenizer: str | Path | None = None) -> "Checkpoints":
        """A cogprobe run folder, an HF Trainer output folder, a list of HF model folders, or hub
        revisions `org/name@step1000,step2000`. `tokenizer`: a folder whose tokenizer serves the
        model folders that have none (default: the base's)."""
        ckpts = cls._open(source, base)
        ckpts.tokenizer = Path(tokenizer) if tokenizer else None
        return ckpts

    @classmethod
    def of_model(cls, spec: str | Path) -> "Checkpoints":
        """One model (the embedded alias, an HF folder, a .gguf file or a hub id) as its own reference,
        with no checkpoint after it: how a verb that scores one model reads it, whole or block by block."""
        return cls([Entry(0, None, "base")], spec, source=str(spec))

    @classmethod
    def _open(cls, source, base) -> "Checkpoints":
        if isinstance(source, (list, tuple)):
            return cls._from_list([Path(p) for p in source], base)
        if (revs := hub.revisions(str(source))) is not None:  # org/name@step1000,step2000: steps of one model
            return cls._with_base([_hf_entry(step, p) for step, p in revs], base, str(source))
        path = Path(source)
        if not path.is_dir():
            raise CogprobeError(f"no checkpoints at {path}: give a cogprobe run folder, an HF Trainer "
                                "output folder (checkpoint-N/) or a list of model folders")
        if (path / MANIFEST).is_file():
            return cls._from_run(path, base)
        if any(HF_DIR.match(p.name) for p in path.iterdir()):
            return cls._from_trainer(path, base)
        if (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
            return cls._from_list([path], base)
        raise CogprobeError(f"{path} is neither a cogprobe run (manifest.json), an HF Trainer folder "
                            "(checkpoint-N/) nor a model folder (config.json)")

    @classmethod
    def _from_run(cls, run: Path, base) -> "Checkpoints":
        manifest = io.read_json(run / MANIFEST)
        info = manifest["base"]
        fingerprint = info["fingerprint"]
        entries = []
        for step, path in step_folders(run):
            meta = io.read_json(path / META)
            check(path, meta)
            if meta.get("base_fingerprint") != fingerprint:
                raise CogprobeError(f"{path} was trained from a different base model (fingerprint "
                                    f"{str(meta.get('base_fingerprint'))[:12]}, the run's is {fingerprint[:12]}); "
                                    "remove it or open its own run folder")
            entries.append(Entry(step, None if meta["kind"] == "base" else path, meta["kind"], meta))
        for file, problem in layer_problems(run, manifest):
            raise damaged(file, problem)
        if base is not None:
            _check_fingerprint(Path(base), fingerprint, run)
        spec = base or (info["spec"] if info["spec"] == EMBEDDED else info["path"])
        return cls(entries, spec, source=str(run), base_fingerprint=fingerprint)

    @classmethod
    def _from_trainer(cls, folder: Path, base) -> "Checkpoints":
        entries = []
        for p in sorted(folder.iterdir()):
            m = HF_DIR.match(p.name)
            if m and p.is_dir() and (p / "trainer_state.json").is_file():  # written last by Trainer
                entries.append(_hf_entry(int(m.group(1)), p))
        return cls._with_base(entries, base, str(folder))

    @classmethod
    def _from_list(cls, folders: list[Path], base) -> "Checkpoints":
        """Steps are the list order; with `base`, the base is step 0 and the folders 1..n."""
        offset = 0 if base is None else 1
        entries = [_hf_entry(i + offset, p) for i, p in enumerate(folders)]
        return cls._with_base(entries, base, ", ".join(map(str, folders)))

    @classmethod
    def _with_base(cls, entries: list[Entry], base, source: str) -> "Checkpoints":
        if not entries:
            raise CogprobeError(f"no complete checkpoints in {source} (an HF Trainer checkpoint needs "
                                "trainer_state.json)")
        entries = sorted(entries, key=lambda e: e.step)
        kinds = {e.kind for e in entries}
        if len(kinds) > 1:
            raise CogprobeError(f"{source} mixes full model folders and peft adapters; open them separately")
        if base is None and kinds == {"adapter"}:
            base = _adapter_base(entries)
        if base is None:  # full models without a base: the first is the reference
            first = entries[0]
            entries[0] = Entry(first.step, None, "base", first.meta)
            return cls(entries, first.path, source=source)
        if entries[0].step != 0:
            entries = [Entry(0, None, "base")] + entries
        return cls(entries, base, source=source)

    # ---- listing
    @property
    def steps(self) -> list[int]:
        return list(self.entries)

    @property
    def reference_step(self) -> int:
        return self.steps[0]

    @property
    def base_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(_resolved(self.base_spec))
        return self._fingerprint

    def path(self, step: int) -> Path | None:
        return self._entry(step).path

    def meta(self, step: int) -> dict:
        return self._entry(step).meta

    def weights_sha256(self, step: int) -> str:
        """One SHA-256 of the step's weight files, from the hashes its meta.json records (verified when
        the checkpoint is opened); "" for a step without weight files of cogprobe's (the base model, an
        HF folder). A record scored from these weights can tell whether the weights on disk are still
        the ones it was scored from: a run trained again on another machine is a sibling, not a copy."""
        meta = self.meta(step)
        names = sorted(WEIGHTS.get(meta.get("kind"), set()) & set(meta.get("sha256") or {}))
        if not names:
            return ""
        return hashlib.sha256("".join(f"{n}:{meta['sha256'][n]};" for n in names).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.entries)

    def _entry(self, step: int) -> Entry:
        if step not in self.entries:
            raise CogprobeError(f"no checkpoint at step {step} in {self.source}; steps: {self.steps}")
        return self.entries[step]

    # ---- loading
    def reference(self):
        """The reference model (the base every checkpoint is compared against: step 0 of a cogprobe
        run, or --base) and its tokenizer, read once; do not modify them."""
        if self._base is None:
            own = not self.tokenizer or has_tokenizer(_resolved(self.base_spec))
            model, tok = load_model(self.base_spec, tokenizer=None if own else self.tokenizer, dtype=self.dtype)
            model.to(self.device)
            if self._fingerprint is not None:
                _check_fingerprint(model_source(model), self._fingerprint, self.source)
            self._base = (model, tok)
        return self._base

    @property
    def reference_loaded(self) -> bool:
        """Whether the reference model is in memory already (`reference`)."""
        return self._base is not None

    def to(self, device, dtype: torch.dtype | None = None) -> "Checkpoints":
        """Load models onto `device` (and in `dtype`) from now on; the base read so far moves too."""
        self.device = torch.device(device)
        self.dtype = dtype or self.dtype
        if self._base is not None:
            self._base[0].to(self.device, self.dtype)
        return self

    @contextlib.contextmanager
    def precision(self, dtype: torch.dtype):
        """Load models in `dtype` inside the block, at the precision before it after (a study's
        checkpoints go on from its sweep to capture at their own)."""
        before = self.dtype
        self.to(self.device, dtype)
        try:
            yield self
        finally:
            self.to(self.device, before)

    # ---- reading lazily, tensor by tensor (the streamed engine)
    def reference_folder(self) -> Path:
        """The reference's model folder, checked as loading it would check it (`model_folder`) and against
        the run's base fingerprint."""
        path = model_folder(self.base_spec)
        if path.is_file():
            raise CogprobeError(f"the reference {path} is a single file, which the streamed engine cannot read "
                                "block by block; convert it once to a folder (cogprobe prepare does for the "
                                "embedded model) or use --engine memory")
        if self._fingerprint is not None and self._weights is None:
            _check_fingerprint(path, self._fingerprint, self.source)
        return path

    def reference_weights(self, rename=None) -> FolderWeights:
        """The reference's tensors, read when asked for; `rename`: see `FolderWeights`."""
        if self._weights is None or self._weights.rename != rename:
            self._weights = FolderWeights(self.reference_folder(), rename=rename)
        return self._weights

    def weights(self, step: int, rename=None):
        """The tensors of `step`, read from their files when asked for, without loading a model."""
        entry = self._entry(step)
        if entry.kind == "model":
            return FolderWeights(entry.path, rename=rename)
        reference = self.reference_weights(rename)
        if entry.kind == "tensors":
            return OverlayWeights(reference, entry.path / TENSORS)
        if entry.kind in ("lora", "adapter"):
            return LoraWeights(reference, entry.path)
        return reference

    def reference_config(self):
        """The reference's transformers config, from its config.json alone."""
        return load_config(self.reference_folder())

    def reference_tokenizer(self):
        """The reference's tokenizer, without loading its weights (unless they are loaded already)."""
        if self._base is not None or _resolved(self.base_spec).is_file():   # a GGUF file: loaded whole
            return self.reference()[1]
        folder = self.reference_folder()
        return load_tokenizer(folder if has_tokenizer(folder) or not self.tokenizer else self.tokenizer)

    def load(self, step: int):
        """A full model for `step`: base + saved tensors (LoRA merged into a fresh copy)."""
        entry = self._entry(step)
        if entry.kind == "model":
            model, tok = load_model(entry.path, tokenizer=self._tokenizer_for(entry.path), dtype=self.dtype)
            return model.to(self.device), tok
        base, tok = self.reference()
        model = copy.deepcopy(base)
        if entry.kind == "tensors":
            load_tensors(model, io.read_tensors(entry.path / TENSORS), str(entry.path))
        elif entry.kind in ("lora", "adapter"):
            model = _merge_adapter(model, entry.path)
        return model.eval(), tok

    def _tokenizer_for(self, folder: Path):
        """None when the folder has its own tokenizer; else the base's (HF Trainer saves checkpoints
        without one unless given a processing_class), checked against the folder's vocabulary."""
        if has_tokenizer(folder):
            return None
        if self.tokenizer is not None:
            return self.tokenizer  # load_model checks that it fits the model's vocabulary
        if _resolved(self.base_spec) == Path(folder):
            raise CogprobeError(f"{folder} has no tokenizer files and no base model was given; pass --base "
                                "(base=) the model the checkpoints were trained from")
        base, tok = self.reference()
        config = io.read_json(Path(folder) / "config.json")
        rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
        base_rows = base.get_input_embeddings().num_embeddings
        if rows is not None and rows != base_rows:
            raise CogprobeError(f"{folder} has no tokenizer files and a vocabulary of {rows} tokens, the base "
                                f"{self.base_spec} has {base_rows}: its tokenizer is not the base's; save the "
                                "tokenizer into each checkpoint (Trainer(processing_class=tokenizer))")
        return tok

    def changed_tensors(self, step: int) -> set[str]:
        """Names of base parameters (tied aliases included) that differ from the base at `step`."""
        if step not in self._changed:
            self._changed[step] = self._compute_changed(self._entry(step))
        return set(self._changed[step])

    def _compute_changed(self, entry: Entry) -> set[str]:
        if entry.kind == "base":
            return set()
        base = self.reference()[0]
        names = aliases(base)
        if entry.kind in ("lora", "adapter"):
            return {a for n in _adapted_names(entry.path) if n in names for a in names[n]}
        params = dict(base.named_parameters(remove_duplicate=False))
        if entry.kind == "tensors":
            new = io.read_tensors(entry.path / TENSORS)
        else:
            new = dict(self.load(entry.step)[0].named_parameters(remove_duplicate=False))
        return {a for n, t in new.items() if n in params and not torch.equal(t.to(params[n]), params[n])
                for a in names[n]}


def _resolved(spec) -> Path:
    if hub.is_hub_id(spec):
        return hub.resolve(str(spec))
    return embedded_dir() if str(spec) == EMBEDDED else Path(spec)


def _check_fingerprint(path: Path, expected: str, where) -> None:
    found = model_fingerprint(_resolved(path))
    if found != expected:
        raise CogprobeError(f"base model {path} (fingerprint {found[:12]}) is not the base of {where} "
                            f"({expected[:12]}); pass the base model the run was trained from")


def _hf_entry(step: int, path: Path) -> Entry:
    if (path / ADAPTER_CONFIG).is_file():
        return Entry(step, path, "adapter", io.read_json(path / ADAPTER_CONFIG))
    if (path / "config.json").is_file():
        return Entry(step, path, "model")
    raise CogprobeError(f"{path} is neither a model folder (config.json) nor a peft adapter "
                        "(adapter_config.json)")


def _adapter_base(entries: list[Entry]) -> Path:
    bases = {e.meta.get("base_model_name_or_path") for e in entries}
    if len(bases) != 1 or not (base := bases.pop()) or not Path(base).exists():
        raise CogprobeError(f"the adapters name base model(s) {sorted(map(str, bases))} that are not "
                            "one local folder; pass base= the folder of the base model")
    return Path(base)


def _merge_adapter(model, path: Path):
    import warnings
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def _adapted_names(path: Path) -> set[str]:
    """Base parameter names a peft adapter changes: `<module>.weight` per LoRA module,
    plus any tensor it replaces whole (modules_to_save)."""
    names = set()
    with safe_open(str(path / ADAPTER), "pt") as f:
        for key in f.keys():
            key = key.removeprefix("base_model.model.")
            module, lora, _ = key.partition(".lora_")
            names.add(f"{module}.weight" if lora else key)
    return names
