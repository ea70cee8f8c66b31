"""The bundled fine-tuning loop: `train(TrainConfig(...)) -> run folder`.

One loop for every strategy (see `strategies`): AdamW, warm-up + schedule,
gradient accumulation, optional bf16 autocast, on accelerate: launched by
`torchrun` or `accelerate launch` it is data-parallel over the processes (DDP,
or FSDP from an accelerate config), and only the main process writes. The batch
of step s is a pure function of (seed, s) (see `data`) and `batch_size` is the
global batch, split between the processes, so one command is one optimisation on
1 or N processes. Dropout is reseeded from (seed, s, rank), and the optimizer
state is saved with the latest checkpoint, so a resumed run repeats an
uninterrupted one's losses exactly.

The run folder:
  manifest.json      config, seed, versions, base model path + fingerprint, layers
  train_log.parquet  one row per step: step, loss, lr, grad_norm, tokens (real
                     tokens seen so far), step_tokens and loss_tokens (of that step),
                     seconds (of that step); rewritten atomically as it grows
  cost.json          trainable params, optimizer-state bytes, peak memory, s/step, tok/s
  dev_curve.parquet  with --eval-steps: dev NLL per (step, task) with per-example sums, and
                     dev_curve.parquet.json, its dev set (see `devcurve`)
  checkpoints/step-N/   see `checkpoints` (and `resume` for the optimizer state)

The run ends at `steps`, or with --stop-on-plateau at the first evaluation step where the
dev NLL has stopped improving (see `plateau`); either way its last step gets the final
checkpoint, and manifest.json's "stop" record says where and why: stopped_at, stop_reason
("plateau" or "cap") and, with --stop-on-plateau, the rule's settings and its check at every
evaluation step. A resumed run keeps the curve up to its checkpoint and meets the same
decisions, since the rule reads only the curve.

Read top to bottom: `train` calls `_setup`, which does everything before the first
step once and returns one frozen `_Run` (accelerator, prepared model and optimizer,
data stream, where to start, ...); `_Loop` runs the steps over it, and all that
changes from step to step lives in its one `_Progress` record.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd
import psutil
import torch

from cogprobe.tuning import devcurve
from cogprobe.tuning import health
from cogprobe.core import io
from cogprobe.tuning import plateau
from cogprobe.tuning import resume
from cogprobe.tuning import tracking
from cogprobe.models.blocks import find_blocks
from cogprobe.tuning.checkpoints import ADAPTER, META, TENSORS, own_steps, step_dir, write_checkpoint
from cogprobe.data.corpora import dropped_note, load_corpus, split_corpus, split_overlap
from cogprobe.tuning.text import KINDS, PackedStream, check_isolation, tokenize
from cogprobe.core.distributed import on_cpu, torch_threads
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import DEV_CURVE, MANIFEST, STOP, TRAIN_LOG
from cogprobe.models.loading import load_model, model_fingerprint, model_source
from cogprobe.models.params import load_tensors, n_trainable, trainable, trainable_tensors
from cogprobe.tuning.runfolder import claim, lock, manifest, write_cost
from cogprobe.tuning.strategies import LORA, LoraSpec, apply
from cogprobe.tuning.config import TrainConfig, lr_factor
from cogprobe.tuning.loss import check_plain_head, scored_loss

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["TrainConfig", "train", "lr_factor"]

OnStep = Callable[[int, torch.nn.Module, float], None]


def train(config: TrainConfig, *, on_step: OnStep | None = None) -> Path:
    """Fine-tune `config.model` on `config.corpus`; returns the run folder.

    `on_step(step, model, loss)` is called after every optimizer step (the model
    is the unwrapped training model; an exception raised there stops the run,
    like an interruption). A folder that already holds this finished run is
    returned as it is.
    """
    with torch_threads(config.threads), contextlib.ExitStack() as held:  # held: the run folder's lock
        run = _setup(config, held)
        if run is None:
            return Path(config.out)
        tracking.start(run.acc, asdict(config))
        try:
            _Loop(run, on_step).execute()
        finally:
            run.acc.end_training()
        return run.out


# ---------------------------------------------------------------- setup


@dataclass(frozen=True)
class _Run:
    """A run ready for its first step: built once by `_setup`, read by `_Loop`, never changed."""
    cfg: TrainConfig
    acc: Accelerator
    model: torch.nn.Module            # prepared by accelerate (wrapped under DDP / FSDP)
    optimizer: torch.optim.Optimizer  # prepared by accelerate
    stream: PackedStream              # the rows of every step, a pure function of (seed, step)
    micro: int                        # sequences per process per micro-batch
    start: int                        # the last step done before this session (0: a new run)
    tokens_seen: int                  # real tokens seen up to `start`
    fingerprint: str                  # of the base model
    param_names: tuple[str, ...]      # the trainable parameters, in the optimizer's order
    is_lora: bool
    n_trainable: int
    dev: devcurve.DevSet | None       # the dev curve's set (None: no --eval-steps)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def _setup(cfg: TrainConfig, held: contextlib.ExitStack) -> _Run | None:
    """Everything before the first step, in an order that fails early: the checks that need no
    work, then the model and the data (bad data leaves no folder behind), then the folder is
    claimed, and only then the strategy applied and the optimizer built (restored on a resume).
    None when the folder already holds this run, finished."""
    from accelerate.utils import set_seed
    acc = _accelerator(cfg)
    micro = _micro_batch(cfg, acc)
    _check_resumable(cfg, acc)
    set_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    check_isolation(model)  # packed examples must not see each other: fail before any work
    fingerprint = model_fingerprint(model_source(model))
    blocks = find_blocks(model)
    layers = cfg.resolved_layers(blocks.n)
    stream, corpus_info, note = _data(cfg, tok)  # before claiming `out`: bad data leaves no folder behind
    if note and acc.is_main_process:  # once per command, on stderr beside the progress bar
        print(f"cogprobe: note: {note}; counted in manifest.json (corpus.dropped)", file=sys.stderr)
    dev = devcurve.prepare(cfg, tok)       # so does a dev split too small for the dev curve
    start = _claim(cfg, acc, fingerprint, held)
    if start is None:
        return None
    model = _strategy(cfg, model, layers)
    trained = n_trainable(model)
    optimizer, names = _optimizer(cfg, model)
    tokens_seen = 0
    if start > 0:
        tokens_seen = _restore(cfg, model, optimizer, names, start)
    elif acc.is_main_process:
        out = Path(cfg.out)
        io.write_json(out / MANIFEST, manifest(cfg, model, blocks, layers, fingerprint, corpus_info))
        write_checkpoint(out, 0, None, "base", _meta(cfg, fingerprint, 0, None, 0))
    if dev is not None and acc.is_main_process:
        devcurve.write_record(Path(cfg.out), dev)
    model, optimizer = acc.prepare(model, optimizer)
    return _Run(cfg, acc, model, optimizer, stream, micro, start, tokens_seen, fingerprint, tuple(names),
                is_lora=cfg.strategy in LORA, n_trainable=trained, dev=dev)


def _accelerator(cfg: TrainConfig) -> Accelerator:
    """bf16 is our own autocast, not Accelerator(mixed_precision=...): accelerate's state is a
    process-wide singleton that refuses a second run with another precision in one process."""
    from accelerate import Accelerator
    return Accelerator(cpu=on_cpu(), **tracking.accelerator_kwargs(cfg.report_to, Path(cfg.out)))


def _micro_batch(cfg: TrainConfig, acc: Accelerator) -> int:
    """Sequences per process per micro-batch: the global `batch_size` split evenly."""
    b, n = cfg.batch_size, acc.num_processes
    if b % n:
        raise CogprobeError(f"--batch-size {b} is the global batch and does not split over {n} processes; "
                            f"pass a multiple of {n}")
    return b // n


def _check_resumable(cfg: TrainConfig, acc: Accelerator) -> None:
    """Under FSDP no resume state is saved, so `--resume` would silently start over: refuse it."""
    from accelerate.utils import DistributedType
    if cfg.resume and acc.distributed_type == DistributedType.FSDP:
        raise CogprobeError("--resume is not supported under FSDP (its optimizer state is sharded and not "
                            "saved); rerun with --overwrite, or without FSDP")


def _data(cfg: TrainConfig, tok) -> tuple[PackedStream, dict, str | None]:
    """The packed training stream of the corpus' train split, the corpus facts for the manifest (the
    pairs cleaning dropped included), and the line that announces those drops, if any."""
    corpus = load_corpus(cfg.corpus, pivot_col=cfg.pivot_col, target_col=cfg.target_col,
                         document_col=cfg.document_col, pivot_name=cfg.pivot_name,
                         target_name=cfg.target_name)
    splits = split_corpus(corpus, seed=cfg.split_seed, dev=cfg.dev, test=cfg.test,
                          by_document=cfg.split_by_document)
    weights = cfg.mixture()
    texts = tokenize(tok, splits.train, seq_len=cfg.seq_len, max_sentence_tokens=cfg.train_max_sentence_tokens,
                     kinds=tuple(k for k in KINDS if weights[k] > 0), loss_on=cfg.loss_on)
    corpus_info = dict(spec=str(cfg.corpus), pivot_name=corpus.pivot_name,
                       target_name=corpus.target_name, n_pairs=len(corpus), dropped=dict(corpus.dropped),
                       n_train_pairs=len(splits.train), n_dev_pairs=len(splits.dev),
                       n_test_pairs=len(splits.test), split_overlap=split_overlap(splits))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return PackedStream(texts, weights, cfg.seq_len, cfg.seed, pad_id=pad), corpus_info, dropped_note(corpus)


def _claim(cfg: TrainConfig, acc: Accelerator, fingerprint: str, held: contextlib.ExitStack) -> int | None:
    """Lock the run folder (main process; `held` releases it) and claim it: the step to start from,
    or None when it holds this run finished (see `runfolder.claim`)."""
    out = Path(cfg.out)
    if acc.is_main_process:
        fd = lock(out)
        if fd is not None:
            held.callback(os.close, fd)
    start = claim(out, cfg, fingerprint, main=acc.is_main_process)
    acc.wait_for_everyone()
    return start


def _strategy(cfg: TrainConfig, model, layers: list[int] | None):
    """The model with what trains set by the strategy (a PeftModel for LoRA), in train mode."""
    spec = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                    tuple(cfg.lora_targets) if cfg.lora_targets else None)
    model = apply(model, cfg.strategy, layers, lora=spec,
                  train_embeddings=cfg.train_embeddings, train_head=cfg.train_head)
    if cfg.gradient_checkpointing:
        _checkpoint_activations(model)
    if cfg.loss_chunk_tokens:
        check_plain_head(model)
    model.train()
    return model


def _checkpoint_activations(model) -> None:
    """Recompute each block in the backward pass (non-reentrant: frozen embeddings, as in layers and
    LoRA runs, need no gradient on their output)."""
    enable = getattr(model, "activation_checkpointing_enable", None)   # transformers >= 5.2x
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:
        raise CogprobeError(f"--gradient-checkpointing: {e}; train without it") from None


def _optimizer(cfg: TrainConfig, model) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW and the names of the parameters it trains; weight decay on matrices only (not on biases
    and norm gains), as HF Trainer does."""
    params = trainable(model)
    decay = [p for p in params.values() if p.ndim >= 2]
    flat = [p for p in params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": flat, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr), list(params)


def _restore(cfg: TrainConfig, model, optimizer, names: list[str], start: int) -> int:
    """Load the trained tensors and optimizer state of checkpoint `start`; returns the tokens seen."""
    path = step_dir(Path(cfg.out), start)
    if cfg.strategy in LORA:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, io.read_tensors(path / ADAPTER))
    else:
        load_tensors(model, io.read_tensors(path / TENSORS), str(path))
    recorded = io.read_json(path / META).get("sha256") or {}
    return resume.restore(optimizer, path, names, recorded)["tokens_seen"]


