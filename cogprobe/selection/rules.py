"""Layer selection: which blocks to tune, from a fixed rule or from the model's own evidence.

Three rules, each returning a `Selection` (`cogprobe select` saves it as selection.json):
- `fixed`: the CogSym rule of the training loop, round(f*L) outermost blocks, the
  input end taking the odd one (see `layersets.cogsym`). Needs no sweep.
- `curves`: from a `revert` sweep at one checkpoint. Reverting all L blocks removes
  the gain G = nll(k=L) - nll(k=0). Criterion `remove` (the default: where is the
  gain *needed*): k_in is the smallest k whose reverted input end removes at least
  tau*G of the input task's gain, k_out likewise for the output task from the
  output end. Criterion `keep` (where does the gain *suffice*): k_in is the smallest
  k such that the first k blocks alone, every other block reverted, keep at least
  tau*G (read from the output-direction curve at L-k), k_out likewise for the last
  k blocks. Both read the same sweep; when the blocks compensate for each other
  (reverting one end is repaired by the rest), `remove` needs nearly every block
  and `keep` is the informative one. The set is [0, k_in) ∪ [L-k_out, L).
- `budget`: the smallest outer set whose middle-reverted model (`keep-outer`)
  keeps at least tau of the gain of every task. Among the passing candidates of
  the smallest size, the largest worst-task share wins; on a tie, the smaller k_in
  (fewer early blocks means a shorter backward pass when training). Two searches
  find it. `exhaustive` scores every candidate of each size, smallest first, until
  one passes: (s+1)(s+2)/2 candidates for an answer of size s. `frontier` (the
  default) relies on passing being monotone (keeping more blocks of the checkpoint
  keeps more of its gain, so a superset of a passing set passes): then only the
  smallest passing k_out of each k_in matters, found by bisection and then a
  staircase, about 2s candidates plus a few per improvement. Monotonicity is an assumption about a
  noisy, finite evaluation set, so every pair of scored candidates is checked for a
  passing set whose superset fails; any such pair is recorded and the search falls
  back to the exhaustive one (reusing what it already scored, and scoring every candidate up to
  the walk's size in one engine call, so that the engine shares their prefixes).

The curves and budget rules locate the total gain of tuning by default; `gain="conditional"` locates
the rise in conditional gain instead (the part of the gain that uses the source sentence, read from
the shuffled-source controls: `probe.conditional`). Everything else is the same.

A share counts as reaching tau when it is at least tau * (1 - 1e-9), so that
tau = 1 accepts the full set despite float rounding. Every rule fails with one
line (a CogprobeError) rather than emit a set its evidence does not support.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd

from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import DEFAULT_FRACTION, check_fraction, cogsym, outer, to_string
from cogprobe.probe.conditional import GAINS, conditional_rows
from cogprobe.probe.sweep import check_one_engine
from cogprobe.data.tasks import TASKS
from cogprobe.selection.options import CRITERIA, SEARCHES, TAU, SelectOptions

EPS = 1e-9
OTHER_END = {"input": "output", "output": "input"}
FULL_GRID = "rerun the sweep with the full grid (omit --ks; in a study, sweep_grid = \"full\")"
MAX_REPORTED = 20  # monotonicity violations listed in selection.json (all are counted)


@dataclass
class Selection:
    rule: str
    params: dict
    n_layers: int
    layers: list[int]
    k_in: int
    k_out: int
    evidence: dict                  # the values that decided, per rule
    candidates: list[dict] = field(default_factory=list)  # budget: every evaluated candidate
    stability: dict | None = None   # the rule on resamples of the probe pairs (see `stability`)

    def to_json(self) -> dict:
        """Everything above plus the ready-to-use forms for `cogprobe train` and peft."""
        return dict(rule=self.rule, params=self.params, n_layers=self.n_layers, layers=list(self.layers),
                    k_in=self.k_in, k_out=self.k_out, fraction=len(self.layers) / self.n_layers,
                    layers_arg=to_string(self.layers), layers_to_transform=list(self.layers),
                    evidence=self.evidence, candidates=self.candidates, stability=self.stability)

    def table(self) -> str:
        """A short evidence table for the CLI."""
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        head = (f"rule {self.rule} ({params}): blocks {to_string(self.layers)} "
                f"({len(self.layers)} of {self.n_layers}, {len(self.layers) / self.n_layers:.0%})")
        if self.rule == "curves":
            rows = pd.DataFrame([{key: e[key] for key in ("end", "task", "k", "nll_k0", "nll_kL", "share",
                                                          "share_k_minus_1")}
                                 for e in self.evidence["ends"]])
            head += ("\nshare: of the gain of reverting every block, the share that reverting only the end's k "
                     "blocks removes" if self.params["criterion"] == "remove" else
                     "\nshare: of the gain of reverting every block, the share that the end's k blocks keep "
                     "on their own")
        elif self.rule == "budget":
            size = self.k_in + self.k_out
            rows = pd.DataFrame([{"k_in": c["k_in"], "k_out": c["k_out"], **c["shares"], "passed": c["passed"]}
                                 for c in self.candidates if c["k_in"] + c["k_out"] == size])
            best = self.evidence["best_smaller_share"]
            head += (f"\nsmaller sizes: {self.evidence['n_evaluated'] - len(rows)} candidates, best worst-task share "
                     + ("-" if best is None else f"{best:.4f}") + f" (< tau={self.params['tau']})")
        else:
            return head
        return head + "\n" + rows.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def select_fixed(n_layers: int, fraction: float = DEFAULT_FRACTION) -> Selection:
    """The training loop's CogSym rule, for when no sweep exists."""
    layers = cogsym(n_layers, fraction)   # [0, ceil(n/2)) and the last floor(n/2) blocks
    k_in = math.ceil(len(layers) / 2)
    k_out = len(layers) - k_in
    return Selection("fixed", {"fraction": fraction}, n_layers, layers, k_in, k_out,
                     {"n_blocks": len(layers), "rule": "round(f*L) outermost blocks, the input end takes the odd one"})


