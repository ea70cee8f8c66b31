"""The benchmarks run end to end at a tiny size, so the scripts can't rot.

Nothing here asserts a time: benchmarks are not tests. What is checked is that
every table has its columns and rows, that the numbers the benchmarks compute
besides timings are right (the floor, the agreement between ways, the counts),
and that a tiny run never writes into benchmarks/results.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import capture_bench  # noqa: E402
import grid_bench  # noqa: E402
import loss_bench  # noqa: E402
import precision_bench  # noqa: E402
import probe_path  # noqa: E402
import scale_bench  # noqa: E402
import common  # noqa: E402
import sweep_bench  # noqa: E402
import tuning_bench  # noqa: E402

MACHINE = ["cpu", "cores", "torch", "torch_threads", "device", "load_avg_1m", "tiny", "commit", "date", "command"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGPROBE_BENCH_")}
    done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--tiny", "--out", str(out / "results"),
                           "--cache", str(out / "cache")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "results", done.stdout


def test_a_tiny_run_leaves_the_published_tables_alone(tiny_run):
    results, stdout = tiny_run
    assert sorted(p.name for p in results.iterdir()) == ["capture.csv", "grid.csv", "grid_by_k.csv", "latest.md",
                                                         "loss.csv", "precision.csv", "probe_path.csv", "scale.csv",
                                                         "scale_projection.csv", "sweeps.csv", "tuning.csv"]
    assert str(BENCH / "results") not in stdout   # every table went to --out


def _table(results: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(results / f"{name}.csv")


@pytest.mark.parametrize("name,module", [("capture", capture_bench), ("sweeps", sweep_bench),
                                         ("tuning", tuning_bench), ("probe_path", probe_path), ("grid", grid_bench),
                                         ("scale", scale_bench), ("precision", precision_bench), ("loss", loss_bench)])
def test_tables_have_their_columns_and_the_machine_on_every_row(tiny_run, name, module):
    table = _table(tiny_run[0], name)
    assert list(table.columns) == module.COLUMNS + MACHINE
    assert table[MACHINE].notna().all().all()
    assert table["tiny"].all() and table["cores"].ge(1).all() and table["torch_threads"].eq(1).all()
    assert table["command"].str.contains("run_all.py --tiny").all()


def test_capture_rows_agree_with_each_other(tiny_run):
    table = _table(tiny_run[0], "capture").set_index("method")
    assert list(table.index) == list(capture_bench.VARIANTS)
    capturing = table.drop(index=["plain forward", "plain decoder"])
    assert capturing["max_abs_diff_vs_cogprobe"].le(1e-4).all()  # every way captured the same residuals
    assert table["max_abs_diff_vs_cogprobe"][["plain forward", "plain decoder"]].isna().all()
    assert table.loc["plain forward", "ratio_to_plain"] == 1.0
    assert table["seconds"].gt(0).all() and table["peak_rss_mib"].gt(0).all()
    assert (table["peak_rss_mib"] >= table["call_extra_mib"]).all()
    assert table["batch"].str.fullmatch(r"\d+x\d+").all()


def test_sweeps_agree_and_count_against_the_floor(tiny_run):
    table = _table(tiny_run[0], "sweeps")
    assert sorted(zip(table.scenario, table.engine)) == [("1 checkpoint", "fast"), ("1 checkpoint", "naive"),
                                                         ("4 checkpoints", "fast"), ("4 checkpoints", "naive")]
    assert table["max_abs_dnll"].le(1e-4).all()
    assert (table["block_evals"] >= table["floor_block_evals"]).all()
    fast, naive = (table[table.engine == e].set_index("scenario") for e in ("fast", "naive"))
    assert (fast["block_evals"] < naive["block_evals"]).all()
    assert fast["evals_over_floor"].le(1.2).all()
    assert list(fast["checkpoints"]) == [1, 4]
    assert table["checkpoint_source"].str.contains("full fine-tuning").all()


def test_the_loss_benchmark_trains_each_model_with_both_losses(tiny_run):
    table = _table(tiny_run[0], "loss").set_index("name")
    assert list(table.index) == list(loss_bench.CASES)
    assert table["chunk"].tolist() == [0, 8, 0, 8] and table["vocab"].tolist()[2:] == [4096, 4096]
    for model in ("embedded", "vocab-128k"):   # the same first step, whichever loss computed it
        own, chunked = table.loc[f"{model}, own loss"], table.loc[f"{model}, chunked"]
        assert chunked["loss_step_1"] == pytest.approx(own["loss_step_1"], rel=1e-5)
        assert own["peak_vs_own"] == 1.0


def test_tuning_counts_follow_the_strategies(tiny_run):
    table = _table(tiny_run[0], "tuning").set_index("name")
    assert list(table.index) == list(tuning_bench.STRATEGIES)
    p = table["trainable_params"]
    assert p["full"] > p["cogsym layers"] > 0 and p["lora"] > p["cogsym lora"] > 0
    assert p["last quarter"] == p["cogsym layers"]  # the same number of (identical) blocks
    assert table.loc["last quarter", "layers"] == "4-5" and table.loc["cogsym layers", "layers"] == "0,5"
    # AdamW keeps two fp32 moments per trainable parameter (plus a step counter per tensor)
    assert (table["optimizer_state_bytes"] >= 8 * p).all()
    assert (table["optimizer_state_bytes"] < 8 * p + 4096).all()
    assert table["measured_steps"].eq(2).all() and table["sec_per_step"].gt(0).all()


def test_probe_path_gives_the_same_answers_both_ways(tiny_run):
    table = _table(tiny_run[0], "probe_path").set_index("path")
    assert list(table.index) == ["before", "now"]
    assert table["identical_sweep_rows"].all() and table["same_set"].all()
    assert table.loc["before", "search"] == "exhaustive" and table.loc["now", "search"] == "frontier"
    assert table.loc["before", "candidates_from_sweep"] == 0 < table.loc["now", "candidates_from_sweep"]
    assert table.loc["now", "candidates_scored"] < table.loc["before", "candidates_scored"] + \
        table.loc["now", "candidates_from_sweep"]


def test_scale_engines_give_the_same_rows_and_the_projection_says_what_fits(tiny_run):
    table = _table(tiny_run[0], "scale")
    streamed = table[table["engine"] == "streamed"]
    assert set(streamed["model"]) == {"embedded", "llama-1b"}
    assert (streamed["max_abs_dnll"] == 0.0).all() and (streamed["block_loads"] > 0).all()
    projected = _table(tiny_run[0], "scale_projection")
    assert list(projected.columns) == scale_bench.PROJECTION_COLUMNS + MACHINE
    projected = projected.set_index(["model", "budget"])
    assert not projected.loc[("llama-3-70b", "80 GB GPU"), "memory_fits"]       # two 70B models: 2 x 141 GB
    assert projected.loc[("llama-3-70b", "24 GB GPU"), "streamed_fits"]         # two blocks and the ends


def test_precision_compares_every_task(tiny_run):
    table = _table(tiny_run[0], "precision")
    assert list(table["task"]) == ["perception", "production"]
    assert (table["max_abs_example_dnll"] > 0).all()    # bf16 does move the numbers: the table says how far
    assert (table["median_abs_example_dnll"] <= table["max_abs_example_dnll"]).all()


def test_the_grids_agree_where_both_score(tiny_run):
    """6 blocks: the coarse grid is every k, so the two grids are one (the same rows, counts and set)."""
    table = _table(tiny_run[0], "grid").set_index("grid")
    assert list(table.index) == ["full", "adaptive"]
    assert table["ks_scored"].eq(7).all() and table["block_evals"].nunique() == 1 and table["same_set"].all()
    by_k = _table(tiny_run[0], "grid_by_k")
    assert list(by_k["k"]) == list(range(7)) and by_k["within"].all() and by_k["max_abs_diff"].eq(0).all()


def test_run_all_prints_and_writes_the_targets(tiny_run):
    results, stdout = tiny_run
    latest = (results / "latest.md").read_text()
    assert "### targets" in latest and "TINY MODEL" in latest
    for target in ("cogprobe time <= 1.10x plain forward", "fast >= 1.8x naive", "fast within 1.2x of the floor",
                   "cogsym layers step time <= 0.75x full", "cogsym layers optimizer state <= 0.25x full"):
        assert target in latest and target in stdout


def test_a_worker_runs_in_its_own_process(tmp_path):
    """The path the real benchmark takes: one measurement in a fresh interpreter, JSON back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGPROBE_BENCH_")}
    env.update(COGPROBE_BENCH_TINY="1", COGPROBE_BENCH_CACHE=str(tmp_path / "cache"),
               COGPROBE_BENCH_OUT=str(tmp_path / "results"), COGPROBE_BENCH_SUBPROCESS="1")
    old = dict(os.environ)
    os.environ.update(env)
    try:
        common.model_spec(), common.train_corpus()
        result = common.measure_in_worker(BENCH / "capture_bench.py", capture_bench.measure, "--method", "cogprobe")
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert result["method"] == "cogprobe" and result["memory_kind"] in ("rss-hwm", "rss-sampled")
    assert result["peak"] > 100 * common.MiB  # a whole interpreter with torch: the process's RSS
    assert 0 <= result["extra"] <= result["peak"]
    assert len(result["norms"]) == 6 and all(n > 0 for n in result["norms"])
    assert not (tmp_path / "results").exists()


