"""Tune every layer set that analyses/before_tuning.sh derived and score it against full fine-tuning.

    python analyses/before_tuning_compare.py [RUN_DIR] [--pairs 64]     (default runs/before-tuning)

The sets were chosen on dev pairs (before_tuning.sh); every row here is scored once, on a sample
of `--pairs` test pairs (with the shuffled-source control, so each row has its conditional gain),
and every number carries its 95% paired-bootstrap interval over those pairs.
Each set is tuned with strategy `layers` and the probe run's own settings (30 steps of 4 x 128
tokens, lr 3e-4, seed 0), so the probe run itself is the full fine-tuning row. A same-size
middle-blocks control of the budget set tests whether position matters. Sets of every block are
not tuned again (they are full fine-tuning minus the embeddings). Writes
figures/before_tuning.csv and prints the table as markdown; finished runs are reused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _common import FIGURES

from cogprobe.core import intervals
from cogprobe.core import io
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.models.layersets import resolve, to_string
from cogprobe.data.evalset import EvalSet
from cogprobe.data.tasks import CONTROLS, TASKS, score
from cogprobe.tuning.loop import TrainConfig, train

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("root", nargs="?", type=Path, default=Path("runs/before-tuning"))
ARGS.add_argument("--pairs", type=int, default=64, help="test pairs sampled for the scores")
ARGS = ARGS.parse_args()
ROOT = ARGS.root
PROBE = ROOT / "probe"
RULES = ("fixed", "curves", "curves-keep", "budget")
FULL = "full fine-tuning (the probe run)"


def middle(n_blocks: int, n_layers: int) -> list[int]:
    start = (n_layers - n_blocks) // 2
    return list(range(start, start + n_blocks))


def scores(run: Path, step: int, examples: dict, arm: str) -> pd.DataFrame:
    """Per-example NLL sums of one model on every task and control (the interval's raw material)."""
    model = Checkpoints.open(run).load(step)[0]
    frames = []
    for task, x in examples.items():
        s = score(model, x)
        frames.append(pd.DataFrame(dict(arm=arm, task=task, pair_id=range(len(x)), nll_sum=s.example_nll,
                                        n_tokens=s.example_tokens)))
    return pd.concat(frames, ignore_index=True)


def cost_row(name: str, run: Path, layers: list[int] | None) -> dict:
    cost = io.read_json(run / "cost.json")
    return dict(set=name, blocks=to_string(layers) if layers else "all + embeddings",
                n_blocks=len(layers) if layers else None, trainable_params=cost["trainable_params"],
                optimizer_state_mib=cost["optimizer_state_bytes"] / 2**20, sec_per_step=cost["sec_per_step"])


def with_intervals(table: pd.DataFrame, per_example: pd.DataFrame) -> pd.DataFrame:
    """NLL, conditional gain, share of full fine-tuning's gain and relative deviation per set and task,
    each with its 95% paired-bootstrap interval (same pairs for every arm); and each set's share
    minus the middle control's."""
    table = table.copy()
    for task in TASKS:
        data = intervals.arms(per_example, list(table["set"]), task=task)
        control = intervals.arms(per_example, list(table["set"]), task=f"{task}-shuffled")
        for i, name in enumerate(table["set"]):
            both = {"true": data[name], "shuffled": control[name]}
            found = {"nll": intervals.nll(data, name),
                     "conditional_gain": intervals.difference(both, "shuffled", "true")}
            if name != "base model":
                found["share"] = intervals.share(data, name, "base model", FULL)
                found["rel_deviation"] = intervals.paired(lambda m, n=name: (m[n] - m[FULL]) / m[FULL],
                                                          {k: data[k] for k in dict.fromkeys((name, FULL))})
            if name not in ("base model", FULL, "middle control") and "middle control" in data:
                found["share_minus_middle"] = intervals.share_difference(data, name, "middle control",
                                                                         "base model", FULL)
            for quantity, interval in found.items():
                for part, value in zip(("", "_low", "_high"), (interval.estimate, interval.low, interval.high)):
                    table.loc[i, f"{task}_{quantity}{part}"] = value
    return table


def main() -> None:
    manifest = io.read_json(PROBE / "manifest.json")
    cfg, n_layers = manifest["config"], manifest["base"]["n_layers"]
    probe = Checkpoints.open(PROBE)
    evalset = EvalSet.for_run(PROBE, split="test", n=ARGS.pairs, max_sentence_tokens=32)
    examples = evalset.examples(probe.reference()[1], (*TASKS, *CONTROLS))  # once
    missing = [r for r in RULES if not (PROBE / f"selection-{r}.json").is_file()]
    if "budget" in missing:
        sys.exit(f"{PROBE / 'selection-budget.json'} is missing; run analyses/before_tuning.sh first")
    sets = {rule: resolve(str(PROBE / f"selection-{rule}.json"), n_layers) for rule in RULES if rule not in missing}
    sets["middle control"] = middle(len(sets["budget"]), n_layers)
    keep = {k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}
    rows = [dict(set="base model", blocks="-"), cost_row(FULL, PROBE, None)]
    per_example = [scores(PROBE, 0, examples, "base model"), scores(PROBE, cfg["steps"], examples, FULL)]
    for name, layers in sets.items():
        if len(layers) == n_layers:
            print(f"{name}: every block; not tuned again")
            continue
        run = ROOT / f"tune-{name.replace(' ', '-')}"
        train(TrainConfig(**{**keep, "out": run, "strategy": "layers", "layers": layers, "save_steps": "0",
                             "progress": False, "resume": True}))
        rows.append(cost_row(name, run, layers))
        per_example.append(scores(run, cfg["steps"], examples, name))
    table = with_intervals(pd.DataFrame(rows), pd.concat(per_example, ignore_index=True))
    table.insert(2, "test_pairs", len(examples[TASKS[0]]))
    io.write_text(FIGURES / "before_tuning.csv", table.to_csv(index=False))
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    """The README's table: each quantity as 'estimate [low, high]'."""
    shown = table[["set", "blocks", "trainable_params"]].copy()
    shown["trainable_params"] = [f"{x / 1e6:.1f}M" if pd.notna(x) else "-" for x in table["trainable_params"]]
    for task in TASKS:
        for quantity, pct in (("nll", False), ("conditional_gain", False), ("share", True),
                              ("rel_deviation", True), ("share_minus_middle", True)):
            col = f"{task}_{quantity}"
            if col in table:
                f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
                shown[col] = [f"{f(e)} [{f(lo)}, {f(hi)}]" if pd.notna(e) else "-" for e, lo, hi in
                              zip(table[col], table[f"{col}_low"], table[f"{col}_high"])]
    return shown.to_markdown(index=False)


if __name__ == "__main__":
    main()