def _check_tau(tau: float) -> float:
    return check_fraction(tau, "tau (the share of the gain to keep)")


# said after a rule's name in its errors: on the conditional gain, the NLL columns hold NLL(true) - NLL(shuffled)
_ON = {"total": "", "conditional": " on the conditional gain (its NLLs: true-source minus shuffled-source NLL)"}


def _check_gain_name(gain: str) -> str:
    if gain not in GAINS:
        raise CogprobeError(f"unknown gain {gain!r}; use {' or '.join(GAINS)}")
    return gain


def _check_gain(task: str, nll_ref: float, nll_ck: float, where: str) -> None:
    if math.isnan(nll_ref) or math.isnan(nll_ck):
        raise CogprobeError(f"{where}: task {task!r} has NaN scores (reference {nll_ref}, checkpoint {nll_ck}); "
                            "check the model and data, then rerun the sweep")
    if nll_ck >= nll_ref:
        raise CogprobeError(f"{where}: the checkpoint did not improve on the reference for task {task!r} "
                            f"(nll_checkpoint {nll_ck:.4f} >= nll_reference {nll_ref:.4f}); "
                            "train longer or choose a later checkpoint")


def select_curves(sweeps: pd.DataFrame, *, tau: float = TAU, step: int | None = None,
                  input_task: str = SelectOptions.input_task, output_task: str = SelectOptions.output_task,
                  n_layers: int | None = None, ends: bool | None = None,
                  criterion: str = SelectOptions.criterion, gain: str = SelectOptions.gain) -> Selection:
    """k_in, k_out from the revert curves at `step` (default: the last step in the table), of the total
    gain or (`gain="conditional"`) of the rise in conditional gain (`probe.conditional`)."""
    tau, gain = _check_tau(tau), _check_gain_name(gain)
    if criterion not in CRITERIA:
        raise CogprobeError(f"unknown criterion {criterion!r}; use remove or keep")
    need = {"checkpoint_step", "task", "direction", "mode", "k", "nll", "nll_reference", "nll_checkpoint"}
    if not need <= set(sweeps.columns):
        raise CogprobeError(f"the sweep table lacks columns {sorted(need - set(sweeps.columns))}; "
                            "give the sweeps.parquet that `cogprobe sweep` wrote")
    check_one_engine(sweeps, "the sweep table")
    rows = sweeps[sweeps["mode"] == "revert"]
    if rows.empty:
        raise CogprobeError("the sweep table has no revert rows; run `cogprobe sweep RUN --mode revert` first")
    if ends is None and "ends" in rows.columns and rows["ends"].nunique() > 1:
        raise CogprobeError("the sweep table mixes sweeps with and without --ends; pass ends=True or ends=False")
    if ends is not None and "ends" in rows.columns:
        rows = rows[rows["ends"] == ends]
    steps = sorted(rows["checkpoint_step"].unique())
    step = int(steps[-1]) if step is None else int(step)
    if step not in steps:
        raise CogprobeError(f"no revert rows at checkpoint step {step}; the table has steps {[int(s) for s in steps]}")
    rows = rows[rows["checkpoint_step"] == step]
    L = _infer_layers(rows) if n_layers is None else n_layers
    where = f"curves at step {step}" + _ON[gain]
    rows = conditional_rows(rows) if gain == "conditional" else rows
    found = [_end_k(rows, "input", input_task, tau, L, where, criterion),
             _end_k(rows, "output", output_task, tau, L, where, criterion)]
    k_in, k_out = found[0]["k"], found[1]["k"]
    return Selection("curves", dict(tau=tau, step=step, input_task=input_task, output_task=output_task,
                                    criterion=criterion, gain=gain),
                     L, outer(L, k_in, k_out), k_in, k_out,
                     {"ends": found, "step": step, "tau": tau, "criterion": criterion})