def test_peak_memory_sees_a_short_lived_allocation():
    """In a fresh process: one that ran other tests may hold freed pages that the 64 MiB reuses without
    raising its resident size (seen under `make test`'s test processes)."""
    code = ("import torch; from cogprobe.core.memory import PeakMemory\n"
            "with PeakMemory() as mem:\n    x = torch.ones(64 * 2**20 // 4); del x  # 64 MiB, touched\n"
            "print(mem.kind, mem.extra)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    kind, extra = done.stdout.split()
    assert kind in ("rss-hwm", "rss-sampled")
    assert int(extra) >= 60 * common.MiB


def test_timeit_returns_the_median(monkeypatch):
    """On a fake clock each call takes exactly its planted time, so a loaded machine cannot move it."""
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    durations = iter([5.0, 0.03, 0.01, 0.02])  # warm-up (not timed), then three timed calls

    def call():
        clock[0] += next(durations)
    assert common.timeit(call, repeats=3, warmup=1) == pytest.approx(0.02)
    assert common.times(lambda: clock.__setitem__(0, clock[0] + 1.5), repeats=2, warmup=0) == pytest.approx([1.5, 1.5])


# ------------------------------------------------------------------ the floor, by hand

def _changes(n, blocks, embed):
    return (set(blocks), embed)


def test_floor_of_a_full_fine_tuning_sweep():
    """L blocks, all changed (+ embeddings). Per checkpoint, under its embeddings: the checkpoint
    path c^L (L nodes), the chain r^L (L; input k=L = output k=L), the input sweep's branches
    r^k c^(L-k) off that chain (L-k new nodes, k=1..L-1) and the output sweep's c^(L-k) r^k off
    the checkpoint path (k new nodes, k=1..L-1). Plus the reference path, shared."""
    L = 30
    configs = sweep_bench.all_configs(L)
    own = L + L + 2 * (L * (L - 1) // 2)
    assert own == 930
    one = sweep_bench.floor_block_evals(configs, {4: _changes(L, range(L), True)}, n_batches=1)
    assert one == own + L
    four = sweep_bench.floor_block_evals(configs, {s: _changes(L, range(L), True) for s in (1, 2, 3, 4)}, 2)
    assert four == 2 * (4 * own + L)


def test_floor_shares_unchanged_blocks_with_the_reference():
    """Only blocks 0 and 5 of 6 changed, embeddings not: every configuration's path is the
    reference's until the first changed block it keeps."""
    L = 6
    configs = sweep_bench.all_configs(L)
    got = sweep_bench.floor_block_evals(configs, {1: _changes(L, {0, 5}, False)}, n_batches=1)
    # distinct normalised keys: reference r^6; keep block 0 (input k=0, output k=1..5): c r r r r {c|r};
    # input k>=1 keeps 5 only: r r r r r c; output k>=1 and k<6 keeps 0: c r r r r r
    # nodes: reference chain 6, "c..." chain 6 + one branch at block 5, "r r r r r c" 1 extra
    assert got == 6 + 6 + 1 + 1


def test_fast_naive_comparison_sees_a_difference_and_refuses_mismatched_rows():
    keys = dict(checkpoint_step=[1, 1], task=["perception", "production"], direction=["input"] * 2,
                mode=["revert"] * 2, k=[3, 3])
    a = pd.DataFrame(dict(keys, nll=[2.0, 3.0]))
    assert sweep_bench.max_abs_dnll(a, pd.DataFrame(dict(keys, nll=[2.0, 3.25]))) == 0.25
    with pytest.raises(RuntimeError, match="different rows"):
        sweep_bench.max_abs_dnll(a, a.iloc[:1])


def test_gpu_smoke_refuses_without_cuda_and_runs_with_allow_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGPROBE_BENCH_")}
    base = [sys.executable, str(BENCH / "gpu_smoke.py"), "--tiny", "--out", str(tmp_path / "results"),
            "--cache", str(tmp_path / "cache")]
    refused = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    if refused.returncode == 0:
        pytest.skip("a CUDA device is here: the refusal path does not apply")
    assert "no CUDA device here" in refused.stderr
    done = subprocess.run(base + ["--allow-cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device: cpu" in done.stdout
    table = pd.read_csv(tmp_path / "results" / "gpu_smoke.csv")
    assert table["stage"].str.startswith("train full").sum() == 1
    assert table["stage"].str.startswith("sweep revert").sum() == 1
    assert (table["seconds"] > 0).all() and (table["peak_memory_mib"] > 0).all()


def test_translate_batch_gives_the_same_hypotheses_at_every_batch_size(trained_run):
    done = subprocess.run([sys.executable, str(BENCH / "translate_batch.py"), str(trained_run["run"]),
                           "--corpus", str(trained_run["corpus"]), "--pairs", "0", "--batch-sizes", "1,2,4",
                           "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("batch ")]
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 2", "batch 4"]
    for line in lines:
        same, total = line.split("; ")[1].split(" identical")[0].split(" of ")
        assert int(same) == int(total) > 0, line
