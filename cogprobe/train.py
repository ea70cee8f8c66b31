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
  checkpoints/step-N/   see `checkpoints` (and `resume` for the optimizer state)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import psutil
import torch

from cogprobe import health, io, resume, tracking
from cogprobe.checkpoints import ADAPTER, MANIFEST, META, TENSORS, own_steps, step_dir, write_checkpoint
from cogprobe.data import check_isolation
from cogprobe.distributed import on_cpu
from cogprobe.errors import CogprobeError
from cogprobe.runfolder import LOG, claim, lock, manifest, write_cost
from cogprobe.params import load_tensors, n_trainable, trainable, trainable_tensors
from cogprobe.strategies import LORA
from cogprobe.trainconfig import TrainConfig, lr_factor

__all__ = ["TrainConfig", "train", "lr_factor"]

OnStep = Callable[[int, torch.nn.Module, float], None]


def train(config: TrainConfig, *, on_step: OnStep | None = None) -> Path:
    """Fine-tune `config.model` on `config.corpus`; returns the run folder.

    `on_step(step, model, loss)` is called after every optimizer step (the model
    is the unwrapped training model; an exception raised there stops the run,
    like an interruption). A folder that already holds this finished run is
    returned as it is.
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    run = _Run(config, on_step)
    try:
        return run.execute()
    finally:
        if run.lock_fd is not None:
            os.close(run.lock_fd)
        torch.set_num_threads(threads)


class _Run:
    def __init__(self, config: TrainConfig, on_step: OnStep | None):
        self.cfg, self.on_step = config, on_step
        self.out = Path(config.out)
        self.log_rows: list[dict] = []
        self.flushed_at = time.perf_counter()
        self.peak_memory = 0
        self.process = psutil.Process()
        self.lock_fd: int | None = None  # see runfolder.lock

    # ---- setup
    def execute(self) -> Path:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from cogprobe.blocks import find_blocks
        from cogprobe.models import load_model, model_fingerprint, model_source
        cfg = self.cfg
        # bf16 is our own autocast, not Accelerator(mixed_precision=...): accelerate's state is a
        # process-wide singleton that refuses a second run with another precision in one process.
        self.acc = Accelerator(cpu=on_cpu(), **tracking.accelerator_kwargs(cfg.report_to, self.out))
        self.micro = self._micro_batch()
        self._check_resumable()
        set_seed(cfg.seed)
        model, tok = load_model(cfg.model)
        check_isolation(model)  # packed examples must not see each other: fail before any work
        self.fingerprint = model_fingerprint(model_source(model))
        blocks = find_blocks(model)
        self.layers = cfg.resolved_layers(blocks.n)
        self.stream = self._data(tok)  # before claiming `out`: bad data leaves no folder behind
        if self.acc.is_main_process:
            self.lock_fd = lock(self.out)
        start = claim(self.out, cfg, self.fingerprint, main=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        if start is None:
            return self.out
        model = self._strategy(model)
        optimizer = self._optimizer(model)
        self.tokens = 0
        if start > 0:
            self._restore(model, optimizer, start)
        elif self.acc.is_main_process:
            io.write_json(self.out / "manifest.json",
                          manifest(cfg, model, blocks, self.layers, self.fingerprint, self.corpus_info))
            write_checkpoint(self.out, 0, None, "base", self._meta(0, None))
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        tracking.start(self.acc, dataclasses.asdict(cfg))
        try:
            self._loop(start)
        finally:
            self.acc.end_training()
        return self.out

    def _micro_batch(self) -> int:
        """Sequences per process per micro-batch: the global `batch_size` split evenly."""
        b, n = self.cfg.batch_size, self.acc.num_processes
        if b % n:
            raise CogprobeError(f"--batch-size {b} is the global batch and does not split over {n} processes; "
                                f"pass a multiple of {n}")
        return b // n

    def _strategy(self, model):
        from cogprobe.strategies import LoraSpec, apply
        cfg = self.cfg
        spec = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                        tuple(cfg.lora_targets) if cfg.lora_targets else None)
        model = apply(model, cfg.strategy, self.layers, lora=spec,
                      train_embeddings=cfg.train_embeddings, train_head=cfg.train_head)
        model.train()
        self.is_lora = cfg.strategy in LORA
        self.n_trainable = n_trainable(model)
        return model

    def _data(self, tok):
        from cogprobe.corpora import load_corpus, split_corpus, split_overlap
        from cogprobe.data import KINDS, PackedStream, tokenize
        cfg = self.cfg
        corpus = load_corpus(cfg.corpus, pivot_col=cfg.pivot_col, target_col=cfg.target_col,
                             document_col=cfg.document_col, pivot_name=cfg.pivot_name,
                             target_name=cfg.target_name)
        splits = split_corpus(corpus, seed=cfg.split_seed, dev=cfg.dev, test=cfg.test,
                              by_document=cfg.split_by_document)
        weights = cfg.mixture()
        texts = tokenize(tok, splits.train, seq_len=cfg.seq_len, max_sentence_tokens=cfg.max_sentence_tokens,
                         kinds=tuple(k for k in KINDS if weights[k] > 0), loss_on=cfg.loss_on)
        self.corpus_info = dict(spec=str(cfg.corpus), pivot_name=corpus.pivot_name,
                                target_name=corpus.target_name, n_pairs=len(corpus),
                                n_train_pairs=len(splits.train), n_dev_pairs=len(splits.dev),
                                n_test_pairs=len(splits.test), split_overlap=split_overlap(splits))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return PackedStream(texts, weights, cfg.seq_len, cfg.seed, pad_id=pad)

    def _optimizer(self, model) -> torch.optim.AdamW:
        """AdamW; weight decay on matrices only (not on biases and norm gains), as HF Trainer does."""
        params = trainable(model)
        self.param_names = list(params)
        decay = [p for p in params.values() if p.ndim >= 2]
        flat = [p for p in params.values() if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": self.cfg.weight_decay},
                              {"params": flat, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=self.cfg.lr)

    def _check_resumable(self) -> None:
        """Under FSDP no resume state is saved, so `--resume` would silently start over: refuse it."""
        from accelerate.utils import DistributedType
        if self.cfg.resume and self.acc.distributed_type == DistributedType.FSDP:
            raise CogprobeError("--resume is not supported under FSDP (its optimizer state is sharded and not "
                                "saved); rerun with --overwrite, or without FSDP")

    def _restore(self, model, optimizer, start: int) -> None:
        """Load the trained tensors and optimizer state of checkpoint `start`."""
        path = step_dir(self.out, start)
        if self.is_lora:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, io.read_tensors(path / ADAPTER))
        else:
            load_tensors(model, io.read_tensors(path / TENSORS), str(path))
        recorded = io.read_json(path / META).get("sha256") or {}
        self.tokens = resume.restore(optimizer, path, self.param_names, recorded)["tokens_seen"]

    # ---- the loop
    def _loop(self, start: int) -> None:
        from tqdm.auto import tqdm
        cfg, acc = self.cfg, self.acc
        saves = set(cfg.save_step_list())
        self.last_saved = start
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.strategy}", unit="step",
                   disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.monitor = self._monitor(start)
        try:
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                try:
                    loss, grad_norm, lr, (n_tokens, n_labels) = self._step(step)
                except health.NonFinite as e:
                    self._record_health(dict(step=step, kind="non-finite", message=e.summary))
                    raise
                seconds = time.perf_counter() - t0
                self.tokens += n_tokens
                self.log_rows.append(dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens,
                                          step_tokens=n_tokens, loss_tokens=n_labels, seconds=seconds))
                acc.log({f"train/{k}": v for k, v in self.log_rows[-1].items() if k != "step"}, step=step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{n_tokens / seconds:.0f}",
                                **({"health": "DIVERGED"} if self.monitor.warned else {}))
                self._watch(step, loss, grad_norm)
                if self.on_step is not None:
                    self.on_step(step, acc.unwrap_model(self.model), loss)
                if step in saves:
                    self._save(step, loss, final=step == cfg.steps)
                elif len(self.log_rows) >= 50 or time.perf_counter() - self.flushed_at > 30:
                    self._flush()
        finally:
            bar.close()
            self._flush()

    # ---- health (see `health`)
    def _monitor(self, start: int) -> health.Monitor:
        """A divergence monitor; a resumed run's continues from its log (first loss) and manifest (warned)."""
        if start == 0:
            return health.Monitor()
        first = io.read_parquet(self.out / LOG).query("step == 1")["loss"]
        warned = any(e["kind"] == "divergence" for e in health.events(io.read_json(self.out / MANIFEST)))
        return health.Monitor(float(first.iloc[0]) if len(first) else None, warned)

    def _watch(self, step: int, loss: float, grad_norm: float) -> None:
        message = self.monitor.update(step, loss, grad_norm)
        if message is None:
            return
        self._record_health(dict(step=step, kind="divergence", loss=loss, grad_norm=grad_norm, message=message))
        if self.cfg.on_divergence == "stop":
            raise health.Diverged(f"{message}; training stopped (--on-divergence stop); checkpoints up to "
                                  f"step-{self.last_saved} are kept in {self.out}; rerun with --overwrite")
        if self.acc.is_main_process:
            from tqdm.auto import tqdm
            tqdm.write(f"cogprobe: warning: {message} (recorded in manifest.json; --on-divergence stop stops the run "
                       "instead)", file=sys.stderr)  # above the progress bar, not through it

    def _record_health(self, event: dict) -> None:
        if self.acc.is_main_process:
            health.record(self.out, event)

    def _rows_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum

    def _step(self, step: int) -> tuple[float, float, float, tuple[int, int]]:
        """One optimizer step over grad_accum micro-batches; (loss, grad norm, lr, (tokens, labels))
        with the step's real (not padding) tokens and loss tokens over every process."""
        cfg, acc, model = self.cfg, self.acc, self.model
        lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps(), cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rank, b = acc.process_index, self.micro
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1024 + rank)  # dropout: a function of the step
        first_row = (step - 1) * self._rows_per_step()
        everything = self.stream.rows(first_row, self._rows_per_step())  # every process's rows: a pure function
        total = torch.zeros((), device=acc.device)
        for j in range(cfg.grad_accum):
            rows = self.stream.rows(first_row + j * cfg.batch_size + rank * b, b)
            batch = {k: v.to(acc.device) for k, v in rows.batch().items()}
            # Each micro-batch's mean loss weighted by its share of the step's loss tokens (times the
            # process count, which DDP's gradient averaging divides out): the gradient of the step's
            # token mean, whatever the split into processes and micro-batches.
            weight = rows.n_labels / max(everything.n_labels, 1)
            sync = contextlib.nullcontext() if j == cfg.grad_accum - 1 else acc.no_sync(model)
            with sync:
                with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = model(**batch, use_cache=False).loss
                self._sample_memory()
                acc.backward(loss * weight * acc.num_processes)
                self._sample_memory()
            total += loss.detach() * weight
        mean = acc.reduce(total, "sum").item()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
        grad_norm = float(acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))
        health.check_finite(step, mean, grad_norm, self.last_saved, self.out)
        self.optimizer.step()
        self._sample_memory()
        self.optimizer.zero_grad(set_to_none=True)
        return mean, grad_norm, lr, (everything.n_tokens, everything.n_labels)

    def _sample_memory(self) -> None:
        """Peak memory: on CPU the largest RSS sampled after each forward pass (activations alive),
        backward pass (gradients) and optimizer step (its state); on GPU CUDA's own peak."""
        if torch.cuda.is_available():
            self.peak_memory = max(self.peak_memory, torch.cuda.max_memory_allocated())
        else:
            self.peak_memory = max(self.peak_memory, self.process.memory_info().rss)

    # ---- writing
    def _meta(self, step: int, loss: float | None) -> dict:
        return dict(step=step, train_loss=loss, tokens_seen=self.tokens if step else 0,
                    base_fingerprint=self.fingerprint, strategy=self.cfg.strategy)

    def _save(self, step: int, loss: float, final: bool) -> None:
        """Checkpoint `step` (main process); resume state too unless it is the last step (or FSDP)."""
        acc = self.acc
        state = self._gathered_state()
        if acc.is_main_process:
            self._flush()  # first, so a checkpoint on disk always has its log rows
            model = acc.unwrap_model(self.model)
            saved = None
            if not final and state is None:
                saved = resume.capture(self.optimizer, self.param_names, step=step, tokens_seen=self.tokens)
            if self.is_lora:
                write_checkpoint(self.out, step, model, "lora", self._meta(step, loss), resume_state=saved,
                                 state_dict=state)
            else:
                tensors = trainable_tensors(model) if state is None else state
                write_checkpoint(self.out, step, None, "tensors", self._meta(step, loss), resume_state=saved,
                                 tensors=tensors)
            resume.drop(own_steps(self.out), keep=None if final or state is not None else step)
        acc.wait_for_everyone()
        self.last_saved = step

    def _gathered_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the trainable tensors gathered whole on the main process (every process must
        take part); None otherwise. Not verified on hardware yet (FSDP needs GPUs): see README."""
        from accelerate.utils import DistributedType
        if self.acc.distributed_type != DistributedType.FSDP:
            return None
        full = self.acc.get_state_dict(self.model)
        if not self.acc.is_main_process:
            return None
        return {n: full[n].detach().to("cpu").contiguous() for n in self.param_names}

    def _flush(self) -> None:
        if not self.acc.is_main_process or not self.log_rows:
            return
        io.append_parquet(self.out / LOG, pd.DataFrame(self.log_rows))
        self.log_rows = []
        self.flushed_at = time.perf_counter()
        write_cost(self.out, self.n_trainable, self.optimizer, self.peak_memory,
                   "cuda" if torch.cuda.is_available() else "rss")
