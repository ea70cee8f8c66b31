import pytest
import pandas as pd

from cogprobe.data.corpora import Corpus
from cogprobe.data.tasks import build_examples
from cogprobe.data.translate import chrf, translate
from tiny import tiny_model, tiny_tokenizer

CORPUS = Corpus("toy", pd.DataFrame({"pivot": ["la casa es grande", "el agua"], "target": ["in calli huei", "in atl"],
                                     "document": ["", ""]}), "Spanish", "Nahuatl")


def test_translate_is_batch_invariant_and_one_line():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    examples = build_examples(tok, CORPUS, "production")
    one, refs = translate(model, tok, examples, batch_size=1, max_new_tokens=8)
    two, _ = translate(model, tok, examples, batch_size=2, max_new_tokens=8)
    assert refs == ["in calli huei", "in atl"]
    assert one == two and all("\n" not in h for h in one)


def test_chrf_bounds():
    assert chrf(["in calli huei"], ["in calli huei"]) == 100.0
    assert chrf(["zzz"], ["in calli huei"]) < 10


def test_chrf_intervals_are_paired_and_exact_at_the_estimate():
    import pandas as pd
    from cogprobe.data.translate import chrf_intervals
    refs = ["in calli huei", "in atl itztic", "ce tlacatl", "in tlaxcalli", "in cihuatl"] * 4
    good = ["in calli", "in atl", "ce tlacatl", "tlaxcalli", "cihuatl"] * 4
    rows = [pd.DataFrame(dict(arm=arm, task="production", pair_id=range(20), hypothesis=hyps, reference=refs))
            for arm, hyps in (("full-s0", good), ("same-s0", good), ("bad-s0", ["x"] * 20))]
    t = chrf_intervals(pd.concat(rows), "full-s0", n_resamples=500).set_index(["arm", "quantity"])
    assert t.loc[("full-s0", "chrf"), "estimate"] == pytest.approx(chrf(good, refs))
    same = t.loc[("same-s0", "chrf_rel_deviation")]
    assert same["estimate"] == same["low"] == same["high"] == 0  # the same sentences in every resample
    assert t.loc[("bad-s0", "chrf_rel_deviation"), "low"] > 0.5


def test_chrf_over_seeds_is_the_mean_of_each_seeds_corpus_chrf():
    from cogprobe.data.translate import chrf_over_seeds, sentence_stats
    refs = ["in calli huei", "in atl itztic", "ce tlacatl", "in tlaxcalli", "in cihuatl"] * 4
    hyps = {"a-s0": ["in calli", "in atl", "ce tlacatl", "tlaxcalli", "cihuatl"] * 4,
            "a-s1": ["in calli huei", "atl", "tlacatl", "in tlax", "x"] * 4, "base": ["x"] * 20}
    t = pd.concat([pd.DataFrame(dict(arm=arm, task="production", pair_id=range(20), hypothesis=h, reference=refs))
                   for arm, h in hyps.items()])
    seeds = [{k: v for k, v in zip(("row", "base"), sentence_stats(t, [arm, "base"], "production").values())}
             for arm in ("a-s0", "a-s1")]
    got = chrf_over_seeds(lambda m: m["row"] - m["base"], seeds, n_resamples=300)
    want = [chrf(hyps[a], refs) - chrf(hyps["base"], refs) for a in ("a-s0", "a-s1")]
    assert got.estimate == pytest.approx(sum(want) / 2)
    assert got.low < min(want) < max(want) < got.high   # the seeds' spread is inside the interval
    one = chrf_over_seeds(lambda m: m["row"], seeds[:1], n_resamples=300)
    assert one.estimate == pytest.approx(chrf(hyps["a-s0"], refs)) and one.low < one.estimate < one.high
