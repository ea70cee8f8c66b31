"""Grid benchmark: the full k grid against the adaptive one (`probe.grid`) on the same probe run.

The inputs are the quick study's as they were until 2026-12-05 (`probe_path.FORMER_QUICK`): its probe run (checkpoints 0, 8, 16 of
the first full fine-tuning run, trained once by the study's code and cached), its 8 dev pairs and
its tasks. Both grids are scored by the in-memory engine in this process, the run opened once:

  full       every k of 0..L, both directions, every checkpoint (`sweep`)
  adaptive   the coarse grid plus the k's the report and CogSym read (`pipeline.read_ks`), then
             refined where a curve moves by more than its 95% interval (`grid.adaptive_sweep`)

Reported: each grid's block evaluations (the engine's counter) and wall time; the adaptive curve
against the full grid's at every k: the adaptive curve is what the figures draw, its scored points
joined by straight lines, so at a k it did not score it is read off that line, and at every k the
largest |adaptive - full| share over the (checkpoint, task, direction) curves is set against the
full grid's 95% interval half-width there (`grid_by_k.csv`); and the budget set each table leads
to (the study's rule, tau and max_total, reading its table's candidates as the study does).

    python benchmarks/grid_bench.py                 # the embedded model: ~5 min on 2 cores (cached run)
    python benchmarks/grid_bench.py --tiny          # seconds; numbers meaningless (6 blocks: one grid)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import probe_path  # noqa: E402

COLUMNS = ["grid", "ks_scored", "ks_total", "curve_points", "block_evals", "evals_ratio", "seconds",
           "max_abs_diff", "half_width_there", "worst_k", "ks_outside_interval", "budget_blocks", "same_set",
           "checkpoints", "probe_pairs", "n_layers", "tau", "max_total"]
BY_K = ["k", "curves_scored", "max_abs_diff", "half_width_there", "within"]
KEY = ["checkpoint_step", "task", "direction", "k"]


def grids(config, run: Path) -> tuple[dict, dict, object, dict]:
    """Both tables, timed, from one opened run: ({grid: table}, {grid: seconds}, checkpoints, examples)."""
    from cogprobe.core.distributed import default_device
    from cogprobe.data.tasks import CONTROLS, TASKS
    from cogprobe.probe.grid import adaptive_sweep
    from cogprobe.probe.sweep import sweep
    from cogprobe.study.pipeline import evaluation_sets, read_ks
    from cogprobe.tuning.checkpoints import Checkpoints
    ckpts = Checkpoints.open(run).to(default_device())
    tok = ckpts.reference()[1]   # read once, before either clock starts
    tasks = (*TASKS, *CONTROLS) if config.sweep_controls else TASKS
    examples = evaluation_sets(config)["probe"].examples(tok, tasks)
    tables, seconds = {}, {}
    for name, score in (("full", lambda: sweep(ckpts, examples, engine="fast")),
                        ("adaptive", lambda: adaptive_sweep(ckpts, examples, keep=read_ks(config)))):
        start = time.perf_counter()
        tables[name] = score()
        seconds[name] = round(time.perf_counter() - start, 1)
    return tables, seconds, ckpts, examples


def curve_gaps(full, adaptive) -> list[dict]:
    """Per k: the largest |adaptive - full| share over the curves (the adaptive curve read off the
    line through its scored points), the full grid's interval half-width on that curve at that k,
    and whether every curve's gap at k lies within its own half-width."""
    import numpy as np
    from cogprobe.core.intervals import sweep_intervals
    full = sweep_intervals(full[full["share"].notna()])
    full["half"] = (full["share_high"] - full["share_low"]) / 2
    drawn = {key: a.sort_values("k") for key, a in adaptive[adaptive["share"].notna()].groupby(KEY[:3])}
    per_k: dict[int, list] = {}
    for key, f in full.groupby(KEY[:3]):
        if key not in drawn:
            continue
        a, f = drawn[key], f.sort_values("k")
        gaps = np.abs(np.interp(f["k"], a["k"], a["share"]) - f["share"].to_numpy())
        for k, gap, half, scored in zip(f["k"], gaps, f["half"], f["k"].isin(a["k"])):
            per_k.setdefault(int(k), []).append((float(gap), float(half), bool(scored)))
    rows = []
    for k, found in sorted(per_k.items()):
        gap, half, _ = max(found, key=lambda g: g[0])
        rows.append(dict(k=k, curves_scored=sum(s for _, _, s in found), max_abs_diff=round(gap, 4),
                         half_width_there=round(half, 4),
                         within=all(g < 1e-9 or g <= h for g, h, _ in found)))   # NaN half: not within
    return rows


