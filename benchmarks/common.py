"""What every benchmark shares: flags, the machine, timing, peak memory, inputs, CSV output.

Flags (every script takes them; `run_all.py` passes them on through the
environment, so its subprocesses see the same settings):
  --tiny         a tiny random llama (tests/tiny.py) and a tiny in-code corpus:
                 runs in seconds, for the test suite; the numbers mean nothing
  --out DIR      where the CSVs go (default benchmarks/results)
  --cache DIR    trained checkpoints, the tiny model, the training corpus
                 (default benchmarks/.cache, gitignored)

Peak memory: `PeakMemory` (from `cogprobe.core.memory`, where the probe uses it
too). The numbers are of the whole process (weights, libraries, the call's own
tensors), which is why each measured variant runs in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks read local models only (cogprobe no longer sets it)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import cogprobe  # noqa: E402,F401
from cogprobe.core import io  # noqa: E402
from cogprobe.core.memory import PeakMemory, rss_bytes  # noqa: E402,F401  (the benchmarks' meter)

ENV_TINY, ENV_OUT, ENV_CACHE, ENV_THREADS, ENV_COMMAND = (
    "COGPROBE_BENCH_TINY", "COGPROBE_BENCH_OUT", "COGPROBE_BENCH_CACHE", "COGPROBE_BENCH_THREADS",
    "COGPROBE_BENCH_COMMAND")
ENV_SUBPROCESS = "COGPROBE_BENCH_SUBPROCESS"
EMBEDDED = "smollm2-135m"
MiB = 1 << 20


# ------------------------------------------------------------------ flags and places

def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse the common flags and export them, so subprocesses inherit them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="tiny random model, seconds; for tests")
    parser.add_argument("--out", type=Path, help="folder for the CSVs (default benchmarks/results)")
    parser.add_argument("--cache", type=Path, help="folder for checkpoints etc. (default benchmarks/.cache)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own; 1 with --tiny)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    if args.tiny:
        os.environ[ENV_TINY] = "1"
    if args.out:
        os.environ[ENV_OUT] = str(args.out.resolve())
    if args.cache:
        os.environ[ENV_CACHE] = str(args.cache.resolve())
    if args.threads:
        os.environ[ENV_THREADS] = str(args.threads)
    os.environ.setdefault(ENV_COMMAND, shlex.join(["python", *sys.argv]))
    set_threads()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the tables
    return args


def threads() -> int | None:
    """Torch threads asked for: --threads, else 1 for --tiny (a tiny model is faster on one
    thread, and immune to a busy machine's thread contention), else torch's default."""
    value = os.environ.get(ENV_THREADS)
    return int(value) if value else (1 if tiny() else None)


def set_threads() -> None:
    import torch
    if threads():
        torch.set_num_threads(threads())


def tiny() -> bool:
    return os.environ.get(ENV_TINY) == "1"


def results_dir() -> Path:
    return Path(os.environ.get(ENV_OUT) or BENCH / "results")


def cache_dir() -> Path:
    path = Path(os.environ.get(ENV_CACHE) or BENCH / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ the machine

def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    import platform
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """The columns every result row carries: where, when, how it was measured."""
    import torch
    return dict(
        cpu=cpu_model(), cores=os.cpu_count(), torch=torch.__version__,
        torch_threads=torch.get_num_threads(), device="cpu",
        load_avg_1m=round(os.getloadavg()[0], 2),
        tiny=tiny(), commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=os.environ.get(ENV_COMMAND) or shlex.join(["python", *sys.argv]),
    )


# ------------------------------------------------------------------ timing and memory

def _sync(device: str = "cpu") -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def times(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall seconds of a call (warm-up calls first, untimed); CUDA work is synchronised."""
    return statistics.median(times(fn, repeats, warmup, device))


# ------------------------------------------------------------------ subprocesses

def run_worker(script: Path, args: list[str], *, timeout: float = 1800) -> dict:
    """Run `script --worker-json FILE args...` in a fresh interpreter; its JSON result.

    Fresh processes keep one measurement's memory (and imports) out of the next.
    """
    with tempfile.TemporaryDirectory(prefix="cogprobe-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker-json", str(result), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode != 0 or not result.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-25:])
            raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed (exit {done.returncode}):\n{tail}")
        return json.loads(result.read_text())


def write_worker_result(path: Path | str, result: dict) -> None:
    io.write_json(path, result)


def in_process() -> bool:
    """Measure in this process instead of a fresh one: the default with --tiny, where the
    numbers mean nothing and interpreter start-ups would dominate the test suite's time.
    COGPROBE_BENCH_SUBPROCESS=1 forces subprocesses (the test suite checks that path too)."""
    return tiny() and os.environ.get(ENV_SUBPROCESS) != "1"


