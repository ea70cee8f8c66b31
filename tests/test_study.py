"""The whole study on a tiny model: every stage runs, every table has its columns, every figure exists."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cogprobe.cli import main
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import COMPARE
from cogprobe.tuning.runfolder import machine
from cogprobe.study.pipeline import run, run_order
from cogprobe.study.config import build_config
from tiny import save_tiny
from helpers import ANALYSES, run_analysis

WORDS = ["in calli huei", "in atl itztic", "in tlacatl quichiua in tlaxcalli", "canin", "quemah", "amo",
         "in cihuatl", "in tepetl", "in xochitl", "in tochtli"]
SPANISH = ["la casa es grande", "el agua está fría", "el hombre hace tortillas", "dónde", "sí", "no",
           "la mujer", "el cerro", "la flor", "el conejo"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    model = save_tiny(root / "model", "llama")
    rows = [(f"{s} {i}", f"{w} {i}") for i in range(12) for s, w in zip(SPANISH, WORDS)]
    corpus = root / "pairs.csv"
    pd.DataFrame(rows, columns=["es", "nah"]).to_csv(corpus, index=False)
    return root, model, corpus


def tiny_config(root, model, corpus, **kw):
    values = dict(model=str(model), corpus=str(corpus), steps=4, batch_size=2, seq_len=32, save_steps="0,2,4",
                  eval_pairs=3, probe_pairs=3, chrf_pairs=2, max_new_tokens=4, max_sentence_tokens=32,
                  lr=3e-3, lora_lr=3e-3, bf16=False, threads=1, isolate_runs=False)
    values.update(kw)
    return build_config(root / "out", preset_name=None, **values)


def test_whole_study_on_a_tiny_model(setup):
    root, model, corpus = setup
    config = tiny_config(root, model, corpus)
    out = run(config, log=lambda m: None)
    compare = pd.read_parquet(out / COMPARE)
    assert set(compare["row"]) >= set(config.row_list()) - {"budget"}   # budget may honestly find no set
    for col in ["row", "blocks", "trainable_params", "optimizer_bytes", "sec_per_step", "peak_mem_mb",
                "perception_nll", "production_nll", "perception_share", "production_share", "chrf_perception",
                "chrf_production", "chrf_perception_share", "chrf_production_share"]:
        assert col in compare.columns, col
    # a row's share is its NLL gain over full fine-tuning's, on the same test pairs (by hand here)
    base = pd.read_csv(out / "baseline.csv").iloc[0]
    full = compare[compare["row"] == "full"].iloc[0]
    for _, row in compare.iterrows():
        for task in ("perception", "production"):
            gain = base[f"{task}_nll"] - full[f"{task}_nll"]
            want = (base[f"{task}_nll"] - row[f"{task}_nll"]) / gain if gain > 0 else None
            assert (pd.isna(row[f"{task}_share"]) if want is None
                    else row[f"{task}_share"] == pytest.approx(want)), (row["row"], task)
    sweeps = pd.read_parquet(out / "sweeps.parquet")
    assert set(sweeps["checkpoint_step"]) == {0, 2, 4}
    assert {"activations.parquet", "baseline.csv", "selection-fixed.json", "selection-budget.json",
            "report.md", "report.html"} <= {p.name for p in out.iterdir()}
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"specialization_heatmap_revert_share.png", "logit_lens.png", "comparison_nll.png",
            "training_curve.png"} <= figures
    report = (out / "report.md").read_text()
    assert "CogSym against full fine-tuning" in report and "cogsym" in report
    # where the time went: every stage that ran, in study.json and (all but the report itself) in the report
    seconds = json.loads((out / "study.json").read_text())["stage_seconds"]
    assert {"baseline", "tune full-s0", "probe", "select", "compare cogsym-s0", "report"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and seconds["probe"] > 0
    assert "## Where the time went" in report and "| tune full-s0 |" in report
    (computed,) = json.loads((out / "study.json").read_text())["probe_engine"]   # which sweep engine ran, its peak
    assert computed["engine"] == "memory" and computed["dtype"] == "float32" and computed["peak_bytes"] > 0
    assert computed["fit"]["engine"] == "memory" and computed["fit"]["in_memory"] <= computed["fit"]["budget"]

    # every published-figure script runs on the study folder
    studies = [s for s in sorted((Path(__file__).parent.parent / "analyses").glob("[a-z]*.py"))
               if not s.name.startswith(("before_tuning", "measurement", "same_results", "cheap_rankings",
                                             "taylor_line_check", "evidence", "conditional_probe", "converged", "rescored"))]  # other inputs
    for script in studies:
        run_analysis(script.name, out, figures=root / "figures")
    assert len(list((root / "figures").glob("*.png"))) == 6
    assert (root / "figures" / "comparison_intervals.csv").is_file()
    # analyses/conditional_probe.py trains the probe run again from the study's record, bit for bit
    for _ in range(2):   # the second time resumes: the run and its sweep are there
        again = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "analyses" / "conditional_probe.py"),
                                str(out), str(root / "conditional")], capture_output=True, text=True,
                               env={**os.environ, "COGPROBE_FIGURES": str(root / "figures")})
        assert again.returncode == 0, again.stderr
    written = (root / "conditional" / "conditional.md").read_text()
    assert "The curves rule (criterion keep, tau 0.8): on the total gain" in written
    assert "largest NLL difference 0.00e+00 nats/token (the same model)" in written
    assert written.count(", the source-dependent part (conditional gain") == 2
    assert (root / "figures" / f"evidence_conditional_{out.name}.csv").is_file()

    # analyses/same_results.py (the refactoring check): a copy is the same; one changed score is not
    import shutil
    copy = root / "copy"
    shutil.copytree(out, copy)
    assert run_analysis("same_results.py", out, copy).count("identical") == 6
    scores = pd.read_parquet(copy / "scores.parquet")
    scores.loc[0, "nll_sum"] += 1e-9
    scores.to_parquet(copy / "scores.parquet")
    assert "scores.parquet: DIFFERENT" in run_analysis("same_results.py", out, copy, code=1)
    (copy / "selection-budget.json").unlink()   # a study without a budget row has no budget selection
    assert "selection-budget.json: DIFFERENT: only in old" in run_analysis("same_results.py", out, copy, code=1)

    # rerunning the same command redoes nothing: the tables stay byte-identical, no stage time shrinks
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    run(tiny_config(root, model, corpus), log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    again = json.loads((out / "study.json").read_text())["stage_seconds"]
    assert set(again) == set(seconds) and all(again[k] >= seconds[k] for k in seconds)


def no_budget_study(setup, folder, **kw):
    """The tiny study with a budget rule that cannot find a set (tau 1 within one block)."""
    root, model, corpus = setup
    values = tiny_config(root, model, corpus, rows="full,budget", tau=1.0, budget_max_total=1, **kw).to_dict()
    return run(build_config(folder, preset_name=None, **{k: v for k, v in values.items() if k != "out"}),
               log=lambda m: None)


def test_a_row_that_cannot_run_keeps_its_line_in_the_report_with_the_reason(setup, tmp_path):
    """No row leaves the tables silently: with budget_no_set = skip, a budget rule that finds no set leaves
    the budget row out of compare.parquet, the study ends normally, and the report's comparison table says why."""
    out = no_budget_study(setup, tmp_path / "no-budget", budget_no_set="skip")
    record = json.loads((out / "selection-budget.json").read_text())
    assert "error" in record and "fallback" not in record and record["no_set"] == "skip"
    assert set(pd.read_parquet(out / COMPARE)["row"]) == {"full"}
    report = (out / "report.md").read_text()
    line = next(l for l in report.splitlines() if l.startswith("| budget |"))
    assert "not run: budget selection failed:" in line
    assert "Its row was not trained (budget_no_set = skip)" in report