def _infer_layers(rows: pd.DataFrame) -> int:
    """L: the largest k, or one past the largest block a row names (an output row names L-1 at any k)."""
    texts = rows["blocks"].dropna() if "blocks" in rows.columns else []
    named = [int(b) for text in texts for b in re.findall(r"\d+", str(text))]
    return max([int(rows["k"].max())] + [b + 1 for b in named])


def _end_k(rows: pd.DataFrame, end: str, task: str, tau: float, L: int, where: str, criterion: str) -> dict:
    """The smallest k of this end whose blocks account for >= tau of the gain of reverting all blocks:
    removed when they alone are reverted (`remove`), kept when they alone are not (`keep`)."""
    direction = end if criterion == "remove" else OTHER_END[end]
    curve = rows[(rows["direction"] == direction) & (rows["task"] == task)]
    if curve.empty:
        raise CogprobeError(f"{where}: no revert rows for task {task!r}, direction {direction}; "
                            "sweep that task and direction, or pick another task for this end")
    if curve["k"].duplicated().any():
        raise CogprobeError(f"{where}: task {task!r}, direction {direction} has several rows per k; "
                            "filter the table to one sweep")
    _check_gain(task, float(curve["nll_reference"].iloc[0]), float(curve["nll_checkpoint"].iloc[0]), where)
    nll = curve.set_index("k")["nll"].sort_index()
    if nll.isna().any():
        bad = [int(k) for k in nll.index[nll.isna()]]
        raise CogprobeError(f"{where}: the {task} curve ({direction}) has NaN at k={bad}; "
                            "check the model and rerun the sweep")
    missing = [k for k in (0, L) if k not in nll.index]
    if missing:
        raise CogprobeError(f"{where}: the {task} curve ({direction}) lacks k={missing}; {FULL_GRID}")
    total = nll[L] - nll[0]
    if total <= 0:
        raise CogprobeError(f"{where}: reverting all {L} blocks removes no {task} gain "
                            f"(nll {nll[L]:.4f} at k={L} vs {nll[0]:.4f} at k=0): the gain is not in the blocks; "
                            "sweep with --ends or use --rule fixed")
    if criterion == "remove":
        share = (nll - nll[0]) / total                   # by k: reverted blocks of this end
    else:
        share = ((nll[L] - nll) / total)                 # by L - k: the blocks of this end that stay
        share.index = L - share.index
        share = share.sort_index()
    k = int(next(k for k, s in share.items() if s >= tau * (1 - EPS)))
    gaps = [j for j in range(k) if j not in share.index]
    if gaps:
        raise CogprobeError(f"{where}: the {task} curve ({direction}) reaches tau at k={k} but lacks k={gaps}, "
                            f"so a smaller k may do; {FULL_GRID}")
    return dict(end=end, direction=direction, task=task, k=k, nll_k0=float(nll[0]), nll_kL=float(nll[L]),
                gain=float(total), criterion=criterion, share=float(share[k]),
                share_k_minus_1=float(share[k - 1]) if k > 0 else None,
                nll_reference=float(curve["nll_reference"].iloc[0]),
                nll_checkpoint=float(curve["nll_checkpoint"].iloc[0]),
                curve=[{"k": int(j), "share": float(s)} for j, s in share.items()])


