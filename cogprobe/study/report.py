"""The study report, in Markdown and HTML, drawn from the study folder's tables only.

The report is a list of blocks (heading, text, table, figure) rendered twice,
so the two formats never disagree. Every sentence of findings is computed from
the numbers in the tables; nothing is written from expectation.
"""
from __future__ import annotations

import html
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.probe import alignment
from cogprobe.probe.conditional import conditional_rows
from cogprobe.core import intervals
from cogprobe.core import io
from cogprobe.study import evidence
from cogprobe.study import evidence_tables
from cogprobe.study import lr_choice
from cogprobe.study import pivot_control, prose_control, sequential
from cogprobe.study import verdicts
from cogprobe.core.layout import (ALIGNMENT, BASELINE, COMPARE, EVALSETS, PROBE_PAIRS, LR_SEARCH, MANIFEST, RUN_LENGTH, RUNS, SCORES,
                             STAGE_MACHINES, STAGE_SECONDS, STUDY, SWEEPS, TRAIN_LOG, TRANSLATIONS, arm)
from cogprobe.models.loading import EMBEDDED, block_count
from cogprobe.study.rows import FIXED_USED, Skip, derives_budget, kind, label, plan
from cogprobe.tuning.runfolder import machine
from cogprobe.study.config import StudyConfig
from cogprobe.plots.runs import training_curve
from cogprobe.plots.style import save
from cogprobe.study.figures import plot_run
from cogprobe.data.tasks import TASKS
from cogprobe.data.translate import chrf_intervals



def write_report(out: Path) -> list[Path]:
    """Draw the figures and write report.md and report.html into the study folder."""
    out = Path(out)
    figures = plot_run(out)
    log = out / RUNS / _full_name(out) / TRAIN_LOG
    if log.is_file():
        figures.append(save(training_curve(io.read_parquet(log)), out / "figures" / "training_curve.png"))
    blocks = _blocks(out, figures)
    md, page = markdown(blocks), _html(blocks)
    io.write_text(out / "report.md", md)
    io.write_text(out / "report.html", page)
    return [out / "report.md", out / "report.html"]


def _full_name(out: Path) -> str:
    return arm("full", StudyConfig.read(out).seed_list()[0])


# --- content ------------------------------------------------------------------------------


def _blocks(out: Path, figures: list[Path]) -> list[tuple]:
    cfg = StudyConfig.read(out)
    b: list[tuple] = [("h1", f"cogprobe study: {cfg.model} on {cfg.corpus}")]
    b += [("p", _what_was_run(out, cfg))] + _tuning_choices(out, cfg)
    base = io.read_csv(out / BASELINE)
    b += [("h2", "Baseline (base model, test split)"), ("table", base.round(3)),
          ("p", "conditional_gain = NLL with each source replaced by another pair's (a fixed derangement) minus NLL "
                "with the true source: how much the model's prediction uses the sentence it translates.")]
    b += [("h2", "Where the adaptation lives")] + [("p", s) for s in _sweep_findings(out)]
    b += [("figure", f) for f in figures
          if f.stem.startswith(("specialization", "conditional_gain", "logit", "drift", "training"))]
    b += where_languages_meet(out, figures)
    b += [("h2", "Layer sets")] + _selections(out, cfg)
    record = io.read_json(out / STUDY)
    if (out / COMPARE).is_file():
        compare = io.read_parquet(out / COMPARE)
        study = pooled(out, cfg) if compare["seed"].nunique() > 1 else None
        b += [("h2", "CogSym against full fine-tuning"),
              ("table", _compare_table(compare, not_compared(compare, cfg, out), out))]
        tuned_on = {v for k, v in (record.get(STAGE_MACHINES) or {}).items() if k.startswith("tune ")}
        if len(tuned_on) > 1:
            b += [("p", f"sec_per_step above is the mean over seeds, and the runs trained on {len(tuned_on)} "
                        f"processors ({'; '.join(sorted(tuned_on))}; per run in study.json); the step-time "
                        "ratios below compare only runs on the same processor.")]
        if study is not None:
            b += _pooled_verdicts(study, cfg)
        intervals_table = interval_table(out, study)
        if intervals_table is not None:
            b += [("p", ("95% intervals, mean over the seeds (the interval of the README headline, "
                         "`intervals.over_seeds`; each seed's own estimate in parentheses)" if study is not None else
                         "95% intervals (paired bootstrap over the test pairs)")
                   + "; conditional_gain = NLL with shuffled "
                        "sources - NLL with the true ones, conditional_gain_change = its change from the base model's "
                        "on the same pairs; share = the row's share of full fine-tuning's NLL gain; "
                        "rel_deviation = (NLL row - NLL full) / NLL full, the paper's yardstick, where the bar is "
                        "3%; chrF on its own sample of pairs (`n_chrf`):"), ("table", intervals_table)]
        b += [("p", s) for s in _compare_findings(compare, base.iloc[0], out, study,
                                                  record.get(STAGE_MACHINES) or {})]
        b += [("figure", f) for f in figures if f.stem.startswith(("comparison", "share_curves"))]
    b += prose_control.report_blocks(out, cfg.prose_passages)
    b += pivot_control.report_blocks(out)
    b += _stage_times(record.get(STAGE_SECONDS) or {}, record.get(STAGE_MACHINES) or {})
    b += [("h2", "Reading these numbers"), ("p", _caveats(cfg))]
    return b