def test_a_budget_rule_without_a_set_trains_the_fixed_set_labelled_as_such(setup, tmp_path):
    """budget_no_set = fixed (the default): the budget row trains the fixed CogSym set, recorded in
    selection-budget.json beside the error, and every table of the report names the row 'budget: no
    set, fixed used'. On the adaptive k grid, whose rows say how their k came in."""
    from cogprobe.models.layersets import cogsym, to_string
    from cogprobe.study.rows import FIXED_USED, table
    out = no_budget_study(setup, tmp_path / "fixed-used", sweep_grid="adaptive")
    record = json.loads((out / "selection-budget.json").read_text())
    assert "error" in record and record["fallback"] == "fixed" and record["no_set"] == "fixed"
    assert record["layers_arg"] == to_string(cogsym(6, 0.25))
    compare = pd.read_parquet(out / COMPARE).set_index("row")
    assert set(compare.index) == {"full", "budget"} and compare.loc["budget", "blocks"] == record["layers_arg"]
    report = (out / "report.md").read_text()
    assert f"| {FIXED_USED} | {record['layers_arg']} |" in report                      # the comparison table
    assert sum(l.startswith(f"| {FIXED_USED} | perception |") for l in report.splitlines()) == 1   # rows table
    assert "was trained in its place (budget_no_set = fixed)" in report and "| budget |" not in report
    assert table(6, 8, study=out).set_index("layers").loc[record["layers_arg"], "row"] == FIXED_USED
    sweeps = pd.read_parquet(out / "sweeps.parquet")
    assert set(sweeps["k_grid"]) == {"coarse"} and set(sweeps["k"]) == set(range(7))   # 6 blocks: every k
    assert "Swept on the adaptive k grid: 7 of the 7 k's first (0, 1, 2, 3, 4, 5, 6)" in report


def test_controls_swept_where_the_report_reads_them(setup, tmp_path):
    """sweep_controls_at = read (the quick preset): the shuffled-source controls of the last checkpoint
    only, at k = 0, the k's the report and selector read, and every block; the report locates the
    source-dependent part of the gain there, beside the total."""
    root, model, corpus = setup
    values = tiny_config(root, model, corpus, rows="full", sweep_controls_at="read").to_dict()
    out = run(build_config(tmp_path / "read", preset_name=None, **{k: v for k, v in values.items() if k != "out"}),
              log=lambda m: None)
    sweeps = pd.read_parquet(out / "sweeps.parquet")
    controls = sweeps[sweeps["task"].str.endswith("-shuffled")]
    assert set(controls["checkpoint_step"]) == {4} and set(controls["k"]) == {0, 1, 2, 6}   # 6 blocks: reads 1, 2
    assert set(sweeps.loc[~sweeps.index.isin(controls.index), "k"]) == set(range(7))
    report = (out / "report.md").read_text()
    assert report.count(", the source-dependent part (conditional gain ") == 2
    # no budget row (the quick preset's rows): the budget rule's search is not run, and the report says so
    assert (out / "selection-fixed.json").is_file() and not (out / "selection-budget.json").exists()
    assert "**budget**: not derived: no row of this study trains it" in report


def test_a_sequential_probe_scores_chunks_until_its_rule_stops_and_everything_reads_the_pairs_it_used(setup, tmp_path):
    """probe_chunk: chunks of 2 of the 6 dev pairs; a half-width no interval reaches, so every pair is scored;
    the union is the sweep of those 8 pairs, and capture, the budget selection, evalsets.json and the
    report all read that set."""
    import dataclasses
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import sweep_run
    root, model, corpus = setup
    values = tiny_config(root, model, corpus, rows="full", sweep_grid="adaptive", sweep_controls_at="read",
                         probe_pairs=6, probe_chunk=2, probe_half_width=1e-9).to_dict()
    out = run(build_config(tmp_path / "seq", preset_name=None, **{k: v for k, v in values.items() if k != "out"}),
              log=lambda m: None)
    record = json.loads((out / "probe_pairs.json").read_text())
    assert record["stopped"] == "all pairs" and record["pairs"] == 6
    assert [c["pairs"] for c in record["chunks"]] == [2, 4, 6] and all(c["widest"] > 0 for c in record["chunks"])
    sweeps = pd.read_parquet(out / "sweeps.parquet")
    assert {len(a) for a in sweeps["example_nll"]} == {6}
    meta = json.loads((out / "sweeps.parquet.json").read_text())
    assert meta["window"] == [0, 6] and meta["n"] == 6 and len(meta["computed"]) >= 3
    used = EvalSet(**{k: v for k, v in meta.items() if k not in ("source", "computed")})
    direct = sweep_run(out / "runs" / "full-s0", evalset=used, out=tmp_path / "direct", progress=False,
                       log=lambda m: None, ks=tuple(sorted(set(sweeps["k"]))), tasks=tuple(sorted(set(sweeps["task"]))))
    key = ["checkpoint_step", "task", "direction", "k"]
    both = sweeps.merge(direct, on=key, suffixes=("", "_direct"))
    assert len(both) == len(sweeps)
    np.testing.assert_allclose(both["nll"], both["nll_direct"], rtol=1e-6, atol=1e-6)
    assert json.loads((out / "activations.parquet.json").read_text())["window"] == [0, 6]
    assert json.loads((out / "evalsets.json").read_text())["probe"]["sampled"] == 6
    report = (out / "report.md").read_text()
    assert "chunks of 2 of 6 and stopped at 6 pairs: every pair was scored" in report
    from cogprobe.study.sequential import used_set   # a record that disagrees with the table is refused
    (out / "probe_pairs.json").write_text(json.dumps(dict(record, pairs=4)))
    with pytest.raises(CogprobeError, match="probe used pairs \\(0, 4\\) but .* records \\(0, 6\\)"):
        used_set(dataclasses.replace(used, window=None), out)


