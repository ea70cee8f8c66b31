"""The evidence study's tables and words (`cogprobe.study.evidence`) on a study that has only begun:
what it can compare, and nothing it cannot."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cogprobe.study.evidence import (against_the_paper, budget_note, budget_sizes, cost_table,
                                     headline_table)
from cogprobe.study.evidence_tables import COLUMNS, QUESTIONS, conditional_gains, cost, own_rows, rows_of, setting


def _study(arms: list[str]) -> dict:
    rng = np.random.default_rng(0)
    scores = pd.DataFrame([dict(arm=a, task=t, pair_id=i, nll_sum=float(rng.uniform(20, 40)) - 5 * (a != "base"),
                                n_tokens=10) for a in arms for t in ("perception", "production") for i in range(8)])
    runs = [a.rsplit("-s", 1) for a in arms if a != "base"]
    compare = pd.DataFrame([dict(row=row, seed=int(seed)) for row, seed in runs])
    return dict(scores=scores, translations=pd.DataFrame(columns=["arm", "task", "pair_id", "hypothesis", "reference"]),
                compare=compare, seeds=sorted(set(compare["seed"])), draws=[])


def test_a_study_with_full_fine_tuning_alone_compares_nothing_and_does_not_fail():
    study = _study(["base", "full-s0"])
    assert rows_of("x", study, QUESTIONS) == []          # no second row, no random draw yet
    own = pd.DataFrame(own_rows("x", study))
    assert set(own["quantity"]) == {"nll", "share"} and set(own["row"]) == {"full"}


def test_a_row_is_compared_once_it_and_its_other_are_there():
    study = _study(["base", "full-s0", "cogsym-s0"])
    found = pd.DataFrame(rows_of("x", study, QUESTIONS))
    assert set(zip(found["row"], found["other"])) == {("cogsym", "full")}
    assert (found["n_seeds"] == 1).all() and (found["low"] <= found["high"]).all()


def test_a_resumed_run_costs_what_its_log_says_not_its_last_invocation(tmp_path):
    """Each session's end interrupts a run; its tune stage then times only the part after the resume,
    while its log (sec_per_step over every session) and its dev curve hold what it cost."""
    from cogprobe.core import io
    io.write_json(tmp_path / "study.json", {"model": "m", "corpus": "c", "steps": 100, "run_length": 50,
                                            "stage_machines": {"tune full-s0": "cpu"},
                                            "stage_seconds": {"tune full-s0": 40.0, "compare full-s0": 30.0,
                                                              "tune blocks-s0": 500.0, "compare blocks-s0": 30.0}})
    io.write_parquet(tmp_path / "compare.parquet", pd.DataFrame(dict(row=["full", "blocks"], seed=0,
                                                                     sec_per_step=[2.0, 2.0])))
    io.write_parquet(tmp_path / "dev_curves.parquet", pd.DataFrame(dict(arm=["full-s0"] * 2, seconds=[3.0, 2.0])))
    seed0 = cost("x", tmp_path, [0])[-1]
    assert seed0["hours"] * 3600 == (2.0 * 50 + 5.0) + 30.0 + 500.0 + 30.0   # blocks' own stage time stands
    assert seed0["note"] == "1 resumed runs counted from their logs" and seed0["runs"] == 2
    assert seed0["machines"] == "cpu; not recorded"


def test_the_cost_table_ends_with_each_languages_total():
    costs = pd.DataFrame([dict(language=lang, part=part, hours=hours, runs=1, machines="cpu", note="")
                          for lang, part, hours in [("otomi", "seed 0", 2.0), ("otomi", "seed 1", 1.5),
                                                    ("nahuatl", "seed 0", 4.0)]])
    assert cost_table(costs).endswith("otomi 3.5 h; nahuatl 4.0 h.")


def test_the_headline_answers_only_what_each_interval_allows():
    base = dict(language="nahuatl", task="perception", n_pairs=256, n_seeds=2, n_draws=1)
    found = pd.DataFrame([
        dict(base, row="cogsym", other="blocks", quantity="rel_deviation", estimate=0.01, low=0.0, high=0.025,
             per_seed="0.008;0.012"),
        dict(base, row="cogsym", other="full", quantity="chrf_rel_deviation", estimate=0.02, low=-0.1, high=0.12),
        dict(base, row="cogsym", other="middle", quantity="share_minus", estimate=-0.2, low=-0.3, high=-0.1),
        dict(base, row="budget", other="cogsym", quantity="share_minus", estimate=0.05, low=0.01, high=0.09,
             n_seeds=1)], columns=COLUMNS)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in headline_table(found).splitlines()}
    matched = "Matched, ends frozen in both: CogSym within 3% of every block, test NLL"
    assert "| yes: 1.0% [0.0%, 2.5%] (0.8%, 1.2%) |" in lines[matched]   # each seed's own estimate beside it
    unmatched = "Unmatched (CogSym's ends frozen, full's trained): CogSym within 3% of full fine-tuning, chrF"
    assert "| not resolved: 2.0% [-10.0%, 12.0%] |" in lines[unmatched]
    assert list(lines).index(matched) < list(lines).index(unmatched)   # the matched readings first
    assert "| no: -20.0%" in lines["CogSym keeps more of the gain than the middle set of its size"]
    assert "yes: 5.0% [1.0%, 9.0%], 1 of 2 seeds |" in lines["The derived budget keeps more of the gain than CogSym"]
    assert lines["CogSym keeps more of the gain than the top set of its size"].endswith("|  |")   # not compared yet
    assert headline_table(pd.DataFrame(columns=COLUMNS)) == ""
    assert "The interval is valid at this seed count" in headline_table(found) and "one seed" not in lines[matched]
    one = headline_table(found.assign(n_seeds=1, per_seed=""))   # a study with one seed so far
    assert "| yes: 1.0% [0.0%, 2.5%], one seed |" in one
    assert "the test pairs' bootstrap error alone" in one and "valid at this seed count" not in one


def test_conditional_gain_is_shuffled_minus_true_source_nll_per_row_and_the_base():
    study = _study(["base", "full-s0", "full-s1"])
    s = study["scores"]
    shuffled = s.assign(task=s["task"] + "-shuffled", nll_sum=s["nll_sum"] + 4.0)   # 0.4 nats a token worse
    study["scores"] = pd.concat([s, shuffled], ignore_index=True)
    study["compare"], study["seeds"] = pd.DataFrame(dict(row=["full", "full"], seed=[0, 1])), [0, 1]
    found = pd.DataFrame(conditional_gains("x", study))
    change = found[found["quantity"] == "conditional_gain_change"]   # from the base's, on the same pairs
    assert set(change["row"]) == {"full"} and np.allclose(change["estimate"], 0.0)
    got = found[found["quantity"] == "conditional_gain"].set_index(["row", "task"])
    assert set(got.index) == {(r, t) for r in ("base", "full") for t in ("perception", "production")}
    assert np.allclose(got["estimate"], 0.4) and (got["low"] <= got["high"]).all()
    assert got.loc[("full", "perception"), "n_seeds"] == 2 and got.loc[("base", "perception"), "n_seeds"] == 0


def test_the_papers_claims_are_read_off_the_matched_cells_only():
    base = dict(task="perception", n_pairs=256, n_seeds=2, n_draws=1, row="cogsym-ends", other="full")
    found = pd.DataFrame([
        dict(base, language="a", quantity="rel_deviation", estimate=0.01, low=0.0, high=0.025),      # within
        dict(base, language="a", quantity="chrf_rel_deviation", estimate=0.02, low=-0.1, high=0.12),  # straddles
        dict(base, language="b", quantity="rel_deviation", estimate=0.07, low=0.05, high=0.09),      # beyond
        dict(base, language="b", quantity="share_minus", estimate=0.3, low=0.2, high=0.4),          # not a claim
        dict(base, language="b", row="cogsym", quantity="rel_deviation", estimate=0.07, low=0.05, high=0.09)],
        columns=COLUMNS)   # the last: the unmatched cogsym/full, not counted
    text = against_the_paper(found, ["a: m, 10 steps per run"])
    claim = [line for line in text.splitlines() if line.startswith("- The paper: tuning only")]
    assert claim == ["- The paper: tuning only the outermost 25% of blocks (CogSym) lands within 2-3% of full "
                     "fine-tuning; matched reading 2, embeddings and head trained in both (CogSym-ends against "
                     "full fine-tuning). This study agrees (within 3%) in 1 of 3: a perception NLL; goes against it "
                     "(more than 3% worse) in 1 of 3: b perception NLL; does not decide (the interval straddles "
                     "3%) in 1 of 3: a perception chrF."]
    assert "- Not counted: the unmatched cogsym against full" in text
    assert "(a: m, 10 steps per run;" in text and "LoRA" not in text   # no cogsym-lora cell: no claim
    assert against_the_paper(pd.DataFrame(columns=COLUMNS), []) == ""


def test_the_setting_says_whether_full_fine_tuning_plateaued_or_hit_the_cap(tmp_path):
    from cogprobe.core import io
    record = {"out": str(tmp_path), "model": "m", "corpus": "c", "steps": 100, "converge": True,
              "schedule": "constant", "eval_steps": "every:25", "warmup": 0, "plateau_window": 0.2, "plateau_min_improvement": 0.01, "run_length": 100}
    io.write_json(tmp_path / "study.json", record)

    def curve(nlls):
        io.write_parquet(tmp_path / "dev_curves.parquet", pd.DataFrame(
            [dict(arm="full-s0", step=s, task=t, nll=n) for s, n in zip(range(0, 101, 25), nlls)
             for t in ("perception", "production")]))
    curve([4.0, 3.5, 3.2, 3.0, 2.9])   # the window starts at 75 (the last evaluation <= 0.8 * 100): 3.0 -> 2.9
    assert setting("x", tmp_path) == ("x: m, 100 steps per run, the cap: full fine-tuning's best dev NLL still "
                                      "fell 3.3% over the last 20% of its steps (3.000 at step 75, 2.900 at 100), "
                                      "above the 1% plateau bar")
    curve([4.0, 3.5, 3.2, 3.0, 2.99])
    assert setting("x", tmp_path) == "x: m, 100 steps per run, where full fine-tuning's dev NLL plateaued"
    io.write_json(tmp_path / "study.json", dict(record, converge=False))
    assert setting("x", tmp_path) == "x: m, 100 steps per run"


def test_the_budget_line_names_both_sets_and_their_sizes():
    compare = pd.DataFrame(dict(row=["cogsym", "budget", "budget"], seed=[0, 0, 1],
                                blocks=["0-3,26-29", "0-3,18-29", "0-3,18-29"],
                                trainable_params=[28.32e6, 56.64e6, 56.64e6]))
    size = budget_sizes("nahuatl", compare)
    assert size == "nahuatl budget 0-3,18-29 (56.64M trainable) against cogsym 0-3,26-29 (28.32M trainable)"
    assert size in budget_note([size, ""]) and "not tested" in budget_note([size])
    assert budget_sizes("otomi", compare[compare["row"] == "cogsym"]) == "" and budget_note([""]) == ""
    assert budget_sizes("otomi", compare.assign(trainable_params=28.32e6)) == ""   # a budget of CogSym's size


def test_a_run_scored_but_not_yet_compared_stays_out_of_the_reading(tmp_path):
    """A study stopped between a run's scores and its compare row (seen: the converged study's
    cogsym-ends-s1) holds that run's scores; read, it would add a half-scored seed to the headline."""
    from cogprobe.core import io
    from cogprobe.study.evidence_tables import read, read_at
    arms = ["base", "full-s0", "cogsym-s0", "cogsym-s1", "full-s0@4", "cogsym-s0@4", "cogsym-s1@4", "full@pivot-s0"]
    for name in ("scores.parquet", "translations.parquet"):
        io.write_parquet(tmp_path / name, pd.DataFrame(dict(arm=arms, task="perception", pair_id=0, nll_sum=1.0)))
    io.write_parquet(tmp_path / "compare.parquet", pd.DataFrame(dict(row=["full", "cogsym", "full@pivot"], seed=0)))
    io.write_parquet(tmp_path / "compare_steps.parquet", pd.DataFrame(dict(row=["full", "cogsym"], seed=0, step=4)))
    for study, also in ((read(tmp_path), {"full-s0@4", "cogsym-s0@4", "full@pivot-s0"}), (read_at(tmp_path, 4), set())):
        kept = {"base", "full-s0", "cogsym-s0"} | also   # the end's reading keeps a compared run's earlier steps
        assert set(study["scores"]["arm"]) == set(study["translations"]["arm"]) == kept
        assert study["seeds"] == [0]