def _stage_times(seconds: dict[str, float], machines: dict[str, str]) -> list[tuple]:
    """Where the study's wall time went, per stage (the invocation that finished each, and its machine)."""
    if not seconds:
        return []
    total = sum(seconds.values())
    table = pd.DataFrame({"stage": list(seconds), "seconds": [round(v) for v in seconds.values()],
                          "minutes": [f"{int(v // 60)}:{int(v % 60):02d}" for v in seconds.values()],
                          "share": [f"{v / total:.0%}" for v in seconds.values()],
                          "machine": [machines.get(k, "not recorded") for k in seconds]})
    table.loc[len(table)] = ["total", round(total), f"{int(total // 60)}:{int(total % 60):02d}", "100%", ""]
    return [("h2", "Where the time went"),
            ("p", "Wall time per stage, as measured by the invocation "
                  "that finished it (a run retrained after its weights were lost counts once; work cut off by an "
                  "interruption is not counted); the report stage itself is timed when it ends, so it is missing "
                  "from the report that is being written and present in study.json."), ("table", table)]


def _tuning_choices(out: Path, cfg: StudyConfig) -> list[tuple]:
    """How long every run trained (with `converge`) and each row's learning rate (with lr grids)."""
    b: list[tuple] = []
    length = io.read_json(out / STUDY).get(RUN_LENGTH)
    if cfg.converge:
        b += [("h2", "Length and learning rates, chosen on dev")]
        b += [("p", f"Full fine-tuning (first seed) trained until its dev NLL (mean of the two translation tasks, "
                    f"{cfg.dev_pairs} dev pairs, at steps {cfg.eval_steps}) improved by less than "
                    f"{cfg.plateau_min_improvement:.0%} over the last {cfg.plateau_window:.0%} of its steps, with a cap "
                    f"of {cfg.steps}: " + (f"it stopped at step {length}, and every run trained {length} steps."
                                            if length is not None else "it has not finished yet."))]
    if (out / LR_SEARCH).is_file():
        trials = io.read_parquet(out / LR_SEARCH)
        tried = {row: lr_choice.trials_of(trials, row) for row in dict.fromkeys(trials["row"])}
        trials = trials.assign(chosen=[lr == lr_choice.best(tried[row]) for row, lr in zip(trials["row"], trials["lr"])])
        if not b:
            b += [("h2", "Learning rates, chosen on dev")]
        edge = [row for row, rates in tried.items() if lr_choice.at_edge(rates)]
        b += [("p", f"Each row trained {cfg.lr_steps} steps at every rate of its grid (first seed; the random draws "
                    "share the first draw's rate), and past the grid's edge while the best rate sat there (up to "
                    f"{lr_choice.MAX_BEYOND} rates beyond it); the lowest dev NLL was kept for all of its runs."
                    + (f" For {', '.join(edge)} the best rate is still the edge of what was tried: the optimum may "
                       "lie further out." if edge else "")),
              ("table", trials.round(6))]
    return b


def run_versions(out: Path) -> str:
    """The library versions full fine-tuning's first run recorded in its manifest, else those of any
    run still on disk. runs/ is never committed, so a study folder continued on a fresh machine may
    keep none: then the report says so rather than printing an empty list."""
    first = out / RUNS / _full_name(out) / MANIFEST
    manifests = [first] if first.is_file() else sorted((out / RUNS).glob(f"*/{MANIFEST}"))
    for manifest in manifests:
        versions = io.read_json(manifest).get("versions", {})
        if versions:
            return ", ".join(f"{k} {v}" for k, v in versions.items())
    return "not known here (no run's manifest is on disk: runs/, the weights, stays with the machine that trained them)"