def test_the_sequential_rule_stops_narrow_on_budget_or_with_every_pair():
    from cogprobe.study.sequential import ALL, BUDGET, NARROW, stop_reason
    chunk = [dict(pairs=3, seconds=10.0, widest=0.3)]
    assert stop_reason(chunk, 0.05, 0.1, 0, 9) == NARROW
    assert stop_reason(chunk, 0.3, 0.1, 0, 9) is None               # no budget: on to the next chunk
    assert stop_reason(chunk, 0.3, 0.1, 19.0, 9) == BUDGET          # a second chunk of ~10 s would pass 19 s
    assert stop_reason(chunk, 0.3, 0.1, 21.0, 9) is None
    assert stop_reason(chunk, None, 0.1, 0, 3) == ALL               # no share defined, and no pair left
    assert stop_reason(chunk + [dict(pairs=6, seconds=10.0, widest=0.2)], 0.2, 0.1, 0, 6) == ALL


def test_studies_written_before_budget_no_set_keep_skipping_their_budget_row():
    from cogprobe.study.config import renamed
    assert renamed({"rows": "full,budget"})["budget_no_set"] == "skip"
    assert renamed({"rows": "full,budget"})["sweep_grid"] == "full"


def test_study_refuses_a_different_study_in_out(setup):
    root, model, corpus = setup
    with pytest.raises(CogprobeError, match="different study"):
        run(tiny_config(root, model, corpus, steps=5), log=lambda m: None)


def test_a_changed_chrf_set_scores_every_scored_arm_again_from_its_weights(setup, tmp_path):
    """chrf_pairs may change on a rerun (0: the NLL pairs): the base model and every compared run are
    translated again from their kept weights, their chrF and chrF shares replaced, nothing else
    recomputed; a run whose weights are gone stops the change before anything is scored again."""
    import shutil
    from cogprobe.study.pipeline import stale_chrf, with_shares
    from cogprobe.data.translate import chrf
    root, model, corpus = setup
    out = run(tiny_config(root, model, corpus), log=lambda m: None)   # the module's study (done: nothing rerun)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    values = {k: v for k, v in tiny_config(root, model, corpus).to_dict().items() if k != "out"}
    before = pd.read_parquet(moved / COMPARE)
    scores = pd.read_parquet(moved / "scores.parquet")
    config = build_config(moved, preset_name=None, **{**values, "chrf_pairs": 0})
    assert set(stale_chrf(config, moved)) == {"base", *(f"{r}-s{s}" for r, s in zip(before["row"], before["seed"]))}
    run(config, log=lambda m: None)

    translations = pd.read_parquet(moved / "translations.parquet")
    assert translations.groupby(["arm", "task"])["pair_id"].agg(frozenset).eq(frozenset(scores["pair_id"])).all()
    compare, base = pd.read_parquet(moved / COMPARE), pd.read_csv(moved / "baseline.csv").iloc[0]
    for (name, task), t in translations.groupby(["arm", "task"]):
        got = base if name == "base" else compare[compare["row"] + "-s" + compare["seed"].astype(str) == name].iloc[0]
        assert got[f"chrf_{task}"] == pytest.approx(chrf(list(t["hypothesis"]), list(t["reference"]))), (name, task)
    pd.testing.assert_frame_equal(compare, with_shares(compare, base))
    nll = [c for c in before.columns if not c.startswith("chrf")]
    pd.testing.assert_frame_equal(compare[nll], before[nll])
    pd.testing.assert_frame_equal(pd.read_parquet(moved / "scores.parquet"), scores)
    assert {"chrf base", "chrf full-s0"} <= set(json.loads((moved / "study.json").read_text())["stage_seconds"])
    assert stale_chrf(config, moved) == {}

    shutil.rmtree(moved / "runs" / "cogsym-s0" / "checkpoints")
    kept = pd.read_parquet(moved / "translations.parquet")
    with pytest.raises(CogprobeError, match="cogsym-s0 .*weights are gone.*--chrf-pairs 3"):
        run(build_config(moved, preset_name=None, **values), log=lambda m: None)
    pd.testing.assert_frame_equal(pd.read_parquet(moved / "translations.parquet"), kept)
    assert json.loads((moved / "study.json").read_text())["chrf_pairs"] == 0   # the refused change left no trace


def test_the_english_control_scores_every_arm_on_one_passage_set(setup, tmp_path):
    """prose_passages may be turned on or changed on a rerun: the base model and every compared run with
    its weights kept are scored on the new passages, nothing else recomputed; a run whose weights are
    gone loses its English rows (never one of another set) and the report names it."""
    import shutil
    root, model, corpus = setup
    out = run(tiny_config(root, model, corpus), log=lambda m: None)   # the module's study (done: nothing rerun)
    study = tmp_path / "study"
    shutil.copytree(out, study)
    values = {k: v for k, v in tiny_config(root, model, corpus).to_dict().items() if k != "out"}
    keep = {name: pd.read_parquet(study / name) for name in ("compare.parquet", "scores.parquet")}
    run(build_config(study, preset_name=None, **{**values, "prose_passages": 20}), log=lambda m: None)
    prose = pd.read_parquet(study / "prose.parquet")
    arms = {"base", *(f"{r}-s{s}" for r, s in zip(keep["compare.parquet"]["row"], keep["compare.parquet"]["seed"]))}
    assert set(prose["arm"]) == arms and prose.groupby("arm").size().eq(20).all()
    assert prose["passage_set"].nunique() == 1
    for name, table in keep.items():
        pd.testing.assert_frame_equal(pd.read_parquet(study / name), table)
    report = (study / "report.md").read_text()
    assert "## English prose: the quantisation control" in report and "| cogsym | 0 |" in report

    shutil.rmtree(study / "runs" / "cogsym-s0" / "checkpoints")
    run(build_config(study, preset_name=None, **{**values, "prose_passages": 24}), log=lambda m: None)
    prose = pd.read_parquet(study / "prose.parquet")
    assert set(prose["arm"]) == arms - {"cogsym-s0"} and prose.groupby("arm").size().eq(24).all()
    assert "No English score (their weights were gone when the control was asked for): cogsym-s0" in (
        study / "report.md").read_text()
    seconds = json.loads((study / "study.json").read_text())["stage_seconds"]
    assert {"prose base", "prose full-s0", "prose cogsym-s0"} <= set(seconds)


