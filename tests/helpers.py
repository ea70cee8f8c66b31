"""What several test modules share: a tiny corpus, CLI helpers, planted sweep tables, ranks on threads.

A plain module (not a test module), so tests import from here and never from each other.
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import cogprobe.probe.folders as probe
from cogprobe.models.blocks import find_blocks
from cogprobe.data.corpora import Corpus
from cogprobe.cli import main
from cogprobe.core.distributed import World
from cogprobe.models.layersets import to_string
from cogprobe.probe.sweep import COLUMNS
from cogprobe.data.tasks import TASKS, build_examples, collate, scored_positions
from tiny import tiny_tokenizer

# ------------------------------------------------------------------ a tiny corpus

ES = ["el hombre", "la casa", "el agua", "la mujer", "el perro", "la tortilla"]
NAH = ["in tlacatl", "in calli", "in atl", "in cihuatl", "in itzcuintli", "in tlaxcalli"]
VERB_ES = ["come", "hace", "ve", "quiere", "tiene"]
VERB_NAH = ["quicua", "quichiua", "quitta", "quinequi", "quipia"]


def corpus_rows() -> list[dict]:
    """60 distinct Spanish-Nahuatl-like pairs."""
    rows = [dict(es=f"{ES[i]} {VERB_ES[j]} {ES[(i + j) % 6]}", nah=f"{NAH[i]} {VERB_NAH[j]} {NAH[(i + j) % 6]}")
            for i in range(6) for j in range(5)]
    return rows + [dict(es=r["es"] + " hoy", nah=r["nah"] + " axcan") for r in rows]


def write_corpus(path: Path) -> Path:
    """The 60 pairs as a CSV with es/nah columns."""
    pd.DataFrame(corpus_rows()).to_csv(path, index=False)
    return path


def config(inputs, out, strategy, family="llama", **kw):
    """A small TrainConfig on the session's tiny inputs (conftest's `inputs`)."""
    from cogprobe.tuning.config import TrainConfig
    base = dict(model=inputs[family], corpus=inputs["corpus"], out=out, strategy=strategy, steps=4,
                batch_size=2, seq_len=24, lr=1e-2, warmup=0, save_steps="0,2", threads=1, progress=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ the CLI

SWEEP = ["--limit", "2"]   # a sweep small enough for a test


def train_argv(model, corpus, out, **flags) -> list[str]:
    values = dict(model=model, corpus=corpus, out=out, strategy="full", steps=2, batch_size=2, seq_len=24,
                  threads=1, lr=1e-2, warmup=0)
    values.update(flags)
    argv = ["train", "--no-progress"]
    for key, value in values.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def cli(argv: list[str]) -> int:
    """`main(argv)`'s exit code; argparse's own errors exit, so catch that too."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code



class Stop(Exception):
    """Raised from on_step: the run is interrupted like a killed one (its finally blocks run)."""



# ------------------------------------------------------------------ planted sweep tables (budget, curves, stability)

def revert_table(gains: dict[str, list[float]], *, step: int = 10, nll_ck: float = 2.0,
                 extra: float = 0.0, ends: bool = False) -> pd.DataFrame:
    """A revert sweep under an additive model: reverting block i adds gains[task][i] to the NLL.

    `extra` is gain outside the blocks (embeddings/head): in the reference, not in any curve.
    """
    rows = []
    for task, g in gains.items():
        L, nll_ref = len(g), nll_ck + sum(g) + extra
        for direction in ("input", "output"):
            for k in range(L + 1):
                blocks = list(range(k)) if direction == "input" else list(range(L - k, L))
                nll = nll_ck + sum(g[i] for i in blocks)
                gain = (nll_ref - nll) / (nll_ref - nll_ck) if nll_ref > nll_ck else math.nan
                rows.append(dict(checkpoint_step=step, task=task, direction=direction, mode="revert", k=k,
                                 k_in=None, k_out=None, blocks=to_string(blocks), ends=ends, nll=nll, n_tokens=100,
                                 nll_reference=nll_ref, nll_checkpoint=nll_ck, share=gain))
    return pd.DataFrame(rows, columns=COLUMNS)