def _what_was_run(out: Path, cfg: StudyConfig) -> str:
    vers = run_versions(out)
    where = f"{machine()}, Python {platform.python_version()}"
    steps = f"at most {cfg.steps} steps (the length below)" if cfg.converge else f"{cfg.steps} steps"
    rates = ("lr chosen per row on dev (below)" if len(cfg.lrs("full")) > 1 or len(cfg.lrs("lora")) > 1
             else f"lr {cfg.lr} (LoRA {cfg.lora_lr})")
    return (f"Model `{cfg.model}`, corpus `{cfg.corpus}`; seeds {cfg.seeds}; every tuning run: "
            f"{steps} of batch {cfg.batch_size} x {cfg.seq_len} tokens, {rates}, {cfg.schedule} schedule, "
            f"LoRA r={cfg.lora_r}, bf16 autocast {cfg.bf16}, training loss on "
            f"{cfg.loss_on} tokens, whole examples per row, training pairs cut as wholes to "
            f"{cfg.train_max_sentence_tokens} tokens a side. {_evalsets_text(out, cfg)} "
            f"Report written on: {where}. Versions: {vers}. "
            f"Report written {time.strftime('%Y-%m-%d %H:%M')}.")


def _evalsets_text(out: Path, cfg: StudyConfig) -> str:
    """Which pairs every number comes from (evalsets.json, written with the baseline)."""
    path = out / EVALSETS
    if not path.is_file():
        return ""
    sets = io.read_json(path)
    probe = "sweeps, capture and the budget selection" if derives_budget(cfg.row_list()) else "sweeps and capture"
    use = {"nll": "NLL and conditional gain of the baseline and every comparison row", "chrf": "chrF", "probe": probe}
    parts = [f"{use.get(name, name)}: {e['sampled']} {e['split']} pairs" for name, e in sets.items()]
    e = next(iter(sets.values()))
    overlap = sum(e["overlap"].values())
    chunked = f" ({sequential.words(io.read_json(out / PROBE_PAIRS))})" if (out / PROBE_PAIRS).is_file() else ""
    return (f"Evaluation sets (random samples stratified by document, sample seed {e['sample_seed']}, split seed "
            f"{e['split_seed']}; pairs with a side over {e['max_sentence_tokens']} tokens left out, never cut): "
            + "; ".join(parts) + f"{chunked}. Normalised sentences shared between splits: {overlap}.")


def _sweep_findings(out: Path) -> list[str]:
    path = out / SWEEPS
    if not path.is_file():
        return ["No sweeps were run."]
    t = io.read_parquet(path)
    t = t[(t["mode"] == "revert") & ~t["ends"]]
    last = t["checkpoint_step"].max()
    t = t[t["checkpoint_step"] == last]
    lines = []
    for task in TASKS:
        rows = t[t["task"] == task]
        if rows.empty:
            continue
        ref, ck = rows["nll_reference"].iloc[0], rows["nll_checkpoint"].iloc[0]
        if not ck < ref:
            lines.append(f"{task.capitalize()}: the step-{last} checkpoint did not improve on the base "
                         f"({ck:.3f} vs {ref:.3f} nats/token), so there is no gain to locate.")
            continue
        parts = [verdicts.ends_sentence(rows, k) for k in probe_ks(rows["k"])]
        lines.append(f"{task.capitalize()} (step {last}, NLL {ref:.3f} -> {ck:.3f} nats/token): " + "; ".join(parts) + ".")
    lines += [line for task in TASKS if (line := conditional_findings(t, task, last))]
    return lines + _grid_sentence(t)


def conditional_findings(t: pd.DataFrame, task: str, last: int) -> str:
    """The same reading of the rise in conditional gain (the part of the gain that uses the source,
    `probe.conditional`), where the controls were swept; or why there is none to locate."""
    if not ((t["task"] == task).any() and (t["task"] == f"{task}-shuffled").any()):
        return ""
    rows = conditional_rows(t[t["task"].isin([task, f"{task}-shuffled"])], strict=False)
    base, tuned = -rows["nll_reference"].iloc[0], -rows["nll_checkpoint"].iloc[0]
    head = (f"{task.capitalize()}, the source-dependent part (conditional gain {base:.3f} -> {tuned:.3f} "
            f"nats/token)")
    if not tuned > base:
        return f"{head}: the step-{last} checkpoint did not raise the use of the source, so there is none to locate."
    parts = [verdicts.ends_sentence(rows, k, of="the rise in source use") for k in probe_ks(rows["k"])]
    return f"{head}: " + "; ".join(parts) + "."