def test_a_pivot_only_control_trains_its_row_on_pivot_text_and_the_report_subtracts_its_gain(setup, tmp_path):
    """ROW@pivot trains what ROW trains, at ROW's learning rate (no trials of its own), on the pivot side
    alone; the report states each row's gain, its control's and what the new language added."""
    root, model, corpus = setup
    values = {k: v for k, v in tiny_config(root, model, corpus).to_dict().items() if k != "out"}
    config = build_config(tmp_path / "pivot", preset_name=None, **{
        **values, "rows": "full,cogsym,full@pivot,cogsym@pivot", "lr_grid": "1e-3,3e-3", "lr_steps": 2, "dev_pairs": 4})
    out = run(config, log=lambda m: None)
    assert set(pd.read_parquet(out / COMPARE)["row"]) == {"full", "cogsym", "full@pivot", "cogsym@pivot"}
    assert not pd.read_parquet(out / "lr_search.parquet")["row"].str.contains("@").any()
    manifest = {r: json.loads((out / "runs" / f"{r}-s0" / "manifest.json").read_text())["config"]
                for r in ("cogsym", "cogsym@pivot")}
    assert manifest["cogsym@pivot"]["layers"] == manifest["cogsym"]["layers"]
    assert manifest["cogsym@pivot"]["lr"] == manifest["cogsym"]["lr"] and manifest["cogsym"]["mix_pivot"] == 0
    assert [manifest["cogsym@pivot"][f"mix_{k}"] for k in ("perception", "production", "plain", "pivot")] == [0, 0, 0, 1]
    report = (out / "report.md").read_text()
    assert "## Pivot-only control: the gain the new language does not explain" in report
    assert "| cogsym | perception | 1 |" in report and "| full | production | 1 |" in report
    from cogprobe.study.pivot_control import subtracted
    table = subtracted(out).set_index(["row", "task", "quantity"])["estimate"]
    for task in ("perception", "production"):   # gain = pivot_gain + net_gain, exactly
        assert table[("cogsym", task, "gain")] == pytest.approx(
            table[("cogsym", task, "pivot_gain")] + table[("cogsym", task, "net_gain")])


def test_a_pivot_only_control_needs_its_row():
    from cogprobe.study.rows import expand
    with pytest.raises(CogprobeError, match="add cogsym to rows"):
        build_config("x", preset_name=None, rows="full,cogsym@pivot")
    with pytest.raises(CogprobeError, match="unknown"):
        build_config("x", preset_name=None, rows="full,nonsense@pivot")
    assert expand(["random", "random@pivot"], 2) == ["random-1", "random-2", "random-1@pivot", "random-2@pivot"]


def test_studies_written_before_the_english_control_read_it_as_off():
    from cogprobe.study.config import renamed
    assert renamed({"rows": "full"})["prose_passages"] == 0


