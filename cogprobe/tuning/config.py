"""`TrainConfig`: every knob of `cogprobe train`, validated where it is made.

Fields mirror the CLI flags one to one (`--batch-size` is `batch_size`). The
config is stored whole in the run's manifest.json; `from_dict` reads it back
and drops keys it does not know (with a warning), so old runs stay readable.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import knob
from cogprobe.data.corpora import SPLIT_FRACTION
from cogprobe.models.layersets import resolve
from cogprobe.tuning.strategies import LAYERED, LORA, STRATEGIES
from cogprobe.tuning.text import LOSS_ON, MAX_SENTENCE_TOKENS

SCHEDULES = ("cosine", "linear", "constant")
ON_DIVERGENCE = ("warn", "stop")  # what a diverging loss does: see cogprobe/tuning/health.py
# Fields that change how a run executes but not what it computes.
EXECUTION_ONLY = ("out", "resume", "overwrite", "threads", "progress", "report_to", "on_divergence", "resume_every",
                  "gradient_checkpointing", "loss_chunk_tokens")
# Keys renamed since runs were first recorded (old -> new), so that one word means one thing in a run
# and in a study: `eval_pairs` counted a run's dev-curve pairs but a study's test pairs, and
# `max_sentence_tokens` bounded training pairs here but evaluated ones everywhere else. The manifests
# and tables of older runs read through `current`.
RENAMED = {"eval_pairs": "dev_pairs", "eval_max_sentence_tokens": "dev_max_sentence_tokens",
           "eval_sample_seed": "dev_sample_seed", "max_sentence_tokens": "train_max_sentence_tokens"}


@dataclass
class TrainConfig:
    model: str | Path = knob(help='"smollm2-135m", an HF model folder or a .gguf file')
    corpus: str | Path = knob(help="elotl name (axolotl, tsunkua, kolo) or a CSV/TSV/JSONL path")
    out: str | Path = knob(help="the run folder")
    strategy: str = knob(help="full | layers | lora | lora-layers")
    layers: str | list[int] | None = knob(None,
        'for layers / lora-layers: "0-3,26-29", "cogsym", "cogsym:0.5", selection.json')
    steps: int = knob(100, "optimizer steps")
    batch_size: int = knob(8, "sequences per micro-batch, all processes together (the global batch)")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    seq_len: int = knob(128, "tokens per packed sequence")
    lr: float = knob(3e-4, "peak learning rate")
    warmup: float = knob(0.05, "warm-up steps; below 1, a fraction of `steps`")
    schedule: str = knob("cosine", "after warm-up: cosine | linear (both to 0) | constant")
    schedule_steps: int = knob(0, "the steps the schedule (and a fractional warm-up) spans; 0: `steps`. Longer "
                               "than `steps`, the run is the start of a longer one: a study's learning-rate "
                               "trials and the runs a plateau stopped keep the cap's schedule")
    weight_decay: float = knob(0.0, "AdamW decay on weight matrices (never biases or norms)")
    max_grad_norm: float | None = knob(1.0, "gradient clipping; None or 0: off")
    save_steps: str | list[int] = knob("log:8",
        '"0,10,20,40", a list, "log:N" (N log-spaced) or "every:N"; 0 and the last step always')
    resume_every: int = knob(0,
        "also checkpoint every N steps, so an interrupted run loses at most N steps; each of these resume "
        "points is deleted once a later checkpoint is written (0: off; results are the same either way)")
    eval_steps: str | list[int] = knob("",
        'score the dev set at these steps into dev_curve.parquet, written like save_steps ("every:50", '
        '"log:8", "0,10,20"); 0 and the last step always; "" (the default): no dev curve')
    dev_pairs: int = knob(64, "dev pairs of the dev curve: a stratified sample of the run's dev split "
                              "(0: every dev pair that fits)")
    dev_max_sentence_tokens: int = knob(64, "dev-curve pairs with a side longer than this are left out, never cut")
    dev_sample_seed: int = knob(0, "seed of the dev-curve sample (a study passes its sample_seed)")
    stop_on_plateau: bool = knob(False,
        "stop at the first evaluation step where the best dev NLL fell by less than plateau_min_improvement "
        "(relative) over the last plateau_window of the steps done (cogprobe/tuning/plateau.py); `steps` is the cap; "
        "needs eval_steps, and with a decaying schedule plateau_min_steps")
    plateau_window: float = knob(0.2, "plateau rule: the window, a fraction of the steps done so far")
    plateau_min_improvement: float = knob(0.01,
        "plateau rule: stop when the best dev NLL improved by less than this fraction over the window")
    plateau_min_steps: int = knob(0, "plateau rule: never stop before this step (nor during warm-up)")
    seed: int = knob(0, "data order, LoRA init and dropout")
    bf16: bool = knob(False, "bf16 autocast (weights and optimizer stay fp32)")
    gradient_checkpointing: bool = knob(False, "keep only each block's input in the forward pass and recompute "
                                        "the rest in the backward pass: activation memory of about one block, "
                                        "for about a third more compute; the same gradients")
    loss_chunk_tokens: int = knob(0, "the loss from the positions with a label only, their logits computed in "
                                  "chunks of this many tokens and recomputed in the backward pass: logits memory "
                                  "of one chunk, not batch x seq_len x vocab, the same loss up to float order "
                                  "(cogprobe/tuning/loss.py; e.g. 1024; 0: the model's own loss)")
    threads: int | None = knob(None, "torch.set_num_threads for the run")
    lora_r: int = knob(8, "LoRA rank")
    lora_alpha: float = knob(16, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    lora_targets: list[str] | None = knob(None, "module names; default: every linear module in the blocks")
    train_embeddings: bool = knob(False, "strategy layers: also train the input embeddings")
    train_head: bool = knob(False, "strategy layers: also train the final norm and LM head")
    mix_perception: float = knob(1.0, "mixture weight of translation examples target -> pivot")
    mix_production: float = knob(1.0, "mixture weight of translation examples pivot -> target")
    mix_plain: float = knob(1.0, "mixture weight of the target sentence alone")
    mix_pivot: float = knob(0.0, "mixture weight of the pivot sentence alone (with the other weights 0: "
                            "pivot-only text, the control a study's row@pivot trains)")
    train_max_sentence_tokens: int = knob(MAX_SENTENCE_TOKENS,
                                          "a pair longer than this on a side is cut as a whole (both sides alike)")
    loss_on: str = knob(LOSS_ON[0], "continuation (translated side of translation examples + plain text) | all")
    pivot_col: str | None = knob(None, "corpus files: column of the pivot language")
    target_col: str | None = knob(None, "corpus files: column of the new language")
    document_col: str | None = knob(None,
        "corpus files: column naming each pair's document (splits and samples stratify by it)")
    pivot_name: str | None = knob(None, "name of the pivot language in the prompts (default: the corpus's)")
    target_name: str | None = knob(None, "name of the new language in the prompts (default: the corpus's)")
    split_seed: int = knob(0, "seed of the train/dev/test split")
    dev: float = knob(SPLIT_FRACTION, "dev split: a fraction or a pair count")
    test: float = knob(SPLIT_FRACTION, "test split: a fraction or a pair count")
    split_by_document: bool = knob(False, "keep each document inside one split")
    resume: bool = knob(False, "continue an interrupted run from its last checkpoint")
    overwrite: bool = knob(False, "replace a different run in `out`")
    progress: bool = knob(True, "show a progress bar")
    report_to: str = knob("none",
        "experiment trackers through accelerate: none, tensorboard, wandb, mlflow, all, or a comma list")
    on_divergence: str = knob("warn", "warn | stop: what a diverging loss does (see cogprobe/tuning/health.py)")

    def __post_init__(self):
        self._check_strategy()
        for name in ("steps", "batch_size", "grad_accum", "lora_r", "train_max_sentence_tokens"):
            _positive_int(self, name)
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise CogprobeError(f"seq_len={self.seq_len!r}: give a whole number of tokens >= 2 (e.g. 128)")
        if isinstance(self.loss_chunk_tokens, bool) or not isinstance(self.loss_chunk_tokens, int) \
                or self.loss_chunk_tokens < 0:
            raise CogprobeError(f"loss_chunk_tokens={self.loss_chunk_tokens!r}: give 0 (off) or a whole number of "
                                "tokens, e.g. 1024")
        if not self.lr > 0:
            raise CogprobeError(f"lr={self.lr}: the learning rate must be positive (e.g. 3e-4)")
        if isinstance(self.schedule_steps, bool) or not isinstance(self.schedule_steps, int) \
                or (self.schedule_steps and self.schedule_steps < self.steps):
            raise CogprobeError(f"schedule_steps={self.schedule_steps!r}: give 0 (the run's steps) or a whole "
                                f"number >= steps ({self.steps})")
        if self.warmup < 0 or self.warmup_steps() > self.steps:
            raise CogprobeError(f"warmup={self.warmup}: give 0..{self.steps} steps or a fraction below 1")
        if self.schedule not in SCHEDULES:
            raise CogprobeError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm < 0):
            raise CogprobeError("weight_decay and max_grad_norm must be >= 0")
        if not 0 <= self.lora_dropout < 1 or not self.lora_alpha > 0:
            raise CogprobeError(f"lora_dropout={self.lora_dropout} must be in [0, 1) and "
                                f"lora_alpha={self.lora_alpha} positive")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise CogprobeError(f"threads={self.threads!r}: give a positive number of threads or None")
        if not (isinstance(self.resume_every, int) and self.resume_every >= 0):
            raise CogprobeError(f"resume_every={self.resume_every!r}: give a whole number of steps >= 0 (0: off)")
        weights = self.mixture()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise CogprobeError(f"mixture weights {weights} must be >= 0 with a positive sum; "
                                "e.g. mix_plain=0 trains on the two translation directions only")
        if self.on_divergence not in ON_DIVERGENCE:
            raise CogprobeError(f"on_divergence={self.on_divergence!r}: use warn or stop")
        if self.loss_on not in ("continuation", "all"):
            raise CogprobeError(f"loss_on={self.loss_on!r}: use continuation or all")
        if self.resume and self.overwrite:
            raise CogprobeError("resume and overwrite contradict each other; pass one of them")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.save_step_list()  # validates
        self._check_dev_curve()

    def _check_strategy(self) -> None:
        if self.strategy not in STRATEGIES:
            raise CogprobeError(f"strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.strategy in LAYERED and self.layers in (None, "", []):
            raise CogprobeError(f"strategy {self.strategy} needs layers: pass e.g. layers='cogsym' "
                                "or '0-3,26-29' (--layers)")
        if self.strategy not in LAYERED and self.layers not in (None, "", []):
            raise CogprobeError(f"layers={self.layers!r} is only used by strategies layers and lora-layers; "
                                f"drop it or use strategy {'lora-layers' if self.strategy in LORA else 'layers'}")
        if self.strategy != "layers" and (self.train_embeddings or self.train_head):
            raise CogprobeError("train_embeddings / train_head only apply to strategy layers; drop them")

    def _check_dev_curve(self) -> None:
        """The dev curve's sizes and the plateau rule's settings; the rule needs a curve to read and a
        learning rate that the cap does not shape."""
        self.eval_step_list()  # validates
        if isinstance(self.dev_pairs, bool) or not isinstance(self.dev_pairs, int) or self.dev_pairs < 0:
            raise CogprobeError(f"dev_pairs={self.dev_pairs!r}: give a number of dev pairs >= 1 (0: all)")
        _positive_int(self, "dev_max_sentence_tokens")
        if not 0 < self.plateau_window < 1:
            raise CogprobeError(f"plateau_window={self.plateau_window}: give a fraction of the steps in (0, 1), "
                                "e.g. 0.2")
        if not 0 < self.plateau_min_improvement < 1:
            raise CogprobeError(f"plateau_min_improvement={self.plateau_min_improvement}: give a relative "
                                "improvement in (0, 1), e.g. 0.01")
        if isinstance(self.plateau_min_steps, bool) or not isinstance(self.plateau_min_steps, int) \
                or self.plateau_min_steps < 0:
            raise CogprobeError(f"plateau_min_steps={self.plateau_min_steps!r}: give a step >= 0")
        if self.stop_on_plateau and not self.eval_step_list():
            raise CogprobeError("stop_on_plateau needs a dev curve to read; pass eval_steps too "
                                "(e.g. --eval-steps every:50)")
        if self.stop_on_plateau and self.schedule != "constant" and not self.plateau_min_steps:
            raise CogprobeError(f"stop_on_plateau with a {self.schedule} schedule needs plateau_min_steps (the "
                                "decay, shaped by the steps cap, slows the curve by itself); pass "
                                "--plateau-min-steps, or --schedule constant")

    # ---- derived values
    def mixture(self) -> dict[str, float]:
        return {"perception": float(self.mix_perception), "production": float(self.mix_production),
                "plain": float(self.mix_plain), "pivot": float(self.mix_pivot)}

    def warmup_steps(self) -> int:
        return warmup_steps(self.warmup, self.horizon())

    def horizon(self) -> int:
        """The steps the schedule spans: `schedule_steps`, or the run's own."""
        return self.schedule_steps or self.steps

    def resolved_layers(self, n_layers: int) -> list[int] | None:
        return resolve(self.layers, n_layers) if self.strategy in LAYERED else None

    def save_step_list(self) -> list[int]:
        """The steps to checkpoint, sorted; always with 0 (the base) and the last step."""
        return sorted(step_list(self.save_steps, self.steps, "save_steps") | {0, self.steps})

    def eval_step_list(self) -> list[int]:
        """The steps to score the dev set at, sorted, with 0 and the last step; [] when eval_steps is off."""
        spec = self.eval_steps.strip() if isinstance(self.eval_steps, str) else self.eval_steps
        if not spec:
            return []
        return sorted(step_list(spec, self.steps, "eval_steps") | {0, self.steps})

    # ---- serialisation
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}

    def identity(self) -> dict:
        """What makes two runs the same run (execution-only fields left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_ONLY}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = current(d)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"ignoring unknown TrainConfig keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})


def current(recorded: dict) -> dict:
    """A recorded TrainConfig (a manifest's `config`, a table's `source.run`) with today's key names,
    its values and order kept: an older run is the same run as before the renames (`RENAMED`)."""
    return {RENAMED.get(k, k): v for k, v in recorded.items()}


def step_list(spec, steps: int, name: str) -> set[int]:
    """The steps a `save_steps`-like spec names within 0..steps: "0,10,20", a list, "log:N" (N steps
    log-spaced from 1 to `steps`) or "every:N" (every N-th step)."""
    kind, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind in ("log", "every"):
        n = int(arg) if arg.strip().isdigit() else 0
        if n < 1:
            raise CogprobeError(f"{name}={spec!r}: write {kind}:N with N >= 1 (e.g. {kind}:8)")
        found = ({int(round(x)) for x in np.geomspace(1, steps, n)} if kind == "log"
                 else set(range(n, steps + 1, n)))
    else:
        try:
            found = {int(s) for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()}
        except (TypeError, ValueError):
            raise CogprobeError(f"{name}={spec!r}: give steps like '0,10,20,40', log:N or every:N") from None
    bad = sorted(s for s in found if not 0 <= s <= steps)
    if bad:
        raise CogprobeError(f"{name} {bad} are outside 0..{steps}; give steps within the run")
    return found


def _positive_int(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CogprobeError(f"{name}={value!r}: give a whole number >= 1")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based).

    Warm-up rises linearly to 1 at step `warmup` (the first step already moves,
    unlike HF's, whose first step has lr 0); afterwards the factor follows HF's
    schedules: 1 at the first step after warm-up, falling towards 0 at `steps`.
    """
    if step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup - 1) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(warmup: float, steps: int) -> int:
    """Steps of warm-up: `warmup` below 1 is a fraction of `steps`, else a count (also what a study's
    analysis needs to replay the plateau rule, which judges nothing during warm-up)."""
    return int(warmup) if warmup >= 1 else round(warmup * steps)