PLANT_12 = {"perception": [0.5, 0.3, 0.2] + [0.01] * 9, "production": [0.01] * 9 + [0.2, 0.3, 0.5]}
PLANT_8 = {"perception": [0.1, 0.1, 0.6, 0.1, 0.05, 0.05, 0, 0], "production": [0, 0, 0, 0, 0.1, 0.1, 0.1, 0.7]}


class KeepOuterModel:
    """A synthetic `evaluate` for budget: kept blocks keep their planted share of each task's gain.

    Records every call, so tests can check the search order and that one size is one call.
    """

    def __init__(self, gains: dict[str, list[float]], nll_ck: float = 2.0, extra: float = 0.0):
        self.gains, self.nll_ck, self.extra, self.calls = gains, nll_ck, extra, []

    def ref(self, task):
        return self.nll_ck + sum(self.gains[task]) + self.extra

    def nll(self, task, k_in, k_out):
        g = self.gains[task]
        kept = set(range(k_in)) | set(range(len(g) - k_out, len(g)))
        return self.nll_ck + sum(x for i, x in enumerate(g) if i not in kept)

    def __call__(self, pairs):
        self.calls.append(list(pairs))
        rows = []
        for task, g in self.gains.items():
            ref = self.ref(task)
            for k_in, k_out in pairs:
                nll = self.nll(task, k_in, k_out)
                gain = (ref - nll) / (ref - self.nll_ck) if ref > self.nll_ck else math.nan
                rows.append(dict(checkpoint_step=5, task=task, direction="both", mode="keep-outer", k=k_in + k_out,
                                 k_in=k_in, k_out=k_out, nll=nll, nll_reference=ref, nll_checkpoint=self.nll_ck,
                                 share=gain))
        return pd.DataFrame(rows)



# ------------------------------------------------------------------ ranks of a launch, played by threads

@dataclass(frozen=True)
class ThreadWorld(World):
    """A rank played by a thread: the process barrier becomes a thread barrier."""
    gate: threading.Barrier | None = None

    def barrier(self) -> None:
        self.gate.wait(timeout=300)


