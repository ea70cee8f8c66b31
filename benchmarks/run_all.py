"""Run the benchmarks, print their tables and whether each target was met.

    python benchmarks/run_all.py            # `make bench`: the embedded model, ~10 min on 2 cores
    python benchmarks/run_all.py --tiny --out /tmp/b --cache /tmp/b/cache   # seconds; what the tests run

Each benchmark runs in its own subprocess (clean memory numbers, no state shared
between them) and writes OUT/{capture,sweeps,tuning,probe_path,grid,scale,precision,loss}.csv; this script then reads
the CSVs back, checks the targets of the issue, and writes OUT/latest.md (the
tables and targets as Markdown, for the README). Missing a target is reported,
not an error: the exit status is non-zero only when a benchmark fails to run.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import capture_bench  # noqa: E402
import grid_bench  # noqa: E402
import loss_bench  # noqa: E402
import precision_bench  # noqa: E402
import probe_path  # noqa: E402
import scale_bench  # noqa: E402
import sweep_bench  # noqa: E402
import tuning_bench  # noqa: E402

BENCHMARKS = {  # name -> (module, csv)
    "capture": (capture_bench, "capture"),
    "sweeps": (sweep_bench, "sweeps"),
    "tuning": (tuning_bench, "tuning"),
    "probe": (probe_path, "probe_path"),
    "grid": (grid_bench, "grid"),
    "scale": (scale_bench, "scale"),
    "precision": (precision_bench, "precision"),
    "loss": (loss_bench, "loss"),
}


def read_rows(name: str) -> list[dict]:
    import pandas as pd
    return pd.read_csv(common.results_dir() / f"{name}.csv").to_dict("records")


def markdown(title: str, rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(names: list[str], seconds: dict[str, float]) -> str:
    """Tables + targets as Markdown (also printed)."""
    parts, targets = [], []
    for name in names:
        module, csv = BENCHMARKS[name]
        rows = read_rows(csv)
        parts.append(markdown(f"{name} ({seconds[name]:.0f} s)", rows, module.COLUMNS[:9]))
        targets += module.check_targets(rows)
    info = read_rows(BENCHMARKS[names[0]][1])[0]
    head = (f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
            f"({info['torch_threads']} threads), load average {info['load_avg_1m']} at the start; "
            f"{info['date']}; commit {info['commit']}; `{info['command']}`"
            + ("; TINY MODEL: the numbers mean nothing" if info["tiny"] else ""))
    parts.append(markdown("targets", [dict(t, met="yes" if t["met"] else "NO") for t in targets],
                          ["benchmark", "target", "value", "met"]))
    return head + "\n\n" + "\n\n".join(parts) + "\n"


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS)))
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    start, seconds = time.perf_counter(), {}
    for name in names:
        module = BENCHMARKS[name][0]
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, module.__file__], cwd=common.ROOT)  # flags travel in the env
        seconds[name] = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"benchmark {name} failed (exit {done.returncode})")
    text = report(names, seconds)
    common.io.write_text(common.results_dir() / "latest.md", text)
    print("\n" + text)
    print(f"all benchmarks: {time.perf_counter() - start:.0f} s; wrote {common.results_dir()}/")


if __name__ == "__main__":
    main()
