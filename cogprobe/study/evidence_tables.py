"""The evidence study's numbers: every comparison that matters, on every language given, over its seeds.

Reads each study folder of `cogprobe run --preset standard` (its tables; no weights needed) and
returns tidy records, one per (language, row, other, task, quantity) with estimate, low, high,
n_pairs, n_seeds, n_draws; `evidence` writes them out with the markdown that words them. Every
quantity is the mean over the study's seeds with an interval valid at 2-5 seeds (the shared test
pairs' bootstrap error and a t-interval over the seeds' own estimates: `intervals.over_seeds`, via
`intervals.hierarchical`, `translate.chrf_over_seeds` for chrF), each seed's estimate beside it; with
one seed, the paired bootstrap over pairs. The random same-size sets are read as a distribution:
CogSym against each draw, and against all draws pooled (a seed's draws averaged first, so the seeds
stay the independent units; each seed drew its own sets, named per seed in the row tables).
Which comparisons are asked is `comparisons.toml` (`QUESTIONS`), the list the study report reads too.
Kept apart from the writer so a notebook gets the numbers without the prose, and each file stays
readable in one sitting.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import intervals
from cogprobe.core import io
from cogprobe.core import layout
from cogprobe.core.errors import CogprobeError
from cogprobe.core.intervals import Interval
from cogprobe.data.tasks import TASKS
from cogprobe.data.translate import chrf_over_seeds, sentence_stats
from cogprobe.study.comparisons import COMPARISONS, RANDOM
from cogprobe.study.config import StudyConfig
from cogprobe.study.rows import kind
from cogprobe.tuning import devcurve
from cogprobe.tuning import plateau
from cogprobe.tuning.config import warmup_steps

# (row, other, quantity): what the headline compares (comparisons.toml). share_minus: share(row) -
# share(other) of full fine-tuning's gain, paired; rel_deviation: (NLL row - NLL other) / NLL other,
# the paper's yardstick; chrf_rel_deviation: (chrF other - chrF row) / chrF other (positive: the row
# is worse, as for NLL). `other` RANDOM: every random draw, and all of them pooled
QUESTIONS = [(c.row, c.other, c.quantity) for c in COMPARISONS]
OWN = ["nll", "share", "rel_deviation", "chrf", "chrf_rel_deviation"]   # each row's own numbers, vs full
COLUMNS = ["language", "row", "other", "task", "quantity", "estimate", "low", "high", "n_pairs", "n_seeds",
           "n_draws", "per_seed", "pair_half", "seed_half"]
# per_seed: each seed's own estimate, ";"-joined (against `random`: the mean over that seed's draws);
# pair_half, seed_half: the parts of the interval's half-width the test pairs and the seeds give
# (`intervals.over_seeds`); with one seed, per_seed is the estimate and the interval the pairs' alone
CHRF = ("chrf", "chrf_rel_deviation")


def study_table(folder: Path, name: str) -> pd.DataFrame:
    """A study table read through `io`, so a folder written before a column was renamed reads with the
    new names (compare's `strategy` as `row`)."""
    path = Path(folder) / name
    if not path.is_file():
        raise CogprobeError(f"{path} is missing; run `cogprobe run --out {folder}` first")
    return io.read_parquet(path) if name.endswith(".parquet") else io.read_csv(path)


def statistic(quantity: str):
    """The quantity as a function of {name: mean NLL or chrF} with names row, other, base, full."""
    return {"nll": lambda m: m["row"], "chrf": lambda m: m["row"],
            "share": lambda m: (m["base"] - m["row"]) / (m["base"] - m["full"]),
            "rel_deviation": lambda m: (m["row"] - m["other"]) / m["other"],
            "chrf_rel_deviation": lambda m: (m["other"] - m["row"]) / np.where(m["other"] > 0, m["other"], np.nan),
            "share_minus": lambda m: ((m["base"] - m["row"]) - (m["base"] - m["other"])) / (m["base"] - m["full"]),
            }[quantity]


def units(seeds: list[int], row: str, other: str, draws: list[str]) -> list[dict]:
    """One {name: arm} per unit: per seed, and per (seed, draw) against `random` (`seed` says whose)."""
    return [{"row": layout.arm(row, s), "other": layout.arm(o, s), "base": "base", "full": layout.arm("full", s),
             "seed": s} for s in seeds for o in (draws if other == RANDOM else [other])]


def record(i: Interval, n_seeds: int) -> dict:
    """estimate, low, high and what makes the interval's width (COLUMNS), from `intervals.over_seeds`'s
    interval or, with one seed, the paired bootstrap's."""
    per_seed = getattr(i, "per_seed", (i.estimate,))
    return dict(estimate=i.estimate, low=i.low, high=i.high, n_seeds=n_seeds,
                per_seed=";".join(f"{v:.6g}" for v in per_seed), pair_half=getattr(i, "pair_half", float("nan")),
                seed_half=getattr(i, "seed_half", float("nan")))


def interval(study: dict, quantity: str, task: str, names: list[dict], f=None) -> tuple[Interval, int] | None:
    """The mean over units of one quantity with its interval, and the pairs it rests on (None if
    an arm is missing). NLL quantities read scores.parquet, chrF ones translations.parquet. `f`: a
    statistic of the units' names in place of the quantity's own (`length` asks a change)."""
    f = f or statistic(quantity)
    groups = [unit["seed"] for unit in names]
    names = [{k: v for k, v in unit.items() if k != "seed"} for unit in names]
    several = len(set(groups)) > 1
    if quantity in CHRF:
        data = []
        for unit in names:
            stats = sentence_stats(study["translations"], list(dict.fromkeys(unit.values())), task)
            if not set(unit.values()) <= set(stats):
                return None
            data.append({k: stats[v] for k, v in unit.items()})
        return chrf_over_seeds(f, data, groups=groups if several else [0] * len(data)), len(data[0]["row"])
    if not {a for unit in names for a in unit.values()} <= set(study["scores"]["arm"]):
        return None
    data = []
    for unit in names:
        got = intervals.arms(study["scores"], list(dict.fromkeys(unit.values())), task=task)
        data.append({k: got[v] for k, v in unit.items()})
    if several:
        found = intervals.hierarchical(f, data, groups=groups)
    elif len(data) == 1:
        found = intervals.paired(f, data[0])
    else:   # one seed's draws pooled: their mean, resampled over the pairs
        found = intervals.paired(lambda m: np.mean([f({k: m[f"{k}{u}"] for k in data[u]}) for u in range(len(data))],
                                                   axis=0),
                                 {f"{k}{u}": v for u, d in enumerate(data) for k, v in d.items()})
    return found, len(data[0]["row"][0])


def read(study: Path) -> dict | None:
    """The study's tables, or None while no run of it is compared yet."""
    if not (study / layout.COMPARE).is_file():
        return None
    compare = study_table(study, layout.COMPARE)
    return dict(scores=compared(study_table(study, layout.SCORES), compare),
                translations=compared(study_table(study, layout.TRANSLATIONS), compare),
                compare=compare, seeds=sorted(int(s) for s in compare["seed"].unique()),
                draws=sorted({r for r in compare["row"] if kind(r) == "random"}))


def compared(table: pd.DataFrame, compare: pd.DataFrame) -> pd.DataFrame:
    """The base model's rows and those of the arms `compare` holds. A run's scores are written before
    its compare row, so a study stopped between the two holds scores of a run that is not compared
    yet (its translations may be missing): read, they would put a half-scored seed in the headline.
    A compared run's earlier steps (`row-sSEED@STEP`) stay: they are scored before its end."""
    arms = {"base"} | {layout.arm(r, int(s)) for r, s in zip(compare["row"], compare["seed"])}
    return table[table["arm"].str.replace(r"@\d+$", "", regex=True).isin(arms)]   # row-sSEED@STEP: row-sSEED


def read_at(study: Path, step: int) -> dict | None:
    """The study's tables at an earlier step every run was also scored at (`compare_steps`), laid out as
    `read` lays out the end: compare's rows of that step, and each run's scores and translations under
    its own arm name (`row-sSEED`, from `row-sSEED@STEP`), the base model's beside them; so every
    comparison is asked at that step with the same code. None while no run was scored there."""
    if not (study / layout.COMPARE_STEPS).is_file():
        return None
    compare = study_table(study, layout.COMPARE_STEPS)
    compare = compare[compare["step"] == step].drop(columns="step")
    if compare.empty:
        return None
    tail = f"@{step}"

    def at(table: pd.DataFrame) -> pd.DataFrame:
        kept = table[(table["arm"] == "base") | table["arm"].str.endswith(tail)]
        return kept.assign(arm=kept["arm"].str.removesuffix(tail))
    return dict(scores=compared(at(study_table(study, layout.SCORES)), compare),
                translations=compared(at(study_table(study, layout.TRANSLATIONS)), compare),
                compare=compare, seeds=sorted(int(s) for s in compare["seed"].unique()),
                draws=sorted({r for r in compare["row"] if kind(r) == "random"}))


def blocks_per_seed(compare: pd.DataFrame, row: str) -> str:
    """The row's blocks: one set, or each seed's (`s0: ...; s1: ...`) where they differ (a random draw is
    drawn from the seed, so `random-1` is a different set on every seed)."""
    mine = compare[compare["row"] == row].sort_values("seed")
    if mine["blocks"].nunique() == 1:
        return str(mine["blocks"].iloc[0])
    return "; ".join(f"s{int(s)}: {b}" for s, b in zip(mine["seed"], mine["blocks"]))


def status(language: str, folder: Path, study: dict | None) -> dict:
    """How far the study has got: the runs compared of those its config plans."""
    config = StudyConfig.read(folder)
    planned = [layout.arm(r, s) for s in config.seed_list() for r in config.row_list()]
    compared = set() if study is None else {layout.arm(r, s) for r, s in zip(study["compare"]["row"],
                                                                                   study["compare"]["seed"])}
    return dict(language=language, compared=sum(a in compared for a in planned), planned=len(planned),
                rows=len(config.row_list()), seeds=config.seeds)


def setting(language: str, folder: Path) -> str:
    """What one language's study ran, in words: its model, the steps of every run and why that many
    (with `converge`: where full fine-tuning's dev NLL met the plateau rule, or the cap it had not)."""
    config = StudyConfig.read(folder)
    steps = io.read_json(folder / layout.STUDY).get(layout.RUN_LENGTH, config.steps)
    words = f"{language}: {config.model}, {steps} steps per run"
    curves = folder / layout.DEV_CURVES
    if not config.converge or not curves.is_file():
        return words
    full = study_table(folder, layout.DEV_CURVES)
    curve = devcurve.mean_nll(full[full["arm"] == layout.arm("full", config.seed_list()[0])])
    if not curve or curve[-1][0] != steps:
        return words
    last = plateau.check(curve, config.plateau_window, config.plateau_min_improvement,   # as `train` judged it
                         max(config.plateau_min_steps, warmup_steps(config.warmup, config.steps)))
    if last.converged:
        return f"{words}, where full fine-tuning's dev NLL plateaued"
    if last.reference_step is None:   # too few evaluations for the rule to judge
        return words
    return (f"{words}, the cap: full fine-tuning's best dev NLL still fell {last.improvement:.1%} over the last "
            f"{config.plateau_window:.0%} of its steps ({plateau.best(curve, last.reference_step):.3f} at step "
            f"{last.reference_step}, {last.best_nll:.3f} at {steps}), above the {config.plateau_min_improvement:.0%} "
            "plateau bar")


def rows_of(language: str, study: dict, asked: list[tuple[str, str, str]]) -> list[dict]:
    """One record per (row, other, quantity, task) of `asked`, over the seeds that have every arm of it
    (all seeds once the study is done; fewer while it runs, and `n_seeds` says how many)."""
    out = []
    have = set(study["scores"]["arm"])
    for row, other, quantity in asked:
        theirs = ([RANDOM] + study["draws"]) if other == RANDOM else [other]
        for o in theirs:
            n_draws = len(study["draws"]) if o == RANDOM else 1
            seeds = [s for s in study["seeds"] if (us := units([s], row, o, study["draws"]))   # no draw yet: none
                     and {a for u in us for k, a in u.items() if k != "seed"} <= have]
            if not seeds:
                continue
            for task in TASKS:
                found = interval(study, quantity, task, units(seeds, row, o, study["draws"]))
                if found is not None:
                    i, n = found
                    out.append(dict(language=language, row=row, other=o, task=task, quantity=quantity,
                                    n_pairs=n, n_draws=n_draws, **record(i, len(seeds))))
    return out


def own_rows(language: str, study: dict) -> list[dict]:
    names = list(dict.fromkeys(study["compare"]["row"]))
    return (rows_of(language, study, [(r, "full", q) for r in names for q in OWN if not (r == "full" and "dev" in q)])
            + conditional_gains(language, study))


def conditional_gains(language: str, study: dict) -> list[dict]:
    """Per row (and the base model) and task: test NLL with a shuffled source minus with the true one
    (same pairs), i.e. how much the model reads the source it translates, and for every row its change
    from the base model's (`conditional_gain_change`, same pairs); mean over the row's seeds."""
    scores = study["scores"]
    keyed = scores.assign(arm=scores["arm"] + "|" + scores["task"])   # one arm per (run, task or control)
    present = set(keyed["arm"])
    out = []
    for row in ["base", *dict.fromkeys(study["compare"]["row"])]:
        for task in TASKS:
            runs = ["base"] if row == "base" else [layout.arm(row, s) for s in study["seeds"]]
            runs = [a for a in runs if {f"{a}|{task}", f"{a}|{task}-shuffled"} <= present]
            if not runs:
                continue
            names = ["true", "shuffled", "base_true", "base_shuffled"]
            data = [dict(zip(names, intervals.arms(keyed, [f"{a}|{task}", f"{a}|{task}-shuffled", f"base|{task}",
                                                           f"base|{task}-shuffled"]).values())) for a in runs]
            found = {"conditional_gain": lambda m: m["shuffled"] - m["true"]}
            if row != "base":
                found["conditional_gain_change"] = lambda m: (m["shuffled"] - m["true"]) - (m["base_shuffled"]
                                                                                           - m["base_true"])
            for quantity, gain in found.items():
                i = intervals.hierarchical(gain, data) if len(data) > 1 else intervals.paired(gain, data[0])
                out.append(dict(language=language, row=row, other="", task=task, quantity=quantity,
                                n_pairs=len(data[0]["true"][0]), n_draws=1,
                                **record(i, len(runs) if row != "base" else 0)))
    return out


def cost(language: str, folder: Path, seeds: list[int]) -> list[dict]:
    """Wall hours per part of one language's study: the learning-rate trials (each trial's own time,
    `lr_search.parquet`), what is done once (baseline, probe, select, report), and each seed's runs
    (its tune and compare stages), the one-off re-scoring of chrF when its set changed mid-study
    (`chrf` stages), with the machines they ran on (`runfolder.machine`, recorded per
    stage since 2026-11-29; "not recorded" before). A stage's time is that of the invocation that
    finished it (work lost to an interruption is not counted), or for a run resumed after one, the
    time its log holds (`logged_training`); trials recorded before their times
    were kept are counted at the mean of those that were, and said so."""
    record = io.read_json(folder / layout.STUDY)
    seconds, machines = record.get("stage_seconds", {}), record.get(layout.STAGE_MACHINES, {})
    where = lambda stages: "; ".join(sorted({machines.get(k, "not recorded") for k in stages}))  # noqa: E731
    out = []
    trials = study_table(folder, layout.LR_SEARCH) if (folder / layout.LR_SEARCH).is_file() else pd.DataFrame()
    if len(trials):
        timed = trials["seconds"].dropna() if "seconds" in trials else pd.Series(dtype=float)
        hours = timed.mean() * len(trials) / 3600 if len(timed) else float("nan")
        out.append(dict(language=language, part="learning-rate trials", hours=hours, runs=len(trials),
                        machines=where([k for k in seconds if k.startswith("choose lr")]),
                        note="" if len(timed) == len(trials) else
                        f"{len(trials) - len(timed)} of {len(trials)} trials untimed, counted at the mean of the rest"))
    once = [k for k in seconds if k in ("baseline", "probe", "select", "report")]
    out.append(dict(language=language, part="once (baseline, probe, select, report)",
                    hours=sum(seconds[k] for k in once) / 3600, runs=0, machines=where(once), note=""))
    rescored = [k for k in seconds if k.startswith("chrf ")]
    if rescored:
        out.append(dict(language=language, part="chrF scored again on the NLL pairs (once)",
                        hours=sum(seconds[k] for k in rescored) / 3600, runs=len(rescored) - ("chrf base" in seconds),
                        machines=where(rescored), note="the runs compared before chrf_pairs changed, and the base model"))
    logged = logged_training(folder, record.get(layout.RUN_LENGTH, record.get("steps")))
    for seed in seeds:
        mine = [k for k in seconds if k.startswith(("tune ", "compare ")) and k.endswith(f"-s{seed}")]
        took = {k: max(seconds[k], logged.get(k.removeprefix("tune "), 0.0)) for k in mine}
        resumed = sum(took[k] > seconds[k] for k in mine)
        out.append(dict(language=language, part=f"seed {seed}", hours=sum(took.values()) / 3600,
                        runs=sum(k.startswith("tune ") for k in mine), machines=where(mine),
                        note=f"{resumed} resumed runs counted from their logs" if resumed else ""))
    return out


def logged_training(folder: Path, steps: int | None) -> dict[str, float]:
    """Seconds each compared run spent on its `steps` and dev evaluations, over every session it ran
    in (`sec_per_step` x steps, from its log, plus its dev curve's `seconds`): a run resumed after an
    interruption has a tune stage that timed only its last part, and this is what it cost."""
    if steps is None or not (folder / layout.COMPARE).is_file():
        return {}
    compare = study_table(folder, layout.COMPARE)
    if "sec_per_step" not in compare:
        return {}
    dev = study_table(folder, layout.DEV_CURVES) if (folder / layout.DEV_CURVES).is_file() else pd.DataFrame()
    evals = dev.groupby("arm")["seconds"].sum() if {"arm", "seconds"} <= set(dev.columns) else pd.Series(dtype=float)
    return {layout.arm(r.row, r.seed): r.sec_per_step * steps + float(evals.get(layout.arm(r.row, r.seed), 0.0))
            for r in compare.itertuples()}