def measure_in_worker(script: Path, measure: Callable[[str], dict], flag: str, name: str) -> dict:
    """`measure(name)`, in a fresh subprocess (`script flag name`) unless `in_process()`."""
    if in_process():
        return json.loads(json.dumps(measure(name), default=str))  # the same types as via a file
    return run_worker(script, [flag, name])


# ------------------------------------------------------------------ inputs

# A tiny parallel corpus for --tiny runs (invented phrases; enough for a train/test split).
_TINY_ES = ["el hombre", "la mujer", "el niño", "la casa", "el agua", "el perro", "la tortilla", "el maíz"]
_TINY_NAH = ["in tlacatl", "in cihuatl", "in piltontli", "in calli", "in atl", "in itzcuintli",
             "in tlaxcalli", "in tlaolli"]
_TINY_VERB = [("come", "quicua"), ("ve", "quitta"), ("quiere", "quinequi"), ("hace", "quichiua"),
              ("tiene", "quipia")]


def tiny_corpus_rows() -> list[dict]:
    return [dict(es=f"{_TINY_ES[i]} {ves} {_TINY_ES[(i + j + 1) % 8]}",
                 nah=f"{_TINY_NAH[i]} {vnah} {_TINY_NAH[(i + j + 1) % 8]}", document=f"d{i % 3}")
            for i in range(8) for j, (ves, vnah) in enumerate(_TINY_VERB)]


def model_spec() -> str:
    """What `load_model` / `TrainConfig.model` get: the embedded alias, or the tiny model's folder."""
    if not tiny():
        return EMBEDDED
    folder = cache_dir() / "tiny-llama"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny
        with io.atomic_dir(folder) as tmp:
            save_tiny(tmp, "llama")
    return str(folder)


def n_layers() -> int:
    """The model's block count, from its config.json (no weights loaded)."""
    from cogprobe.models.loading import embedded_dir, load_model
    spec = model_spec()
    folder = embedded_dir() if spec == EMBEDDED else Path(spec)
    if not (folder / "config.json").is_file():
        load_model(spec)  # prepares the embedded model if needed
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def load_bench_model(attn_implementation: str = "eager"):
    """(model, tokenizer) in eval mode: the embedded SmolLM2-135M, or the tiny llama."""
    from cogprobe.models.loading import load_model
    return load_model(model_spec(), attn_implementation=attn_implementation)


def touch_weights(model) -> None:
    """Read every weight once. Loaded safetensors are memory-mapped and paged in lazily, so
    without this the first forward pass would count the weights themselves as its memory."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.detach().sum()


def train_corpus(n_pairs: int = 2000) -> Path:
    """The training corpus as a CSV in the cache: the first `n_pairs` cleaned axolotl
    pairs (tokenizing all 16k for every short benchmark run would cost ~13 s each),
    or the tiny corpus. A local cache, never committed: the texts stay in elotl."""
    import pandas as pd
    if tiny():
        path = cache_dir() / "tiny-corpus.csv"
        table = pd.DataFrame(tiny_corpus_rows())
    else:
        from cogprobe.data.corpora import load_corpus
        path = cache_dir() / f"axolotl-{n_pairs}.csv"
        pairs = load_corpus("axolotl").pairs.head(n_pairs)
        table = pd.DataFrame({"es": pairs["pivot"], "nah": pairs["target"], "document": pairs["document"]})
    if not path.is_file():
        io.write_text(path, table.to_csv(index=False))
    return path


def heldout_examples(tokenizer, n_pairs: int, max_sentence_tokens: int) -> dict:
    """{task: examples} from the first `n_pairs` test pairs of the training corpus (split seed 0,
    as `train` splits it), so the checkpoints never saw them."""
    from cogprobe.data.corpora import load_corpus, split_corpus
    from cogprobe.data.tasks import TASKS, build_examples
    test = split_corpus(load_corpus(train_corpus()), seed=0).test
    return {t: build_examples(tokenizer, test, t, max_sentence_tokens=max_sentence_tokens, limit=n_pairs)
            for t in TASKS}


# ------------------------------------------------------------------ output

def write_csv(name: str, rows: list[dict], info: dict | None = None) -> Path:
    """`results_dir()/NAME.csv`, atomically, with the machine columns on every row."""
    import pandas as pd
    info = info or machine_info()
    table = pd.DataFrame([{**row, **info} for row in rows])
    path = results_dir() / f"{name}.csv"
    io.write_text(path, table.to_csv(index=False))
    return path


def show(title: str, rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of the chosen columns, for the console."""
    import pandas as pd
    table = pd.DataFrame(rows)[columns]
    with pd.option_context("display.width", 200, "display.max_columns", None,
                           "display.float_format", lambda x: f"{x:.3g}"):
        return f"\n== {title}\n{table.to_string(index=False)}"