def _grid_sentence(t: pd.DataFrame) -> list[str]:
    """Which k's an adaptive grid scored at the last checkpoint (`probe.grid`): none else is drawn."""
    if "k_grid" not in t.columns or t["k_grid"].isna().all():
        return []
    t = t[t["task"].isin(TASKS)]
    n = int(t["k"].max())
    coarse = sorted(int(k) for k in t.loc[t["k_grid"] == "coarse", "k"].unique())
    refined = {f"{task} {d}": sorted(int(k) for k in g["k"].unique())
               for (task, d), g in t[t["k_grid"] == "refined"].groupby(["task", "direction"])}
    added = "; ".join(f"{curve}: {', '.join(map(str, ks))}" for curve, ks in refined.items()) or "none"
    return [f"Swept on the adaptive k grid: {len(coarse)} of the {n + 1} k's first ({', '.join(map(str, coarse))}), "
            f"then a k wherever a curve moved by more than its 95% interval between two scored k's (added: "
            f"{added}); the figures draw the scored k's only."]


def where_languages_meet(out: Path, figures: list[Path]) -> list[tuple]:
    """The block of peak alignment per checkpoint with its interval, and whether tuning moved it."""
    path = out / ALIGNMENT
    if not path.is_file():
        return []
    t = io.read_parquet(path)
    steps = sorted(int(s) for s in t["checkpoint_step"].unique())
    rows = []
    for step in steps:
        peak = alignment.peak_block(t, step)
        at = t[(t["checkpoint_step"] == step) & (t["block"] == int(peak.estimate))].groupby("measure")["value"].mean()
        rows.append({"checkpoint step": step, "peak block": int(peak.estimate),
                     "95% interval": f"[{peak.low:.0f}, {peak.high:.0f}]",
                     **{m: round(float(at[m]), 3) for m in alignment.MEASURES if m in at}})
    n = int(t["n_pairs"].iloc[0])
    b = [("h2", "Where the languages meet"),
         ("p", f"Each of {n} pairs' sentences read alone, mean-pooled after every block: the peak block is where "
               f"retrieving the true translation among the {n} by cosine ranks it highest (mean reciprocal rank, "
               "both directions); its interval is the percentile interval of that block over resamples of the "
               "pairs. Measures at the peak block are means over pairs (and directions)."),
         ("table", pd.DataFrame(rows))]
    if len(steps) > 1:
        b.append(("p", _peak_moved(t, steps[0], steps[-1])))
    return b + [("figure", f) for f in figures if f.stem.startswith("alignment")]


def _peak_moved(t: pd.DataFrame, first: int, last: int) -> str:
    shift = alignment.peak_shift(t, first, last)
    said = (f"peak block at step {last} minus at step {first}: {shift.estimate:+.0f} blocks "
            f"(95% interval [{shift.low:+.0f}, {shift.high:+.0f}], the same pairs resampled for both)")
    if shift.excludes(0):
        return f"Fine-tuning moved the meeting point: {said}."
    return f"These pairs do not show that fine-tuning moved the meeting point: {said}, an interval that includes 0."


def probe_ks(swept) -> list[int]:
    """The swept k nearest a third of the blocks (and nearest a tenth): where ends are compared. The
    adaptive grid scores the two a full grid gives (`pipeline.read_ks`), so both read the same k's."""
    ks = sorted(set(int(k) for k in swept) - {0})
    n = int(max(ks)) if ks else 0
    return sorted({min(ks, key=lambda k: abs(k - n / 10)), min(ks, key=lambda k: abs(k - n / 3))}) if ks else []