def budget_set(config, ckpts, examples, table) -> str:
    """The budget rule on one table, as the study runs it: the table's complete candidates read,
    the rest scored at the last checkpoint (tau and max_total the preset's)."""
    from cogprobe.data.tasks import TASKS
    from cogprobe.models.blocks import find_blocks
    from cogprobe.models.layersets import to_string
    from cogprobe.probe.sweep import FastEngine, sweep
    from cogprobe.selection.rules import select_budget, sweep_candidates
    from cogprobe.core.errors import CogprobeError
    ref, step = ckpts.reference()[0], ckpts.steps[-1]
    model, n = ckpts.load(step)[0], find_blocks(ref).n
    runner = FastEngine(ref)
    known = sweep_candidates(table, step, n)
    known = known[known["task"].isin(TASKS)]
    known = known[known.groupby(["k_in", "k_out"])["task"].transform("nunique") == len(TASKS)]
    pairs = [(ckpts.reference_step, ref), (step, model)]
    scored = {t: examples[t] for t in TASKS}

    def evaluate(candidates):
        t = sweep(pairs, scored, mode="keep-outer", keep_outer=candidates, steps=[step], runner=runner, remember=True,
                  engine="fast")
        return t[t["checkpoint_step"] == step]
    try:
        return to_string(select_budget(evaluate, n, tau=config.tau, max_total=config.budget_max_total,
                                       known=known).layers)
    except CogprobeError as e:
        return f"no set: {e}"


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue 41's: the adaptive curve within the full grid's interval at every k, at a stated
    fraction of its block evaluations, and the same budget set."""
    a = next(r for r in rows if r["grid"] == "adaptive")
    return [dict(benchmark="grid", target="adaptive curve within the full grid's 95% interval at every k",
                 value=f"{a['ks_outside_interval']} k's outside; largest gap {a['max_abs_diff']} at k={a['worst_k']} "
                       f"(half-width there {a['half_width_there']})", met=int(a["ks_outside_interval"]) == 0),
            dict(benchmark="grid", target="adaptive grid: fewer block evaluations than the full grid",
                 value=f"{float(a['evals_ratio']):.2f}x ({a['ks_scored']} of {a['ks_total']} k's)",
                 met=float(a["evals_ratio"]) < 1 or bool(common.tiny())),
            dict(benchmark="grid", target="the same budget set from either table",
                 value=f"{a['budget_blocks']} ({'same' if a['same_set'] else 'DIFFERENT'})", met=bool(a["same_set"]))]


def main() -> None:
    common.parse_args(__doc__.splitlines()[0])
    info = common.machine_info()
    config = probe_path.study_config()
    run = probe_path.probe_run(config)
    tables, seconds, ckpts, examples = grids(config, run)
    by_k = curve_gaps(tables["full"], tables["adaptive"])
    outside = [r for r in by_k if not r["within"]]
    worst = max(by_k, key=lambda r: r["max_abs_diff"] / r["half_width_there"] if r["half_width_there"] > 0
                else r["max_abs_diff"] * 1e9, default=None)
    sets = {name: budget_set(config, ckpts, examples, t) for name, t in tables.items()}
    n = int(tables["full"]["k"].max())
    rows = []
    for name, t in tables.items():
        gap = dict(max_abs_diff=worst["max_abs_diff"], half_width_there=worst["half_width_there"], worst_k=worst["k"],
                   ks_outside_interval=len(outside)) if name == "adaptive" and worst else \
            dict(max_abs_diff=0.0, half_width_there="", worst_k="", ks_outside_interval=0)
        rows.append(dict(grid=name, ks_scored=int(t["k"].nunique()), ks_total=n + 1, curve_points=len(t),
                         block_evals=int(t.attrs["block_evals"]),
                         evals_ratio=round(t.attrs["block_evals"] / tables["full"].attrs["block_evals"], 3),
                         seconds=seconds[name], **gap, budget_blocks=sets[name], same_set=sets[name] == sets["full"],
                         checkpoints=len(ckpts.steps), probe_pairs=config.probe_pairs, n_layers=n, tau=config.tau,
                         max_total=config.budget_max_total))
    common.write_csv("grid", [{c: r[c] for c in COLUMNS} for r in rows], info)
    common.write_csv("grid_by_k", by_k, info)
    print(common.show("grid: full against adaptive", rows, COLUMNS))
    print(common.show("grid: the adaptive curve against the full grid's interval, per k", by_k, BY_K))


if __name__ == "__main__":
    main()