def _meta(cfg: TrainConfig, fingerprint: str, step: int, loss: float | None, tokens_seen: int) -> dict:
    """A checkpoint's meta.json fields (`write_checkpoint` adds its kind and checksums)."""
    return dict(step=step, train_loss=loss, tokens_seen=tokens_seen if step else 0,
                base_fingerprint=fingerprint, strategy=cfg.strategy)


# ---------------------------------------------------------------- the loop


@dataclass
class _Progress:
    """What changes from step to step, declared in one place (the `_Run` itself never changes)."""
    tokens: int                      # real tokens seen so far, every process's
    last_saved: int                  # the latest checkpoint on disk
    rows: list[dict] = field(default_factory=list)  # train_log rows not written yet
    flushed_at: float = field(default_factory=time.perf_counter)
    peak_memory: int = 0             # bytes, see `_Loop._sample_memory`
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, dev NLL), what `plateau` reads


class _Loop:
    """The optimizer steps of one `_Run`: the log, the checkpoints and the health watch."""

    def __init__(self, run: _Run, on_step: OnStep | None):
        self.run, self.cfg, self.acc = run, run.cfg, run.acc
        self.on_step = on_step
        self.saves = set(run.cfg.save_step_list())
        self.evals = set(run.cfg.eval_step_list())
        self.progress = _Progress(tokens=run.tokens_seen, last_saved=run.start,
                                  curve=devcurve.mean_nll(devcurve.read(run.out, upto=run.start)) if run.dev else [])
        self.process = psutil.Process()
        self.monitor = _monitor(run)

    def execute(self) -> None:
        from tqdm.auto import tqdm
        cfg, acc, progress = self.cfg, self.acc, self.progress
        bar = tqdm(total=cfg.steps, initial=self.run.start, desc=f"train {cfg.strategy}", unit="step",
                   disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            self._evaluate_start()
            for step in range(self.run.start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                try:
                    loss, grad_norm, lr, (n_tokens, n_labels) = self._step(step)
                except health.NonFinite as e:
                    self._record_health(dict(step=step, kind="non-finite", message=e.summary))
                    raise
                seconds = time.perf_counter() - t0
                progress.tokens += n_tokens
                progress.rows.append(dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=progress.tokens,
                                          step_tokens=n_tokens, loss_tokens=n_labels, seconds=seconds))
                acc.log({f"train/{k}": v for k, v in progress.rows[-1].items() if k != "step"}, step=step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{n_tokens / seconds:.0f}",
                                **({"health": "DIVERGED"} if self.monitor.warned else {}))
                if self._after(step, loss, grad_norm):
                    break
        finally:
            bar.close()
            self._flush()

    def _after(self, step: int, loss: float, grad_norm: float) -> bool:
        """After a step is logged: the health watch, the caller's hook, the dev curve, then a checkpoint
        or a flush. True when the run ends here: at its last step, or on a plateau."""
        self._watch(step, loss, grad_norm)
        if self.on_step is not None:
            self.on_step(step, self.acc.unwrap_model(self.run.model), loss)
        stop = None
        if step in self.evals:
            self._evaluate(step)
            stop = "plateau" if self._plateau() else None
        if stop is None and step == self.cfg.steps:
            stop = "cap"
        if stop is not None:
            self._finish(step, loss, stop)
        elif step in self.saves or (self.cfg.resume_every and step % self.cfg.resume_every == 0):
            self._save(step, loss, final=False)
        elif len(self.progress.rows) >= 50 or time.perf_counter() - self.progress.flushed_at > 30:
            self._flush()
        return stop is not None

    # ---- the dev curve (see `devcurve`) and the plateau rule (see `plateau`)
    def _evaluate_start(self) -> None:
        """The curve's point at the step this session starts from (step 0: the base model), unless the
        curve has it (a resumed run scored its checkpoint's step before saving it)."""
        start = self.run.start
        if start in self.evals and start not in {s for s, _ in self.progress.curve}:
            self._evaluate(start)

    def _evaluate(self, step: int) -> None:
        """Score the dev set at `step` (every process); the main one appends the rows to the table."""
        rows = devcurve.evaluate(self.run.model, self.run.dev, step)
        self.progress.curve.extend(devcurve.mean_nll(rows))
        if self.acc.is_main_process:
            io.append_parquet(self.run.out / DEV_CURVE, pd.DataFrame(rows, columns=devcurve.COLUMNS))

    def _plateau(self) -> bool:
        """Whether the plateau rule stops the run at the curve's latest step; the main process's answer
        on every process (their scores may differ in the last bits; the processes must stop together)."""
        if not self.cfg.stop_on_plateau:
            return False
        from accelerate.utils import broadcast
        converged = plateau.check(self.progress.curve, **self._rule()).converged
        return bool(broadcast(torch.tensor([int(converged)], device=self.acc.device), from_process=0).item())

    def _rule(self) -> dict:
        """The plateau rule's settings; it judges nothing during warm-up (a rising lr is slow by design)."""
        cfg = self.cfg
        return dict(window=cfg.plateau_window, min_improvement=cfg.plateau_min_improvement,
                    min_step=max(cfg.plateau_min_steps, cfg.warmup_steps()))

    def _finish(self, step: int, loss: float, reason: str) -> None:
        """The run's last step: the stop record, then the final checkpoint (in that order, so a run killed
        between the two has no final checkpoint, and its resume redoes both)."""
        if self.acc.is_main_process:
            rule = None
            if self.cfg.stop_on_plateau:
                checks = plateau.checks(self.progress.curve, **self._rule())
                rule = dict(self._rule(), checks=[c.to_dict() for c in checks])
            manifest = io.read_json(self.run.out / MANIFEST)
            manifest[STOP] = dict(stopped_at=step, stop_reason=reason, plateau=rule)
            io.write_json(self.run.out / MANIFEST, manifest)
        self._save(step, loss, final=True)

    def _drop_resume_points(self, keep: int) -> None:
        """Delete the checkpoints that only `resume_every` asked for, but `keep` (the one just written):
        a finished run holds exactly its save steps. Renamed out of the step names first, so no
        `step-N` folder is ever half deleted."""
        for step, folder in own_steps(self.run.out):
            if step not in self.saves and step != keep:
                gone = folder.with_name(f".tmp-dropped-{folder.name}")
                folder.rename(gone)
                shutil.rmtree(gone, ignore_errors=True)

    # ---- health (see `health`)
    def _watch(self, step: int, loss: float, grad_norm: float) -> None:
        message = self.monitor.update(step, loss, grad_norm)
        if message is None:
            return
        self._record_health(dict(step=step, kind="divergence", loss=loss, grad_norm=grad_norm, message=message))
        if self.cfg.on_divergence == "stop":
            raise health.Diverged(f"{message}; training stopped (--on-divergence stop); checkpoints up to "
                                  f"step-{self.progress.last_saved} are kept in {self.run.out}; "
                                  "rerun with --overwrite")
        if self.acc.is_main_process:
            from tqdm.auto import tqdm
            tqdm.write(f"cogprobe: warning: {message} (recorded in manifest.json; --on-divergence stop stops the run "
                       "instead)", file=sys.stderr)  # above the progress bar, not through it

    def _record_health(self, event: dict) -> None:
        if self.acc.is_main_process:
            health.record(self.run.out, event)

    # ---- one step
    def _rows_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum

    def _step(self, step: int) -> tuple[float, float, float, tuple[int, int]]:
        """One optimizer step over grad_accum micro-batches; (loss, grad norm, lr, (tokens, labels))
        with the step's real (not padding) tokens and loss tokens over every process."""
        cfg, acc, run = self.cfg, self.acc, self.run
        model, optimizer, stream = run.model, run.optimizer, run.stream
        lr = cfg.lr * lr_factor(step, cfg.horizon(), cfg.warmup_steps(), cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rank, b = acc.process_index, run.micro
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1024 + rank)  # dropout: a function of the step
        first_row = (step - 1) * self._rows_per_step()
        everything = stream.rows(first_row, self._rows_per_step())  # every process's rows: a pure function
        total = torch.zeros((), device=acc.device)
        for j in range(cfg.grad_accum):
            rows = stream.rows(first_row + j * cfg.batch_size + rank * b, b)
            batch = {k: v.to(acc.device) for k, v in rows.batch().items()}
            # Each micro-batch's mean loss weighted by its share of the step's loss tokens (times the
            # process count, which DDP's gradient averaging divides out): the gradient of the step's
            # token mean, whatever the split into processes and micro-batches.
            weight = rows.n_labels / max(everything.n_labels, 1)
            sync = contextlib.nullcontext() if j == cfg.grad_accum - 1 else acc.no_sync(model)
            with sync:
                with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = (scored_loss(model, batch, cfg.loss_chunk_tokens) if cfg.loss_chunk_tokens
                            else model(**batch, use_cache=False).loss)
                self._sample_memory()
                acc.backward(loss * weight * acc.num_processes)
                self._sample_memory()
            total += loss.detach() * weight
        mean = acc.reduce(total, "sum").item()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
        grad_norm = float(acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))
        health.check_finite(step, mean, grad_norm, self.progress.last_saved, run.out)
        optimizer.step()
        self._sample_memory()
        optimizer.zero_grad(set_to_none=True)
        return mean, grad_norm, lr, (everything.n_tokens, everything.n_labels)

    def _sample_memory(self) -> None:
        """Peak memory: on CPU the largest RSS sampled after each forward pass (activations alive),
        backward pass (gradients) and optimizer step (its state); on GPU CUDA's own peak."""
        now = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else self.process.memory_info().rss
        self.progress.peak_memory = max(self.progress.peak_memory, now)

    # ---- writing
    def _save(self, step: int, loss: float, final: bool) -> None:
        """Checkpoint `step` (main process); resume state too unless it is the last step (or FSDP)."""
        run, acc = self.run, self.acc
        state = self._gathered_state()
        if acc.is_main_process:
            self._flush()  # first, so a checkpoint on disk always has its log rows
            model = acc.unwrap_model(run.model)
            saved = None
            if not final and state is None:
                saved = resume.capture(run.optimizer, list(run.param_names), step=step,
                                       tokens_seen=self.progress.tokens)
            meta = _meta(self.cfg, run.fingerprint, step, loss, self.progress.tokens)
            if run.is_lora:
                write_checkpoint(run.out, step, model, "lora", meta, resume_state=saved, state_dict=state)
            else:
                tensors = trainable_tensors(model) if state is None else state
                write_checkpoint(run.out, step, None, "tensors", meta, resume_state=saved, tensors=tensors)
            resume.drop(own_steps(run.out), keep=None if final or state is not None else step)
            self._drop_resume_points(keep=step)
        acc.wait_for_everyone()
        self.progress.last_saved = step

    def _gathered_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the trainable tensors gathered whole on the main process (every process must
        take part); None otherwise. Not verified on hardware yet (FSDP needs GPUs): see README."""
        from accelerate.utils import DistributedType
        if self.acc.distributed_type != DistributedType.FSDP:
            return None
        full = self.acc.get_state_dict(self.run.model)
        if not self.acc.is_main_process:
            return None
        return {n: full[n].detach().to("cpu").contiguous() for n in self.run.param_names}

    def _flush(self) -> None:
        progress = self.progress
        if not self.acc.is_main_process or not progress.rows:
            return
        io.append_parquet(self.run.out / TRAIN_LOG, pd.DataFrame(progress.rows))
        progress.rows.clear()
        progress.flushed_at = time.perf_counter()
        write_cost(self.run.out, self.run.n_trainable, self.run.optimizer, progress.peak_memory,
                   "cuda" if torch.cuda.is_available() else "rss")


def _monitor(run: _Run) -> health.Monitor:
    """A divergence monitor; a resumed run's continues from its log (first loss) and manifest (warned)."""
    if run.start == 0:
        return health.Monitor()
    first = io.read_parquet(run.out / TRAIN_LOG).query("step == 1")["loss"]
    warned = any(e["kind"] == "divergence" for e in health.events(io.read_json(run.out / MANIFEST)))
    return health.Monitor(float(first.iloc[0]) if len(first) else None, warned)