def select_budget(evaluate: Callable[[list[tuple[int, int]]], pd.DataFrame], n_layers: int, *,
                  tau: float = TAU, tasks: Sequence[str] = TASKS,
                  max_total: int | None = None, search: str = SelectOptions.search,
                  known: pd.DataFrame | None = None, gain: str = SelectOptions.gain) -> Selection:
    """The smallest (k_in, k_out) whose middle-reverted model keeps >= tau of every task's gain.

    `search`: `frontier` (default) walks the pass/fail frontier, `exhaustive` scores every
    candidate of each size until one passes; both return the same set when passing is monotone
    (see the module docstring), and the frontier walk falls back to the exhaustive search when the
    candidates it knows show that it is not. `known`: candidates scored elsewhere, as rows like
    `evaluate` returns (a revert sweep's curves are the k_in = 0 and k_out = 0 candidates, see
    `sweep_candidates`): used instead of scoring them again, and checked for monotonicity with
    the rest (a walk's own candidates can never contradict it; the sweep's whole edges can).
    `gain="conditional"`: the shares are of the rise in conditional gain, so `evaluate` (and `known`)
    must give each task's shuffled-source control rows too (`probe.conditional`).
    """
    tau, tasks, gain = _check_tau(tau), list(tasks), _check_gain_name(gain)
    if not tasks:
        raise CogprobeError("budget needs at least one task, e.g. tasks=('perception', 'production')")
    if search not in SEARCHES:
        raise CogprobeError(f"unknown budget search {search!r}; use {' or '.join(SEARCHES)}")
    max_total = n_layers if max_total is None else max_total
    if not 0 <= max_total <= n_layers:
        raise CogprobeError(f"max_total={max_total} is outside 0..{n_layers} (the model has {n_layers} blocks)")
    scorer = _Scorer(evaluate, tasks, tau, gain)
    if known is not None and len(known):
        scorer.add_known(known, max_total)
    size = _frontier(scorer, max_total) if search == "frontier" else _exhaustive(scorer, max_total)
    violations = monotone_violations(scorer.records)
    fell_back = search == "frontier" and bool(violations)
    if fell_back:
        size = _exhaustive(scorer, max_total, upto=max_total if size is None else size)
    candidates = scorer.records
    if size == 0:
        raise CogprobeError(f"with every block reverted the checkpoint still keeps >= tau={tau} of the gain of "
                            f"{', '.join(tasks)}: the gain is not in the blocks; raise tau or use --rule fixed")
    if size is None:
        best = max(candidates, key=lambda c: c["min_share"])
        raise CogprobeError(f"no outer set of up to {max_total} blocks keeps tau={tau} of every task's gain "
                            f"(best worst-task share {best['min_share']:.3f} at k_in={best['k_in']}, "
                            f"k_out={best['k_out']}); lower --tau, raise --max-total or train longer")
    passed = [c for c in candidates if c["passed"] and c["k_in"] + c["k_out"] == size]
    best = max(passed, key=lambda c: (c["min_share"], -c["k_in"]))
    smaller = [c["min_share"] for c in candidates if c["k_in"] + c["k_out"] < size]
    evidence = dict(tau=tau, tasks=tasks, size=size, n_evaluated=len(candidates),
                    n_scored=sum(c["source"] == "scored" for c in candidates), chosen=best,
                    best_smaller_share=max(smaller) if smaller else None, search=search,
                    monotone_violations=violations[:MAX_REPORTED], n_monotone_violations=len(violations),
                    fell_back_to_exhaustive=fell_back)
    return Selection("budget", dict(tau=tau, tasks=tasks, max_total=max_total, search=search, gain=gain), n_layers,
                     outer(n_layers, best["k_in"], best["k_out"]), best["k_in"], best["k_out"], evidence, candidates)


class _Scorer:
    """Scores candidates through `evaluate`, each once: a list of pairs is one call (the engine
    shares their prefixes), and a pair scored before is answered from memory."""

    def __init__(self, evaluate, tasks: list[str], tau: float, gain: str = SelectOptions.gain):
        self.evaluate, self.tasks, self.tau, self.gain = evaluate, tasks, tau, gain
        self.found: dict[tuple[int, int], dict] = {}

    def _view(self, table: pd.DataFrame) -> pd.DataFrame:
        return conditional_rows(table) if self.gain == "conditional" else table

    @property
    def records(self) -> list[dict]:
        return list(self.found.values())   # in the order they were scored

    def __call__(self, pairs: list[tuple[int, int]]) -> list[dict]:
        new = [p for p in dict.fromkeys(pairs) if p not in self.found]
        if new:
            for record in _score_candidates(self._view(self.evaluate(new)), new, self.tasks, self.tau,
                                            "budget" + _ON[self.gain]):
                self.found[(record["k_in"], record["k_out"])] = dict(record, source="scored")
        return [self.found[p] for p in pairs]

    def add_known(self, table: pd.DataFrame, max_total: int) -> None:
        """Candidates scored elsewhere (every task present), up to max_total blocks."""
        pairs = sorted({(int(a), int(b)) for a, b in zip(table["k_in"], table["k_out"]) if a + b <= max_total})
        for record in _score_candidates(self._view(table), pairs, self.tasks, self.tau, "budget" + _ON[self.gain]):
            self.found[(record["k_in"], record["k_out"])] = dict(record, source="known")

    def passes(self, k_in: int, k_out: int) -> bool:
        return self([(k_in, k_out)])[0]["passed"]


