import pytest
import pandas as pd

from cogprobe.corpora import Corpus
from cogprobe.tasks import build_examples
from cogprobe.translate import chrf, translate
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
    from cogprobe.translate import chrf_intervals
    refs = ["in calli huei", "in atl itztic", "ce tlacatl", "in tlaxcalli", "in cihuatl"] * 4
    good = ["in calli", "in atl", "ce tlacatl", "tlaxcalli", "cihuatl"] * 4
    rows = [pd.DataFrame(dict(arm=arm, task="production", pair_id=range(20), hypothesis=hyps, reference=refs))
            for arm, hyps in (("full-s0", good), ("same-s0", good), ("bad-s0", ["x"] * 20))]
    t = chrf_intervals(pd.concat(rows), "full-s0", n_resamples=500).set_index(["arm", "quantity"])
    assert t.loc[("full-s0", "chrf"), "estimate"] == pytest.approx(chrf(good, refs))
    same = t.loc[("same-s0", "chrf_rel_deviation")]
    assert same["estimate"] == same["low"] == same["high"] == 0  # the same sentences in every resample
    assert t.loc[("bad-s0", "chrf_rel_deviation"), "low"] > 0.5