def run_as_ranks(monkeypatch, size: int, fn) -> list:
    """fn() on `size` threads, each seeing itself as one rank of a `size`-process launch."""
    gate, ranks, results = threading.Barrier(size), {}, [None] * size
    monkeypatch.setattr(probe, "world", lambda: ranks[threading.get_ident()])

    def play(rank):
        ranks[threading.get_ident()] = ThreadWorld(rank, size, torch.device("cpu"), gate)
        try:
            results[rank] = fn()
        except BaseException as err:  # noqa: BLE001  (reported below; a dead rank would hang the others)
            gate.abort()
            results[rank] = err

    threads = [threading.Thread(target=play, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# ------------------------------------------------------------------ a synthetic sweep table (figures)

L = 6
STEPS = (0, 20, 40, 80)
REF_NLL = {"perception": 7.0, "production": 6.0}


def _weights(task: str, n: int, sharp: float = 4.0) -> np.ndarray:
    """Where each task's gain lives: perception near the input, production near the output."""
    pos = np.arange(n) / max(n - 1, 1)
    w = np.exp(-sharp * pos) if task == "perception" else np.exp(-sharp * (1 - pos))
    return w / w.sum()


def synthetic_sweeps(steps=STEPS, n=L, mode="revert") -> pd.DataFrame:
    """A sweeps table shaped like `cogprobe.sweep.sweep`'s, with a known pattern."""
    rows = []
    for step in steps:
        for task, ref in REF_NLL.items():
            gain = 2.0 * (1 - math.exp(-step / 40))
            w = _weights(task, n, sharp=1 + 6 * step / max(steps))   # specializes over training
            for d in ("input", "output"):
                for k in range(n + 1):
                    lost = w[:k].sum() if d == "input" else w[n - k:].sum() if k else 0.0
                    nll = ref - gain * (1 - lost) if mode == "revert" else ref - gain + 0.8 * k
                    rows.append(dict(checkpoint_step=step, task=task, direction=d, mode=mode, k=k, k_in=None,
                                     k_out=None, blocks="", ends=False, nll=nll, n_tokens=100,
                                     nll_reference=ref, nll_checkpoint=ref - gain,
                                     share=(ref - nll) / gain if gain > 0 else float("nan")))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ capture inputs

PERTURBED = 3  # the block changed in the "fine-tuned" checkpoint


def text_examples(tok, n=5, offset=0):
    """`n` Examples cut from the tiny texts (half prompt, half continuation): capture's test inputs."""
    from cogprobe.data.tasks import Example
    from tiny import TEXT
    out = []
    for text in (TEXT * 2)[offset:offset + n]:
        ids = tok(text).input_ids[:36]
        out.append(Example(tuple(ids), len(ids) // 2))
    return out


def perturbed_block(model, block=PERTURBED, scale=0.05, seed=1):
    """A copy of `model` with one block moved by seeded noise: a 'fine-tuned' checkpoint."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in find_blocks(other).modules[block].parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


# ------------------------------------------------------------------ planted checkpoints of a tiny model

TOY_CORPUS = Corpus("toy", pd.DataFrame({
    "pivot": ["el hombre hace las tortillas", "la casa es grande", "el agua está fría", "¿dónde está?", "sí"],
    "target": ["in tlacatl quichiua in tlaxcalli", "in calli huei", "in atl itztic", "canin?", "quemah"],
    "document": [""] * 5,
}), "Spanish", "Nahuatl")


def examples():
    """Both tasks' examples of the five toy pairs, on the tiny tokenizer."""
    tok = tiny_tokenizer()
    return {t: build_examples(tok, TOY_CORPUS, t) for t in TASKS}


def perturbed(model, blocks=None, embed=False, seed=1, scale=0.05):
    """A 'checkpoint': a copy with some blocks (and maybe the embeddings) moved."""
    out = copy.deepcopy(model)
    b = find_blocks(out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            i = b.block_of(name)
            if (i is not None and (blocks is None or i in blocks)) or (embed and name in b.input_end_names()):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def train_blocks(ref, examples, blocks, steps=8, lr=1e-2):
    """A real 'checkpoint': `ref` with only `blocks` trained on both tasks (embeddings frozen)."""
    ck = copy.deepcopy(ref).train()
    b = find_blocks(ck)
    for name, p in ck.named_parameters():
        p.requires_grad_(b.block_of(name) in blocks)
    opt = torch.optim.Adam([p for p in ck.parameters() if p.requires_grad], lr=lr)
    batch = collate([e for exs in examples.values() for e in exs], pad_id=0)
    pred, targets = scored_positions(batch)
    for _ in range(steps):
        logits = ck(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = F.cross_entropy(logits[pred], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ck.eval().requires_grad_(False)


ANALYSES = Path(__file__).resolve().parent.parent / "analyses"


def run_analysis(script: str | Path, *args, figures: Path | None = None, code: int = 0) -> str:
    """Run an `analyses/` script in this process, as `COGPROBE_FIGURES=figures python script args`
    would, without a new interpreter's imports (about 4 s each); its stdout, once it has exited with
    `code`. The scripts' own modules (`_common` reads COGPROBE_FIGURES when imported) are imported
    afresh for every call."""
    import contextlib
    import io
    import os
    import runpy
    import sys
    script = ANALYSES / script
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(str(ANALYSES)):
            del sys.modules[name]
    saved = sys.argv, list(sys.path), os.environ.get("COGPROBE_FIGURES")
    sys.argv, sys.path[:0] = [str(script), *map(str, args)], [str(ANALYSES)]
    if figures is not None:
        os.environ["COGPROBE_FIGURES"] = str(figures)
    out, exited = io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        exited = e.code or 0
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("COGPROBE_FIGURES", None)
        else:
            os.environ["COGPROBE_FIGURES"] = saved[2]
    assert exited == code, f"{script.name} exited with {exited}, not {code}: {out.getvalue()[-2000:]}"
    return out.getvalue()