def _exhaustive(scorer: _Scorer, max_total: int, upto: int | None = None) -> int | None:
    """The smallest size with a passing candidate, scoring every candidate of each size in turn.

    `upto`: a size known to hold a passing candidate (the frontier walk's answer), or max_total:
    every candidate up to it is then scored in one call first, since the search reaches that size
    anyway unless a smaller one passes. One call lets the engine share every prefix among them (a
    call per size recomputes the prefixes its cache could not keep: at 48 pairs the quick study's
    fallback cost 232 s that way); the same block calls on the same states, so the same scores.
    """
    if upto is not None:
        scorer([(k_in, size - k_in) for size in range(upto + 1) for k_in in range(size + 1)])
    for size in range(max_total + 1):
        if any(c["passed"] for c in scorer([(k_in, size - k_in) for k_in in range(size + 1)])):
            return size
    return None


def _frontier(scorer: _Scorer, max_total: int) -> int | None:
    """The smallest size with a passing candidate, if passing is monotone (a superset of a passing
    set passes): for each k_in, the smallest passing k_out is all that matters.

    Until a first set passes, each k_in checks the largest k_out max_total allows and, if that
    passes, searches down for its smallest passing k_out. After that, with `best` the smallest
    passing size so far, a k_in only needs two candidates, (k_in, best - k_in - 1) (could it do
    better?) and (k_in, best - k_in) (does it tie?: ties are scored so the best worst-task share
    among them can win), searching further down when the first passes. k_in stops at best. About
    2 * best candidates plus a few per improvement, against (best + 1)(best + 2) / 2 for the
    exhaustive search. For a tiny answer the exhaustive one can be cheaper (size 3 of 10 blocks in
    the tests: 10 against 12); for the quick study's size 10 of 30: 17 scored (25 more read from the
    sweep) against 66.
    """
    best = None
    for k_in in range(max_total + 1):
        if best is not None and k_in > best:
            break
        if best is None:     # nothing passed yet: can this k_in pass within max_total at all?
            if scorer.passes(k_in, max_total - k_in):
                best = k_in + _smallest_passing(scorer, k_in, max_total - k_in)
            continue
        k_out = best - k_in
        scorer([(k_in, k_out - 1), (k_in, k_out)] if k_out >= 1 else [(k_in, k_out)])
        if k_out >= 1 and scorer.passes(k_in, k_out - 1):
            best = k_in + _smallest_passing(scorer, k_in, k_out - 1)
    return best


def _smallest_passing(scorer: _Scorer, k_in: int, hi: int) -> int:
    """The smallest k_out that passes with k_in, given that `hi` does: steps down 1, 2, 4, ... until
    one fails (a staircase: the frontier usually drops by a block or two per k_in), then bisects."""
    step, lo = 1, 0
    while hi - step >= 0:
        if not scorer.passes(k_in, hi - step):
            lo = hi - step + 1
            break
        hi, step = hi - step, step * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if scorer.passes(k_in, mid) else (mid + 1, hi)
    return hi


def monotone_violations(records: list[dict]) -> list[dict]:
    """Pairs of scored candidates where a set passes but a superset of it (both ends at least as
    large) fails: evidence that the frontier walk's assumption does not hold for this checkpoint."""
    passed = [c for c in records if c["passed"]]
    failed = [c for c in records if not c["passed"]]
    return [dict(passes=[p["k_in"], p["k_out"]], fails=[f["k_in"], f["k_out"]])
            for p in passed for f in failed if p["k_in"] <= f["k_in"] and p["k_out"] <= f["k_out"]]