def test_a_study_written_before_rows_were_called_rows_still_resumes(setup, tmp_path):
    """study.json once said `strategies`; such a study continues (nothing recomputed), a config file
    that still says it is told the new name."""
    import shutil
    root, model, corpus = setup
    out = run(tiny_config(root, model, corpus), log=lambda m: None)   # the module's study (done: nothing rerun)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    recorded = json.loads((old / "study.json").read_text())
    recorded["strategies"] = recorded.pop("rows")
    (old / "study.json").write_text(json.dumps(recorded))
    before = {p: p.stat().st_mtime_ns for p in old.rglob("*.parquet")}
    run(build_config(old, preset_name=None, **{k: v for k, v in tiny_config(root, model, corpus).to_dict().items()
                                               if k != "out"}), log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*.parquet")} == before
    (tmp_path / "old.toml").write_text('strategies = "full"\n')
    with pytest.raises(CogprobeError, match="key 'strategies' is now called 'rows'"):
        build_config(tmp_path / "o", preset_name=None, config_file=tmp_path / "old.toml")


def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "study.toml"
    bad.write_text("stepz = 3\n")
    assert main(["run", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    bad.write_text('steps = "many"\n')
    assert main(["run", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "'steps' should be int" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o"), "--preset", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_isolated_training_gets_the_config_itself(setup, tmp_path):
    """The study trains each row in a subprocess from a JSON of its TrainConfig (`train --config`): the
    child's run has exactly that config, and flags given as well override the file."""
    from cogprobe.cli import build_parser, train_config
    from cogprobe.study.pipeline import tune
    from cogprobe.tuning.config import TrainConfig
    root, model, corpus = setup
    config = tiny_config(root, model, corpus, isolate_runs=True, rows="full,cogsym-lora", steps=2)
    out = Path(config.out).parent / "isolated"
    tune(config, out, "cogsym-lora", 0)
    run = out / "runs" / "cogsym-lora-s0"
    handed = json.loads((run / "train-config.json").read_text())
    assert json.loads((run / "manifest.json").read_text())["config"] == handed
    assert handed["strategy"] == "lora-layers" and handed["layers"] == "cogsym:0.25" and handed["steps"] == 2
    args = build_parser().parse_args(["train", "--config", str(run / "train-config.json"), "--steps", "7"])
    assert train_config(args) == TrainConfig.from_dict({**handed, "steps": 7})
    with pytest.raises(CogprobeError, match="train needs --model, --corpus, --out, --strategy: give them as flags"):
        train_config(build_parser().parse_args(["train"]))


def test_training_child_dies_with_the_study_process():
    """kill -9 of `cogprobe run` must not leave its training child running on the folder."""
    import signal
    import time
    code = ("import subprocess; from cogprobe.study.pipeline import die_with_parent; "
            "c = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent); print(c.pid, flush=True); c.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
        if state in ("", "Z"):
            break
        time.sleep(0.1)
    assert state in ("", "Z")   # gone, or dead and waiting to be reaped


def test_runs_trained_at_once_are_the_runs_trained_one_at_a_time(setup, tmp_path):
    """parallel_runs 2: the comparison runs train two at a time in their own processes and score as they
    finish; every table is the one a study training them one at a time writes, and each tune stage
    records its run's own seconds."""
    root, model, corpus = setup
    values = {k: v for k, v in tiny_config(root, model, corpus).to_dict().items() if k != "out"}
    values.update(rows="full,cogsym,middle", sweep_ks="0-2", prose_passages=0)
    one = run(build_config(tmp_path / "one", preset_name=None, **values), log=lambda m: None)   # in this process
    two = run(build_config(tmp_path / "two", preset_name=None, **{**values, "parallel_runs": 2, "isolate_runs": True}),
              log=lambda m: None)
    drop = ["sec_per_step", "peak_mem_mb"]   # measured, not computed
    pd.testing.assert_frame_equal(pd.read_parquet(one / COMPARE).drop(columns=drop),
                                  pd.read_parquet(two / COMPARE).drop(columns=drop))
    seconds = json.loads((two / "study.json").read_text())["stage_seconds"]
    assert all(seconds[f"tune {r}-s0"] > 0 for r in ("cogsym", "middle"))
    with pytest.raises(CogprobeError, match="parallel_runs=2 needs isolate_runs"):
        build_config(tmp_path / "x", preset_name=None, **{**values, "isolate_runs": False, "parallel_runs": 2})


def test_a_failed_run_stops_the_runs_training_beside_it(setup, tmp_path, monkeypatch):
    """With runs trained at once, one run's failure ends the study with its line, and the runs still
    training beside it are stopped, not left running on their folders (a rerun resumes them)."""
    import time
    from cogprobe.study import pipeline
    root, model, corpus = setup
    config = tiny_config(root, model, corpus, parallel_runs=2, isolate_runs=True)
    sleepers = []

    def tune(config, out, row, seed):
        if row == "bad":
            time.sleep(0.5)
            raise CogprobeError("training bad-s0 failed: diverged")
        with pipeline.TRAINING_CHILDREN.start(["sleep", "60"], row) as child:
            sleepers.append(child)
            child.wait()
    monkeypatch.setattr(pipeline, "tune", tune)
    monkeypatch.setattr(pipeline, "run_length", lambda *a: 4)
    start = time.perf_counter()
    with pytest.raises(CogprobeError, match="training bad-s0 failed: diverged"):
        with pipeline.trained_ahead(config, tmp_path, [("bad", 0), ("slow", 0), ("later", 0)]) as trained:
            trained("bad", 0)
    # every child started is killed (a thread free after "bad" may start "later" just before the stop, or
    # find the study stopping and start none); none is left to run its 60 s
    assert 1 <= len(sleepers) <= 2 and all(c.wait(timeout=10) == -9 for c in sleepers)
    assert time.perf_counter() - start < 30


STANDARD_TINY = dict(steps=12, eval_steps="every:2", plateau_min_improvement=0.5, warmup=0, lr_grid="1e-3,3e-3",
                     lora_lr_grid="1e-3,3e-3", lr_steps=2, random_draws=2, dev_pairs=3, save_steps="log:3",
                     sweep_ks="0-6", budget_max_total=6, tau=0.5, eval_pairs=3, probe_pairs=3, chrf_pairs=2,
                     max_new_tokens=4, max_sentence_tokens=32, train_max_sentence_tokens=32, batch_size=2,
                     seq_len=32, bf16=False, threads=1, isolate_runs=False, prose_passages=20)


def test_standard_preset_end_to_end_on_a_tiny_model(setup, tmp_path):
    """The standard preset's code path at tiny sizes: learning rates chosen on dev for every row kind,
    full fine-tuning stopped on a dev plateau, every other run as long, every row kind compared, the
    dev curves collected; then the study folder without its runs/ continues without recomputing."""
    import shutil
    from cogprobe.study.rows import kind
    root, model, corpus = setup
    config = build_config(tmp_path / "std", preset_name="standard", model=str(model), corpus=str(corpus),
                          **STANDARD_TINY)
    assert config.converge and config.probe_row == "blocks" and config.seed_list() == [0, 1]
    out = run(config, log=lambda m: None)

    trials = pd.read_parquet(out / "lr_search.parquet")
    planned = {kind(r) for r in config.row_list()}
    assert set(trials["row"]) == planned   # every kind, both rates of its grid (and past its edge, if best there)
    assert all({1e-3, 3e-3} <= set(g["lr"]) and len(g) <= 2 + 2 for _, g in trials.groupby("row"))
    kept = list((out / "runs" / "lr-trials").iterdir())   # a recorded trial keeps its logs, not its weights
    assert len(kept) == len(trials) and all((t / "dev_curve.parquet").is_file() for t in kept)
    assert not list((out / "runs" / "lr-trials").rglob("*.safetensors"))
    length = json.loads((out / "study.json").read_text())["run_length"]
    stop = json.loads((out / "runs" / "full-s0" / "manifest.json").read_text())["stop"]
    assert stop["stop_reason"] == "plateau" and length == stop["stopped_at"] < 12
    compare = pd.read_parquet(out / "compare.parquet")
    arms = {f"{r}-s{s}" for r, s in zip(compare["row"], compare["seed"])}
    kinds = planned - {"budget"} if "budget" not in set(compare["row"]) else planned
    assert {kind(r) for r in compare["row"]} >= kinds and {"random-1", "random-2"} <= set(compare["row"])
    for name in arms:
        cfg = json.loads((out / "runs" / name / "manifest.json").read_text())["config"]
        row = name.rsplit("-s", 1)[0]
        chosen = trials[trials["row"] == kind(row)].sort_values(["dev_nll", "lr"]).iloc[0]["lr"]
        assert cfg["lr"] == pytest.approx(chosen), name
        assert cfg["resume_every"] == config.resume_every == 50, name   # an interrupted row redoes <= 50 steps
        if name != "full-s0":
            assert cfg["steps"] == length and not cfg["stop_on_plateau"], name
    params = compare[compare["seed"] == 0].set_index("row")["trainable_params"]
    assert params["cogsym-lora-matched"] == pytest.approx(params["lora"], rel=0.01)
    assert params["cogsym-ends"] > params["cogsym"] and params["blocks"] < params["full"]
    curves = pd.read_parquet(out / "dev_curves.parquet")
    assert set(curves["arm"]) == arms and {0, length} <= set(curves[curves["arm"] == "cogsym-s1"]["step"])
    assert (out / "figures" / "share_curves.png").is_file()
    report = (out / "report.md").read_text()
    # two seeds: the report states the README's pooled cells and sentences, not one seed's (issue 39)
    assert "Length and learning rates" in report and "## The comparisons that matter, pooled over seeds" in report
    assert "- cogsym-lora vs lora (rel deviation" in report and "- cogsym vs random-2 (share minus" in report
    assert ("- budget vs cogsym (share minus" in report) == ("budget" in set(compare["row"]))
    assert "share minus **random-2**'s" not in report   # no seed-0 sentence left
    assert set(pd.read_parquet(out / "sweeps.parquet")["checkpoint_step"]) <= set(range(length + 1))

    # analyses/evidence.py: the headline comparisons over both seeds, worded as far as 3 pairs allow
    run_analysis("evidence.py", f"tiny={out}", figures=tmp_path / "figures")
    headline = pd.read_csv(tmp_path / "figures" / "evidence.csv")
    defined = headline.dropna(subset=["estimate"])   # chrF deviations from a chrF of 0 are undefined
    assert set(headline["n_seeds"]) == {2} and (defined["low"] <= defined["high"]).all()
    assert set(headline["quantity"][headline["estimate"].isna()]) <= {"chrf_rel_deviation"}
    asked = set(zip(headline["row"], headline["other"], headline["quantity"]))
    assert {("cogsym", "full", "rel_deviation"), ("cogsym-lora", "lora", "rel_deviation"),
            ("cogsym", "middle", "share_minus"), ("cogsym", "random-1", "share_minus"),
            ("cogsym", "random-2", "share_minus"), ("cogsym", "blocks", "share_minus"),
            ("cogsym", "random", "share_minus"), ("cogsym", "full", "chrf_rel_deviation")} <= asked
    pooled = headline[headline["other"] == "random"]
    assert set(pooled["n_draws"]) == {2} and set(headline[headline["other"] != "random"]["n_draws"]) == {1}
    own = pd.read_csv(tmp_path / "figures" / "evidence_rows.csv")
    assert set(own["quantity"]) == {"nll", "share", "rel_deviation", "chrf", "chrf_rel_deviation",
                                    "conditional_gain", "conditional_gain_change"}
    gains = own[own["quantity"] == "conditional_gain"]   # every row and the base, per task
    assert set(gains["row"]) == set(compare["row"]) | {"base"} and len(gains) == 2 * len(set(gains["row"]))
    base = gains["row"] == "base"
    assert set(gains[base]["n_seeds"]) == {0} and set(gains[~base]["n_seeds"]) == {2}
    cogsym_nll = own[(own["row"] == "cogsym") & (own["quantity"] == "nll")].set_index("task")["estimate"]
    by_seed = compare[compare["row"] == "cogsym"]
    for task in ("perception", "production"):   # the mean over seeds of what compare.parquet holds
        assert cogsym_nll[task] == pytest.approx(by_seed[f"{task}_nll"].mean(), rel=1e-9)
    words = (tmp_path / "figures" / "evidence.md").read_text()
    assert "**tiny, perception**" in words and "3 pairs are too few" in words and "cogsym keeps more" not in words
    assert "| too few pairs: " in words and not any(f"| {a}: " in words for a in ("yes", "no", "not resolved"))
    assert "| row | blocks | trainable |" in words and "(2 draws per seed pooled, each seed its own sets" in words
    per_seed = compare[compare["row"] == "random-1"]["blocks"].nunique() > 1   # a draw is drawn from the seed
    assert ("| random-1 | s0: " in words) == per_seed       # so its blocks are named per seed where they differ
    spent = pd.read_csv(tmp_path / "figures" / "evidence_cost.csv").set_index("part")
    assert spent.loc["learning-rate trials", "runs"] == len(pd.read_parquet(out / "lr_search.parquet"))
    assert spent["note"].isna().all() and (spent["hours"] > 0).all()   # every trial timed
    assert set(spent["machines"]) == {machine()}                        # every stage's machine recorded
    assert spent.loc["seed 0", "runs"] == spent.loc["seed 1", "runs"] == len(compare) // 2
    run_analysis("evidence_figures.py", f"tiny={out}", f"again={out}", figures=tmp_path / "figures")
    drawn = pd.read_csv(tmp_path / "figures" / "evidence_share_curves.csv")
    assert set(drawn["language"]) == {"tiny", "again"} and set(drawn["row"]) == set(compare["row"])
    assert (tmp_path / "figures" / "evidence_specialization_tiny.png").is_file()
    sets = pd.read_csv(tmp_path / "figures" / "evidence_same_size.csv")   # CogSym and its same-size controls
    assert set(sets["row"]) == {r for r in compare["row"] if kind(r) in ("cogsym", "middle", "bottom", "top", "random")}
    assert {"random-1", "random-2"} <= set(sets["row"]) and set(sets["quantity"]) == {"share"}
    sys.path.insert(0, str(ANALYSES))
    from evidence_readme import block      # the README's block of a finished study: tables and figures
    readme = block(tmp_path / "figures")
    assert "| row | blocks | trainable |" in readme and "(figures/evidence_specialization_tiny.png)" in readme

    # a study still running is published as far as it got, and says so
    partial = tmp_path / "partial"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("runs", "figures"))
    for name in ("compare.parquet", "scores.parquet", "translations.parquet"):
        t = pd.read_parquet(partial / name)
        arm = t["arm"] if "arm" in t else t["row"] + "-s" + t["seed"].astype(str)
        t[arm != "cogsym-s1"].to_parquet(partial / name)
    run_analysis("evidence.py", f"tiny={partial}", figures=tmp_path / "partial-figures")
    seeds = pd.read_csv(tmp_path / "partial-figures" / "evidence.csv").groupby("row")["n_seeds"].max()
    assert seeds["cogsym"] == 1 and seeds["cogsym-lora"] == 2
    words = (tmp_path / "partial-figures" / "evidence.md").read_text()
    assert f"{len(compare) - 1} of {len(compare)} runs compared" in words and "**in progress**" in words
    (partial / "compare.parquet").unlink()
    run_analysis("evidence.py", f"tiny={partial}", figures=tmp_path / "partial-figures")
    assert f"0 of {len(compare)} runs" in (tmp_path / "partial-figures" / "evidence.md").read_text()

    # the tables alone (no runs/: weights are never committed) continue where they stopped
    kept = tmp_path / "kept"
    shutil.copytree(out, kept, ignore=shutil.ignore_patterns("runs"))
    before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*.parquet")}
    run(build_config(kept, preset_name="standard", model=str(model), corpus=str(corpus), **STANDARD_TINY),
        log=lambda m: None)
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*.parquet")} == before
    assert not (kept / "runs").exists()

    # a machine lost after the first rows were compared, before the probe finished: only the probe
    # run is trained again (its checkpoints are swept); full fine-tuning's length is already recorded
    lost = tmp_path / "lost"
    shutil.copytree(out, lost, ignore=shutil.ignore_patterns("runs"))
    record = json.loads((lost / "study.json").read_text())
    for name in ("probe", "select"):
        del record["stage_seconds"][name]
    (lost / "study.json").write_text(json.dumps(record))
    for name in ("sweeps.parquet", "sweeps.parquet.json", "selection-budget.json"):
        (lost / name).unlink()
    run(build_config(lost, preset_name="standard", model=str(model), corpus=str(corpus), **STANDARD_TINY),
        log=lambda m: None)
    assert [p.name for p in (lost / "runs").iterdir()] == ["blocks-s0"]
    assert (lost / "sweeps.parquet").is_file()
    budget = [json.loads((d / "selection-budget.json").read_text()) for d in (lost, out)]
    assert budget[0] == budget[1]


def test_eta_comes_from_the_stage_times_the_study_measured():
    from cogprobe.study.pipeline import Progress
    weights = {"baseline": 1, "choose lr": 0.5, "tune full-s0": 3, "tune cogsym-s0": 3,
               "compare full-s0": 1, "compare cogsym-s0": 1}
    assert Progress(weights, {}).eta() is None                          # nothing measured: no guess printed
    progress = Progress(weights, {"baseline": 100.0, "choose lr": 7200.0})
    # no tune or compare measured yet: weight x the median seconds per weight (100 and 14400 -> 7250)
    assert progress.eta() == pytest.approx(8 * 7250.0)
    progress.finished("tune full-s0", 2800.0)
    progress.finished("compare full-s0", 600.0)
    assert progress.eta() == pytest.approx(2800.0 + 600.0)               # the left stages take what theirs took
    lines = []
    Progress(weights, {"baseline": 60.0}, log=lines.append).stage("choose lr")
    assert lines == ["[00:00, ETA ~08:30] choose lr"]                   # 8.5 weights left x 60 s


def test_a_stage_run_again_keeps_its_longer_time_not_the_sum(tmp_path):
    """A run retrained because its weights were lost with the machine counts once, and a no-op rerun
    of a finished stage adds nothing: a (language, seed) costs what one run costs."""
    import time
    from cogprobe.study.pipeline import Progress, run_stage
    record = {"model": "m", "corpus": "c", "steps": 4, "stage_seconds": {"tune full-s0": 100.0, "tune x-s0": 0.01}}
    (tmp_path / "study.json").write_text(json.dumps(record))
    progress = Progress({"tune full-s0": 1, "tune x-s0": 1}, log=lambda m: None)
    run_stage(progress, tmp_path, "tune full-s0", lambda: None, again=True)       # its run was complete
    run_stage(progress, tmp_path, "tune x-s0", lambda: time.sleep(0.2), again=True)  # retrained
    record = json.loads((tmp_path / "study.json").read_text())
    assert record["stage_seconds"]["tune full-s0"] == 100.0 and record["stage_seconds"]["tune x-s0"] >= 0.2
    # the machine of the time kept: none for the stage whose older time stands, this one's for the other
    assert record["stage_machines"] == {"tune x-s0": machine()}


def test_the_study_process_scores_at_the_threads_it_was_given(monkeypatch, tmp_path):
    """`threads` holds for the baseline, compare and probe scoring in the study's own process, not
    only in its training children (two studies side by side at the default oversubscribed 2 cores)."""
    import torch
    from cogprobe.study import pipeline as study
    seen = []
    monkeypatch.setattr(study, "_run", lambda config, log: seen.append(torch.get_num_threads()) or tmp_path)
    before = torch.get_num_threads()
    study.run(build_config(tmp_path, preset_name=None, threads=before + 1), log=lambda m: None)
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_make_evidence_continues_the_committed_studies():
    """The Makefile's evidence and converged commands build each committed study's own config: a preset change that
    would make them refuse their folder (a different study) fails here, not hours into a session."""
    import dataclasses
    import re
    import shlex

    from cogprobe.cli import build_parser
    from cogprobe.core import io
    from cogprobe.study.config import StudyConfig, renamed
    from cogprobe.study.pipeline import compared_identities
    repo = Path(__file__).parent.parent
    lines = re.findall(r"\$\(BIN\)/cogprobe (run --preset (?:standard|converged) [^&\n]*)", (repo / "Makefile").read_text())
    assert len(lines) == 4   # make evidence's two languages, make converged, make converged-gpu
    begun = []
    for line in lines:
        argv = shlex.split(line.replace("$(EVIDENCE)", "analyses/evidence"))
        a = build_parser().parse_args(argv)
        overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(StudyConfig) if f.name != "out"}
        config = build_config(a.out, preset_name=a.preset, config_file=a.config, **overrides)   # a valid study
        if not (repo / a.out / "study.json").is_file():
            continue   # not begun (converged-gpu: no GPU has run it), so nothing to continue
        want, have = compared_identities(config, renamed(io.read_json(repo / a.out / "study.json")))
        assert want == have, a.out
        begun.append(a.out)
    assert len(begun) == 3, begun


def test_every_seed_of_the_compared_rows_trains_before_the_pivot_only_controls():
    """A study cut short has the headline's seeds first, and each control trains after its row."""
    config = build_config("x", preset_name="converged", seeds="0,1", rows="full,cogsym-ends,full@pivot")
    assert run_order(config) == [("full", 0), ("cogsym-ends", 0), ("full", 1), ("cogsym-ends", 1),
                                 ("full@pivot", 0), ("full@pivot", 1)]


def test_a_converged_study_keeps_the_caps_schedule_and_scores_its_earlier_step(setup, tmp_path):
    """The converged preset's path at tiny sizes: a cosine schedule of the 8-step cap for every run (the
    learning-rate trials are its first steps, full stops on a plateau from plateau_min_steps and the others
    train as long on the same schedule), each run also scored on test at step 2 (compare_steps.parquet, its
    shares of full's gain at step 2), and random-ends one set for both seeds, its ends trained; the chunked
    loss (an execution knob) in every run."""
    root, model, corpus = setup
    config = build_config(tmp_path / "conv", preset_name="converged", model=str(model), corpus=str(corpus),
                          **{**STANDARD_TINY, "steps": 8, "plateau_min_steps": 4, "warmup": 0, "lr_steps": 2,
                             "compare_steps": "2", "save_steps": "2", "prose_passages": 20, "sweep_ks": None,
                             "eval_steps": "every:1", "seeds": "0,1", "loss_chunk_tokens": 16,
                             "rows": "full,cogsym-ends,random-ends", "pivot_steps": 0})   # as it began
    preset = build_config("x", preset_name="converged")
    assert preset.rows == config.rows + ",full@pivot,cogsym-ends@pivot,random-ends@pivot" and preset.pivot_steps == 400
    assert config.schedule == "cosine"
    out = run(config, log=lambda m: None)
    length = json.loads((out / "study.json").read_text())["run_length"]
    assert 4 <= length <= 8
    trials = sorted((out / "runs" / "lr-trials").iterdir())
    runs = [out / "runs" / f"{r}-s{s}" for s in (0, 1) for r in ("full", "cogsym-ends", "random-ends")]
    for folder in trials + runs:
        cfg = json.loads((folder / "manifest.json").read_text())["config"]
        assert cfg["schedule_steps"] == 8 and cfg["schedule"] == "cosine", folder.name
        assert cfg["loss_chunk_tokens"] == 16, folder.name   # the study's memory knob reaches every run
    compare = pd.read_parquet(out / COMPARE)
    assert len(compare) == 6
    ends = compare[compare["row"] == "random-ends"]
    assert ends["blocks"].nunique() == 1 and (ends["trainable_params"] > compare.loc[
        compare["row"] == "cogsym-ends", "trainable_params"].min() * 0.5).all()
    early = pd.read_parquet(out / "compare_steps.parquet")
    assert sorted(zip(early["row"], early["seed"], early["step"])) == sorted(
        (r, s, 2) for r in ("full", "cogsym-ends", "random-ends") for s in (0, 1))
    assert (early.loc[early["row"] == "full", "perception_share"].dropna() == 1).all()
    assert (early["perception_nll"].values != compare.set_index(["row", "seed"]).loc[
        list(zip(early["row"], early["seed"])), "perception_nll"].values).all()   # another checkpoint, scored
    scores = pd.read_parquet(out / "scores.parquet")
    assert {"full-s0@2", "random-ends-s1@2"} <= set(scores["arm"])

    # the converged reading: every comparison at step 2 and at the end, and the change between the two
    from cogprobe.study import length as by_length
    written = by_length.write("tiny", out, tmp_path / "figures")
    found = pd.read_csv(written[1])
    end = f"tiny at the end ({length} steps)"
    assert set(found["language"]) == {"tiny at 2", end}
    moved = pd.read_csv(written[2]).set_index(["row", "other", "task", "quantity"])
    assert {("cogsym-ends", "full"), ("cogsym-ends", "random-ends")} <= {k[:2] for k in moved.index}
    assert (moved["n_seeds"] == 2).all() and (moved["step"] == 2).all() and (moved["end_step"] == length).all()
    cells = found.set_index(["language", "row", "other", "task", "quantity"])["estimate"]
    for (row, other, task, quantity), r in moved.iterrows():   # the change is the end minus the step, per seed
        want = cells[(end, row, other, task, quantity)] - cells[("tiny at 2", row, other, task, quantity)]
        assert r["estimate"] == pytest.approx(want, abs=1e-9), (row, other, task, quantity)
        assert r["low"] <= r["estimate"] <= r["high"]
    text = written[0].read_text()
    assert "| question | tiny at 2 perception | tiny at 2 production | tiny at the end (" in text
    assert "cogsym-ends vs full, perception, rel deviation:" in text
    assert "CogSym-ends keeps more of the gain than a random set of its size" in text
    assert "every block, test NLL" not in text   # no blocks row in this study: its questions are left out
    assert "## English prose: the quantisation control, the runs at step 2" in text   # the English at each reading
    from cogprobe.study import prose_control
    prose = pd.read_parquet(out / "prose.parquet").groupby("arm")[["nll_sum", "n_tokens"]].sum()
    english = prose["nll_sum"] / prose["n_tokens"]
    at_2 = prose_control.changes(out, 2).set_index(["row", "seed"])["change"]
    assert at_2[("full", 1)] == pytest.approx(english["full-s1@2"] - english["base"], abs=1e-9)
    script = Path(__file__).parent.parent / "analyses" / "converged.py"   # the same, from the shell
    done = subprocess.run([sys.executable, str(script), f"tiny={out}"], capture_output=True, text=True,
                          env={**os.environ, "COGPROBE_FIGURES": str(tmp_path / "shell")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "shell" / "converged.md").read_text() == text

    # pivot-only controls added to the finished study, as the preset has them: a rerun trains them (the rows
    # before are kept), each the first 2 steps of its row's schedule, read against its row as scored at step 2
    before = json.loads((out / "study.json").read_text())["stage_seconds"]
    added = dataclasses.replace(config, rows=preset.rows, pivot_steps=2)
    run(added, log=lambda m: None)
    seconds = json.loads((out / "study.json").read_text())["stage_seconds"]
    assert {k: seconds[k] for k in before if k.startswith(("tune", "compare", "probe"))} == {
        k: v for k, v in before.items() if k.startswith(("tune", "compare", "probe"))}
    for s in (0, 1):
        cfg = json.loads((out / "runs" / f"cogsym-ends@pivot-s{s}" / "manifest.json").read_text())["config"]
        assert (cfg["steps"], cfg["schedule_steps"], cfg["mix_pivot"], cfg["mix_production"]) == (2, 8, 1, 0)
    from cogprobe.study.pivot_control import subtracted
    lines = subtracted(out).set_index(["row", "seed", "task", "quantity"])["estimate"]
    early_nll = early.set_index(["row", "seed"])["perception_nll"]
    base = pd.read_csv(out / "baseline.csv").iloc[0]["perception_nll"]
    assert lines[("cogsym-ends", 0, "perception", "gain")] == pytest.approx(base - early_nll[("cogsym-ends", 0)])
    assert lines[("cogsym-ends", 0, "perception", "share")] == pytest.approx(
        (base - early_nll[("cogsym-ends", 0)]) / (base - early_nll[("full", 0)]))
    assert ("cogsym-ends", -1, "production", "net_share") in lines.index   # pooled over the two seeds
    assert "for the first 2 steps of ROW's schedule" in by_length.write("tiny", out, tmp_path / "again")[0].read_text()
    for rows in ("full,cogsym-ends", preset.rows + ",bottom"):
        with pytest.raises(CogprobeError, match="different study"):   # a row removed, or a row that is no control
            run(dataclasses.replace(added, rows=rows), log=lambda m: None)

    # a run's recorded scores against its weights (analyses/rescored.py): the same, until the record changes
    assert "same scores" in run_analysis("rescored.py", out, "cogsym-ends-s1@2")
    scores = pd.read_parquet(out / "scores.parquet")
    scores.loc[(scores["arm"] == "cogsym-ends-s1@2") & (scores["task"] == "production"), "nll_sum"] += 1e-6
    scores.to_parquet(out / "scores.parquet")
    assert "scores differ" in run_analysis("rescored.py", out, "cogsym-ends-s1@2", code=1)

    # a run trained again after its weights were lost, its earlier step scored from the lost weights: the
    # step is scored again from the weights on disk, so the step and the end come from one training
    early = pd.read_parquet(out / "compare_steps.parquet")
    stale = (early["row"] == "cogsym-ends") & (early["seed"] == 1)
    assert early["weights_sha256"].str.len().eq(64).all()
    early.assign(weights_sha256=early["weights_sha256"].where(~stale, "lost")).to_parquet(out / "compare_steps.parquet")
    compare = pd.read_parquet(out / COMPARE)
    compare[~((compare["row"] == "cogsym-ends") & (compare["seed"] == 1))].to_parquet(out / COMPARE)
    record = json.loads((out / "study.json").read_text())   # its compare stage stopped before the end
    del record["stage_seconds"]["compare cogsym-ends-s1"]
    (out / "study.json").write_text(json.dumps(record))
    run(added, log=lambda m: None)
    again = pd.read_parquet(out / "compare_steps.parquet").set_index(["row", "seed", "step"])
    assert again.loc[("cogsym-ends", 1, 2), "weights_sha256"] == early.loc[stale, "weights_sha256"].iloc[0]
    assert "same scores" in run_analysis("rescored.py", out, "cogsym-ends-s1@2")   # the tampered rows replaced
    assert len(again) == len(early) and (again.loc[("full", 0, 2), "perception_nll"] ==
                                         early.set_index(["row", "seed", "step"]).loc[("full", 0, 2), "perception_nll"])