def _selections(out: Path, cfg: StudyConfig) -> list[tuple]:
    blocks = []
    for name in ("fixed", "budget"):
        path = out / f"selection-{name}.json"
        if not path.is_file():
            if name == "budget" and not derives_budget(cfg.row_list()):
                blocks.append(("p", "**budget**: not derived: no row of this study trains it (the `budget` row "
                                    "in `rows` adds the rule's search and its row)."))
            continue
        sel = io.read_json(path)
        if "error" in sel:
            used = (f" The fixed CogSym set, blocks {sel['layers_arg']}, was trained in its place (budget_no_set = "
                    f"fixed): its row reads \"{FIXED_USED}\"." if sel.get("fallback") == "fixed" else
                    " Its row was not trained (budget_no_set = skip); the comparison table says why.")
            blocks.append(("p", f"**{name}**: no set. {sel['error'].rstrip('.')}." + (used if name == "budget" else "")))
            continue
        text = (f"**{name}**: blocks {sel['layers_arg']} ({len(sel['layers'])} of {sel['n_layers']}, "
                f"k_in = {sel['k_in']}, k_out = {sel['k_out']}).")
        if name == "budget":
            ev = sel.get("evidence", {})
            of = ("gains" if sel.get("params", {}).get("gain", "total") == "total" else
                  "rises in conditional gain (the part of the gain that uses the source)")
            text += (f" Smallest outer set whose middle-reverted model keeps at least tau = {ev.get('tau')} of both "
                     f"{of}; {ev.get('n_evaluated')} candidates evaluated.")
        blocks.append(("p", text))
    return blocks


COMPARE_COLUMNS = ["row", "blocks", "trainable_params", "optimizer_bytes", "sec_per_step", "peak_mem_mb",
                   "perception_nll", "production_nll", "perception_conditional_gain", "production_conditional_gain",
                   "perception_share", "production_share",
                   "chrf_perception", "chrf_production", "chrf_perception_share", "chrf_production_share"]


def _compare_table(compare: pd.DataFrame, missing: dict[str, str] | None = None,
                   study: Path | None = None) -> pd.DataFrame:
    """One line per row (its blocks per seed where they differ); with several seeds, numbers are
    'mean ± std', and sec_per_step mixes processors where the seeds ran on different ones (the ratios
    below do not). A planned row with no comparison gets its line too, saying why (`missing`); a budget
    row that trained the fixed set is named so (`rows.label`, from the `study` folder's selection)."""
    lines = []
    for row, g in compare.groupby("row", sort=False):
        line = {"row": label(row, study), "blocks": evidence_tables.blocks_per_seed(compare, row)}
        for col in COMPARE_COLUMNS[2:]:
            v = g[col].astype(float)
            line[col] = _fmt(v.mean(), col) + (f" ± {_fmt(v.std(), col)}" if len(v) > 1 else "")
        lines.append(line)
    lines += [{"row": row, "blocks": why, **{col: "" for col in COMPARE_COLUMNS[2:]}}
              for row, why in (missing or {}).items() if row not in set(compare["row"])]
    return pd.DataFrame(lines)


def not_compared(compare: pd.DataFrame, cfg: StudyConfig, out: Path) -> dict[str, str]:
    """Every planned row with a seed the comparison lacks, and why: a row that could not run (no budget
    set) says so, one still to run says how to continue. No row leaves the tables without a reason."""
    done = set(zip(compare["row"], compare["seed"].astype(int)))
    missing = {}
    for row in cfg.row_list():
        seeds = [s for s in cfg.seed_list() if (row, s) not in done]
        if not seeds:
            continue
        try:
            plan(row, n_layers=block_count(cfg.model), fraction=cfg.fraction, lora_r=cfg.lora_r, seed=seeds[0],
                 study=out)
            why = "not compared yet: rerun the same command to continue"
        except Skip as e:
            why = f"not run: {e}"
        missing[row] = why + (f" (seeds {', '.join(map(str, seeds))})" if len(cfg.seed_list()) > 1 else "")
    return missing


def _fmt(x: float, col: str) -> str:
    if not np.isfinite(x):
        return "n/a"
    if col == "trainable_params":
        return f"{x / 1e6:.2f}M"
    if col == "optimizer_bytes":
        return f"{x / 2**20:.0f} MiB"
    if col.endswith("share"):
        return f"{x:.1%}"
    return f"{x:.3f}" if col.endswith(("nll", "gain")) else f"{x:.1f}" if col != "sec_per_step" else f"{x:.2f}"


def pooled(out: Path, cfg: StudyConfig) -> dict:
    """A study of several seeds read as the evidence headline reads it: {label, found (its comparisons,
    `evidence_tables.rows_of`), own (every row's own numbers, `own_rows`)}, the same calls and so the
    same numbers as the README's cells for this study."""
    label = cfg.corpus
    study = evidence_tables.read(out)
    found = pd.DataFrame(evidence_tables.rows_of(label, study, evidence_tables.QUESTIONS),
                         columns=evidence_tables.COLUMNS)
    own = pd.DataFrame(evidence_tables.own_rows(label, study), columns=evidence_tables.COLUMNS)
    return dict(label=label, found=found, own=own)