def _score_candidates(table: pd.DataFrame, pairs: list[tuple[int, int]], tasks: list[str], tau: float,
                      where: str = "budget") -> list[dict]:
    """One record per candidate: its share of the gain per task, and whether all reach tau."""
    need = {"k_in", "k_out", "task", "share", "nll_reference", "nll_checkpoint"}
    if not need <= set(table.columns):
        raise CogprobeError(f"evaluate() returned a table without columns {sorted(need - set(table.columns))}; "
                            "return a keep-outer sweep table")
    if "mode" in table.columns:
        table = table[table["mode"] == "keep-outer"]
    if "checkpoint_step" in table.columns and table["checkpoint_step"].nunique() > 1:
        raise CogprobeError("evaluate() returned rows for several checkpoints; filter them to the chosen step")
    rows_of: dict[tuple, list[int]] = {}   # (k_in, k_out, task) -> positions: one pass, not a mask per lookup
    for i, key in enumerate(zip(table["k_in"], table["k_out"], table["task"])):
        rows_of.setdefault(key, []).append(i)
    nll_ref, nll_ck, share = (table[c].to_numpy() for c in ("nll_reference", "nll_checkpoint", "share"))
    out = []
    for k_in, k_out in pairs:
        shares = {}
        for task in tasks:
            found = rows_of.get((k_in, k_out, task), [])
            if len(found) != 1:
                raise CogprobeError(f"evaluate() returned {len(found)} rows for k_in={k_in}, k_out={k_out}, "
                                    f"task {task!r}; expected one (sweep that task)")
            _check_gain(task, float(nll_ref[found[0]]), float(nll_ck[found[0]]), where)
            shares[task] = float(share[found[0]])
            if math.isnan(shares[task]):
                raise CogprobeError(f"{where}: the share of task {task!r} at k_in={k_in}, k_out={k_out} is NaN; "
                                    "check the model and rerun")
        low = min(shares.values())
        out.append(dict(k_in=k_in, k_out=k_out, shares=shares, min_share=low, passed=low >= tau * (1 - EPS)))
    return out


def sweep_candidates(sweeps: pd.DataFrame, step: int, n_layers: int) -> pd.DataFrame:
    """The budget candidates a revert sweep (without --ends) already scored at `step`, as
    keep-outer rows: reverting the first k blocks keeps (0, L-k), reverting the last k keeps
    (L-k, 0). Same configuration, same engine, so the same numbers as scoring them again."""
    rows = sweeps[(sweeps["mode"] == "revert") & (sweeps["checkpoint_step"] == step)]
    if "ends" in rows.columns:
        rows = rows[~rows["ends"].astype(bool)]
    rows = rows.copy()
    kept = n_layers - rows["k"].astype(int)
    rows["k_in"] = kept.where(rows["direction"] == "output", 0)
    rows["k_out"] = kept.where(rows["direction"] == "input", 0)
    rows["blocks"] = [to_string(outer(n_layers, a, b)) for a, b in zip(rows["k_in"], rows["k_out"])]
    rows = rows.assign(mode="keep-outer", direction="both", k=rows["k_in"] + rows["k_out"])
    return rows.drop_duplicates(["task", "k_in", "k_out"]).reset_index(drop=True)


def curves_decider(tau: float, **kw) -> Callable:
    """For `stability`: the curves rule on a resampled sweep, and whether the chosen k of each end
    still keeps tau there."""
    def decide(table: pd.DataFrame, chosen: tuple[int, int]):
        try:
            s = select_curves(table, tau=tau, **kw)
        except CogprobeError:
            return None, False
        shares = [{c["k"]: c["share"] for c in e["curve"]} for e in s.evidence["ends"]]
        ok = all(sh.get(k, -math.inf) >= tau * (1 - EPS) for sh, k in zip(shares, chosen))
        return (s.k_in, s.k_out), ok
    return decide


def budget_decider(tau: float, tasks: Sequence[str], pairs: list[tuple[int, int]]) -> Callable:
    """For `stability`: the budget rule over the candidates it scored (smallest passing size, the best
    worst-task share within it), and whether the chosen candidate still passes. `table`: the rows the
    rule read, in the view it read them (`conditional_rows` already applied for the conditional gain)."""
    def decide(table: pd.DataFrame, chosen: tuple[int, int]):
        try:
            scored = _score_candidates(table, pairs, list(tasks), tau)
        except CogprobeError:
            return None, False
        passed = [c for c in scored if c["passed"]]
        ok = any(c["passed"] and (c["k_in"], c["k_out"]) == tuple(chosen) for c in scored)
        if not passed:
            return None, ok
        size = min(c["k_in"] + c["k_out"] for c in passed)
        best = max((c for c in passed if c["k_in"] + c["k_out"] == size), key=lambda c: (c["min_share"], -c["k_in"]))
        return (best["k_in"], best["k_out"]), ok
    return decide
