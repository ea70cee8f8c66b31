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