POOLED = "The comparisons that matter, pooled over seeds"


def _pooled_verdicts(study: dict, cfg: StudyConfig) -> list[tuple]:
    """The headline's table and sentences for this study: the verdicts the README states for it."""
    found = study["found"]
    if found.empty:
        return []
    table = evidence.headline_table(found, evidence.planned_questions([cfg]))   # only the questions it asks
    return [("h2", POOLED),
            ("p", "The same cells as the README headline for this study (the evidence tables, "
                  "`analyses/evidence.py`, compute them with the same calls), every seed pooled; the study's "
                  "sentences below state these, not one seed's."),
            ("p", table)] + [("p", s) for s in evidence.sentences(found)]


def step_time_ratio(compare: pd.DataFrame, machines: dict[str, str], row: str) -> str:
    """The row's step time over full fine-tuning's, from the seeds on which both trained on the same
    recorded processor (`runfolder.machine`, kept per stage in study.json); none: not compared."""
    ratios, where = [], set()
    for seed in sorted(set(compare.loc[compare["row"] == row, "seed"])):
        mine, full = (machines.get(f"tune {arm(r, seed)}") for r in (row, "full"))
        got = compare[(compare["seed"] == seed) & compare["row"].isin([row, "full"])].set_index("row")["sec_per_step"]
        if mine is not None and mine == full and {row, "full"} <= set(got.index):
            ratios.append(got[row] / got["full"])
            where.add(f"seed {seed} on {mine}")
    if not ratios:
        return ("step time not compared: no seed trained it and full fine-tuning on the same recorded processor")
    return f"{np.mean(ratios):.2f}x its step time ({'; '.join(sorted(where))})"


def _compare_findings(compare: pd.DataFrame, base: pd.Series, out: Path, study: dict | None = None,
                      machines: dict[str, str] | None = None) -> list[str]:
    machines = machines or {}
    mean = compare.groupby("row").mean(numeric_only=True)
    if "full" not in mean.index:
        return ["Full fine-tuning has no row, so no shares can be computed."]
    full = mean.loc["full"]
    lines, tasks = [], []
    for task in TASKS:
        if full[f"{task}_nll"] < base[f"{task}_nll"]:
            tasks.append(task)
            continue
        by_nll = ", ".join(f"{s} {mean.loc[s, f'{task}_nll']:.3f}" for s in mean.index)
        lines.append(f"Full fine-tuning did not lower {task} NLL on the test pairs ({base[f'{task}_nll']:.3f} -> "
                     f"{full[f'{task}_nll']:.3f} nats/token), so {task} has no share of a gain; the NLLs: {by_nll}.")
    table = _intervals(out, compare)
    if table is None:
        return lines + ["No per-example scores (scores.parquet), so no intervals and no findings; rerun the "
                        "comparison stage."]
    own = None if study is None else study["own"].set_index(["row", "task", "quantity"])
    for row in [s for s in ("cogsym", "cogsym-ends", "cogsym-lora", "budget", "lora") if s in mean.index and tasks]:
        r = mean.loc[row]
        parts = []
        for task in tasks:
            got = (_pick(table, row, task) if own is None else
                   {q: own.loc[(row, task, q)] for q in ("share", "rel_deviation") if (row, task, q) in own.index})
            if "share" in got and "rel_deviation" in got:
                parts.append(f"{task}: share of the gain {evidence.cell(got['share'], 'share')}, NLL relative "
                             f"deviation {evidence.cell(got['rel_deviation'], 'rel_deviation')}, "
                             f"{verdicts.within_bar(got['rel_deviation'])}")
        lines.append(f"**{label(row, out)}** ({r['trainable_params'] / full['trainable_params']:.1%} of full "
                     f"fine-tuning's trainable parameters, {step_time_ratio(compare, machines, row)}): "
                     + "; ".join(parts) + ".")
    if study is not None:   # the differences: pooled, in the section above, as the README states them
        return lines + [f"Every comparison against another row, pooled over the seeds: \"{POOLED}\" above."]
    for row, others in verdicts.DIFFERENCES.items():
        for other in [o for c in others for o in (_draws(mean.index) if c == "random" else [c])]:
            if {row, other} <= set(mean.index) and tasks:
                lines.append(_difference_line(table, row, other, tasks))
    for row, other in verdicts.RELATIVE_TO.items():
        if {row, other} <= set(mean.index) and tasks:
            parts = [f"{task} {verdicts.fmt(got, True)}: {verdicts.within_bar(got).replace('full fine-tuning', other)}"
                     for task in tasks if (got := _pick(table, row, task).get(f"rel_deviation_vs_{other}")) is not None]
            lines.append(f"**{row}** against **{other}** (NLL relative deviation): " + "; ".join(parts) + ".")
    return lines


