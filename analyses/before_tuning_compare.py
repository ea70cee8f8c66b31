"""Tune every layer set that analyses/before_tuning.sh derived and score it against full fine-tuning.

    python analyses/before_tuning_compare.py [RUN_DIR] [--pairs 64]     (default runs/before-tuning)

The sets were chosen on dev pairs (before_tuning.sh); every row here is scored once, on a sample
of `--pairs` test pairs (with the shuffled-source control, so each row has its conditional gain).
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

from cogprobe import io
from cogprobe.checkpoints import Checkpoints
from cogprobe.layersets import resolve, to_string
from cogprobe.evalset import EvalSet
from cogprobe.tasks import CONTROLS, TASKS, score
from cogprobe.train import TrainConfig, train

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("root", nargs="?", type=Path, default=Path("runs/before-tuning"))
ARGS.add_argument("--pairs", type=int, default=64, help="test pairs sampled for the scores")
ARGS = ARGS.parse_args()
ROOT = ARGS.root
PROBE = ROOT / "probe"
RULES = ("fixed", "curves", "curves-keep", "budget")


def middle(n_blocks: int, n_layers: int) -> list[int]:
    start = (n_layers - n_blocks) // 2
    return list(range(start, start + n_blocks))


def scores(run: Path, step: int, examples: dict) -> dict:
    model = Checkpoints.open(run).load(step)[0]
    nll = {t: score(model, x).nll for t, x in examples.items()}
    return {**{f"{t}_nll": nll[t] for t in TASKS},
            **{f"{t}_conditional_gain": nll[f"{t}-shuffled"] - nll[t] for t in TASKS}}


def row(name: str, run: Path, layers: list[int] | None, examples: dict, step: int) -> dict:
    cost = io.read_json(run / "cost.json")
    return dict(set=name, blocks=to_string(layers) if layers else "all + embeddings",
                n_blocks=len(layers) if layers else None, trainable_params=cost["trainable_params"],
                optimizer_state_mib=cost["optimizer_state_bytes"] / 2**20, sec_per_step=cost["sec_per_step"],
                **scores(run, step, examples))


def main() -> None:
    manifest = io.read_json(PROBE / "manifest.json")
    cfg, n_layers = manifest["config"], manifest["base"]["n_layers"]
    probe = Checkpoints.open(PROBE)
    evalset = EvalSet.for_run(PROBE, split="test", n=ARGS.pairs, max_sentence_tokens=32)
    examples = evalset.examples(probe.base()[1], (*TASKS, *CONTROLS))  # once
    missing = [r for r in RULES if not (PROBE / f"selection-{r}.json").is_file()]
    if "budget" in missing:
        sys.exit(f"{PROBE / 'selection-budget.json'} is missing; run analyses/before_tuning.sh first")
    sets = {rule: resolve(str(PROBE / f"selection-{rule}.json"), n_layers) for rule in RULES if rule not in missing}
    sets["middle control"] = middle(len(sets["budget"]), n_layers)
    keep = {k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}
    base = dict(set="base model", blocks="-", **scores(PROBE, 0, examples))
    rows = [base, row("full fine-tuning (the probe run)", PROBE, None, examples, cfg["steps"])]
    for name, layers in sets.items():
        if len(layers) == n_layers:
            print(f"{name}: every block; not tuned again")
            continue
        run = ROOT / f"tune-{name.replace(' ', '-')}"
        train(TrainConfig(**{**keep, "out": run, "strategy": "layers", "layers": layers, "save_steps": "0",
                             "progress": False, "resume": True}))
        rows.append(row(name, run, layers, examples, cfg["steps"]))
    table = pd.DataFrame(rows)[["set", "blocks", "n_blocks", "trainable_params", "optimizer_state_mib",
                                "sec_per_step", *(f"{t}_nll" for t in TASKS),
                                *(f"{t}_conditional_gain" for t in TASKS)]]
    full = table.iloc[1]
    for t in TASKS:
        gain = base[f"{t}_nll"] - full[f"{t}_nll"]
        table[f"{t}_share_of_full"] = (base[f"{t}_nll"] - table[f"{t}_nll"]) / gain
    io.write_text(FIGURES / "before_tuning.csv", table.to_csv(index=False))
    shown = table.assign(trainable_params=(table["trainable_params"] / 1e6).map("{:.1f}M".format))
    print(shown.to_markdown(index=False, floatfmt=".3f", missingval="-").replace("nanM", "-"))


if __name__ == "__main__":
    main()