def _draws(rows) -> list[str]:
    return sorted(r for r in rows if kind(r) == "random")


def _difference_line(table: pd.DataFrame, row: str, other: str, tasks: list[str]) -> str:
    """share(row) - share(other), per task, worded as far as its interval allows."""
    parts = []
    for task in tasks:
        got = _pick(table, row, task).get(f"share_minus_{other}")
        if got is not None:
            parts.append(f"{task} {verdicts.fmt(got, True)}: " + verdicts.difference_words(
                got, f"{row} does better", f"{other} does better"))
    return f"{row}'s share minus **{other}**'s: " + "; ".join(parts) + "."


def _intervals(out: Path, compare: pd.DataFrame) -> pd.DataFrame | None:
    path = out / SCORES
    if not path.is_file():
        return None
    rows = list(compare[["row", "seed"]].itertuples(index=False, name=None))
    return verdicts.comparison_table(pd.read_parquet(path), rows)


def _pick(table: pd.DataFrame, row: str, task: str) -> dict:
    """{quantity: line of `table`} of a comparison row and task: the mean over seeds (seed -1) where the
    table has it, else the first seed's (the paired differences are per seed)."""
    rows = table[(table["row"] == row) & (table["task"] == task)]
    first = rows[rows["seed"] == rows.loc[rows["seed"] >= 0, "seed"].min()]
    return {r["quantity"]: r for _, r in pd.concat([first, rows[rows["seed"] == -1]]).iterrows()}


def _chrf(out: Path, full: str) -> dict:
    """{(arm, task): "chrF [low, high]"} from translations.parquet (empty without it)."""
    path = out / TRANSLATIONS
    if not path.is_file():
        return {}
    t = chrf_intervals(pd.read_parquet(path), full)
    t = t[t["quantity"] == "chrf"]
    return {(r["arm"], r["task"]): f"{r['estimate']:.1f} [{r['low']:.1f}, {r['high']:.1f}] ({int(r['n_pairs'])})"
            for _, r in t.iterrows()}


def interval_table(out: Path, study: dict | None = None) -> pd.DataFrame | None:
    """One line per row and task: NLL, conditional gain (and its change from the base's), share, relative
    deviation and chrF with 95% intervals: pooled over the seeds where `study` is given (`pooled`, the
    README's numbers), else the one seed's."""
    compare = io.read_parquet(out / COMPARE)
    if study is not None:
        return _pooled_interval_table(out, compare, study)
    table = _intervals(out, compare)
    if table is None or table.empty:
        return None
    scores = pd.read_parquet(out / SCORES)
    table_cg = verdicts.conditional_gain_table(scores)
    cond = table_cg[table_cg["quantity"] == "conditional_gain"].set_index(["arm", "task"])
    change = table_cg[table_cg["quantity"] == "conditional_gain_change"].set_index(["arm", "task"])
    seed = table.loc[table["seed"] >= 0, "seed"].min()
    chrf = _chrf(out, arm("full", seed))
    rows = [dict(row="base model", task=task, n_pairs=int(cond.loc[("base", task), "n_pairs"]), nll="",
                 conditional_gain=verdicts.fmt(cond.loc[("base", task)]), conditional_gain_change="", share="",
                 rel_deviation="", chrf=chrf.get(("base", task), "n/a"))
            for task in TASKS if ("base", task) in cond.index]
    for (row, task), g in table[table["seed"] == seed].groupby(["row", "task"], sort=False):
        got = {r["quantity"]: r for _, r in g.iterrows()}
        arm_task = (arm(row, seed), task)
        rows.append(dict(row=label(row, out), task=task, n_pairs=int(g["n_pairs"].iloc[0]),
                         nll=verdicts.fmt(got["nll"]),
                         conditional_gain=verdicts.fmt(cond.loc[arm_task]) if arm_task in cond.index else "n/a",
                         conditional_gain_change=(verdicts.fmt(change.loc[arm_task]) if arm_task in change.index
                                                  else "n/a"),
                         share=verdicts.fmt(got["share"], True) if "share" in got else "n/a",
                         rel_deviation=verdicts.fmt(got["rel_deviation"], True) if "rel_deviation" in got else "n/a",
                         chrf=chrf.get(arm_task, "n/a")))
    return pd.DataFrame(rows)


POOLED_COLUMNS = ["nll", "conditional_gain", "conditional_gain_change", "share", "rel_deviation", "chrf",
                  "chrf_rel_deviation"]


def _pooled_interval_table(out: Path, compare: pd.DataFrame, study: dict) -> pd.DataFrame:
    """`interval_table` over the seeds: every cell from the evidence tables' own rows of this study; ""
    where a quantity has no meaning (full fine-tuning against itself), never n/a where the data exist."""
    own = study["own"].set_index(["row", "task", "quantity"])
    chrf = _chrf(out, arm("full", int(compare["seed"].min())))
    scores = pd.read_parquet(out / SCORES)
    lines = []
    for row in ["base", *dict.fromkeys(compare["row"])]:
        for task in TASKS:
            got = {q: evidence.cell(own.loc[(row, task, q)], q) for q in POOLED_COLUMNS if (row, task, q) in own.index}
            if not got:
                continue
            n_chrf = own.loc[(row, task, "chrf"), "n_pairs"] if (row, task, "chrf") in own.index else None
            if row == "base":   # the base model: one arm, its own NLL and chrF intervals over the pairs
                got["nll"] = verdicts.fmt(vars(intervals.nll(intervals.arms(scores, ["base"], task=task), "base")))
            if row == "base" and ("base", task) in chrf:
                got["chrf"], n_chrf = chrf[("base", task)].rsplit(" (", 1)[0], chrf[("base", task)].rsplit("(", 1)[1][:-1]
            lines.append(dict(row="base model" if row == "base" else label(row, out), task=task,
                              n_pairs=int(own.loc[(row, task, "conditional_gain"), "n_pairs"])
                              if (row, task, "conditional_gain") in own.index else "",
                              **{q: got.get(q, "") for q in POOLED_COLUMNS},
                              n_chrf="" if n_chrf is None else int(n_chrf)))
    return pd.DataFrame(lines)


def _caveats(cfg: StudyConfig) -> str:
    embedded = ("The embedded model's weights are dequantised from a 4-bit GGUF, not the original bf16. "
                if cfg.model == EMBEDDED else "")
    n_seeds = len(cfg.seed_list())
    return ("Shares are (base NLL - run NLL) / (base NLL - full-FT NLL) per seed; a share above 100% means the run "
            "beat full fine-tuning on that held-out set. chrF shares use the same ratio on chrF. " + embedded +
            "Sweeps keep embeddings, final norm and LM head at the checkpoint (revert mode). A share is n/a where "
            "full fine-tuning did not gain (chrF: by at least 1 point). With "
            f"{cfg.steps} steps, {n_seeds} seed(s) per row and {cfg.eval_pairs} test pairs, differences of a "
            "few points are within noise; `--preset paper` runs 400 steps, 256 pairs and 3 seeds.")


# --- rendering ----------------------------------------------------------------------------


def _md_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "---|" * len(df.columns))
    return "\n".join(lines)


def markdown(blocks) -> str:
    """A report's blocks ((kind, value): h1, h2, p, table, figure) as markdown."""
    out = []
    for kind, value in blocks:
        out.append({"h1": lambda v: f"# {v}", "h2": lambda v: f"## {v}", "p": lambda v: v,
                    "table": _md_table, "figure": lambda v: f"![{v.stem}](figures/{v.name})"}[kind](value))
    return "\n\n".join(out) + "\n"


def _html(blocks) -> str:
    body = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            text = html.escape(value)
            while "**" in text:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            body.append(f"<p>{text}</p>")
        elif kind == "table":
            body.append(value.to_html(index=False, border=0))
        else:
            body.append(f'<figure><img src="figures/{value.name}" alt="{value.stem}"><figcaption>{value.stem}'
                        "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{padding:3px 8px;border-bottom:1px solid #ddd}"
             "img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + \
        "\n".join(body) + "</body></html>\n"
