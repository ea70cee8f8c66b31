from __future__ import annotations

import json

import pandas as pd
import pytest

from cogprobe.data.corpora import Corpus, load_corpus, normalise, split_corpus, split_overlap
from cogprobe.core.errors import CogprobeError

PAIRS = [("el agua", "in atl"), ("la casa", "in calli"), ("el hombre", "in tlacatl"),
         ("la tortilla", "in tlaxcalli")]


@pytest.fixture(scope="module")
def axolotl() -> Corpus:
    return load_corpus("axolotl")


def _write(path, rows: list[dict], sep: str | None = None):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    else:
        pd.DataFrame(rows).to_csv(path, sep=sep or ",", index=False)
    return path


# --- elotl corpora -------------------------------------------------------------------

def test_axolotl(axolotl):
    assert list(axolotl.pairs.columns) == ["pair_id", "pivot", "target", "document"]
    assert axolotl.pairs["pair_id"].tolist() == list(range(len(axolotl)))
    assert (axolotl.pivot_name, axolotl.target_name) == ("Spanish", "Nahuatl")
    assert 14_500 < len(axolotl) < 15_500
    assert axolotl.dropped["duplicate"] > 500
    assert axolotl.pairs["document"].nunique() > 20
    assert not axolotl.pairs.duplicated(["pivot", "target"]).any()
    assert list(axolotl.pairs.index) == list(range(len(axolotl)))
    first = axolotl.pairs.iloc[0]
    assert first["pivot"].startswith("Y así") and first["target"].startswith("Auh in")


def test_tsunkua_and_kolo():
    tsunkua = load_corpus("tsunkua")
    assert (tsunkua.pivot_name, tsunkua.target_name) == ("Spanish", "Otomí")
    assert 4_800 < len(tsunkua) < 4_963
    assert tsunkua.dropped["empty"] >= 1
    kolo = load_corpus("kolo")
    assert (kolo.pivot_name, kolo.target_name) == ("Spanish", "Mixtec")
    assert 1_500 < len(kolo) < 1_710 and kolo.pairs["document"].nunique() > 5
    for c in (tsunkua, kolo):
        assert (c.pairs[["pivot", "target"]] != "").all().all()
        assert (c.pairs["pivot"] == c.pairs["pivot"].str.strip()).all()


def test_unknown_name():
    with pytest.raises(CogprobeError, match=r"axolotl, tsunkua, kolo.*CSV/TSV/JSONL"):
        load_corpus("axolotll")


# --- files ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_file_explicit_columns(tmp_path, suffix):
    rows = [{"src": p, "tgt": t, "book": f"b{i % 2}"} for i, (p, t) in enumerate(PAIRS)]
    path = _write(tmp_path / f"mine{suffix}", rows, sep="\t" if suffix == ".tsv" else None)
    c = load_corpus(path, pivot_col="src", target_col="tgt", document_col="book",
                    target_name="Nahuatl")
    assert c.name == "mine" and (c.pivot_name, c.target_name) == ("src", "Nahuatl")
    assert list(c.pairs.drop(columns="pair_id").itertuples(index=False, name=None)) == [
        (p, t, f"b{i % 2}") for i, (p, t) in enumerate(PAIRS)]


def test_tsv_keeps_commas_and_na_words(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("es\tnah\nsí, NA\tNA\n", "utf-8")
    c = load_corpus(path)
    assert c.pairs.iloc[0].tolist() == [0, "sí, NA", "NA", ""]


def test_autodetect(tmp_path):
    rows = [{"es": p, "nah": t, "variant": "x", "document": "d"} for p, t in PAIRS]
    c = load_corpus(_write(tmp_path / "a.csv", rows))
    assert (c.pivot_name, c.target_name) == ("Spanish", "Nahuatl")
    assert c.pairs["target"].tolist() == [t for _, t in PAIRS]
    assert set(c.pairs["document"]) == {"d"}
    generic = [{"pivot": p, "target": t} for p, t in PAIRS]
    c = load_corpus(_write(tmp_path / "g.jsonl", generic))
    assert (c.pivot_name, c.target_name) == ("pivot", "target")
    assert set(c.pairs["document"]) == {""}


def test_cleaning_counts(tmp_path):
    rows = [{"es": "  a  ", "oto": " b "}, {"es": "a", "oto": "b"}, {"es": "", "oto": "c"},
            {"es": "d", "oto": "   "}, {"es": "a", "oto": "e"}]
    c = load_corpus(_write(tmp_path / "c.csv", rows))
    assert c.pairs[["pivot", "target"]].values.tolist() == [["a", "b"], ["a", "e"]]
    assert c.dropped == {"empty": 2, "duplicate": 1}


def test_ambiguous_columns(tmp_path):
    rows = [{"es": p, "nah": t, "en": "x"} for p, t in PAIRS]
    with pytest.raises(CogprobeError, match=r"es, nah, en.*--pivot-col X --target-col Y"):
        load_corpus(_write(tmp_path / "a.csv", rows))


def test_missing_column(tmp_path):
    path = _write(tmp_path / "a.csv", [{"es": p, "nah": t} for p, t in PAIRS])
    with pytest.raises(CogprobeError, match=r"target column 'nahuatl'.*es, nah"):
        load_corpus(path, target_col="nahuatl")
    with pytest.raises(CogprobeError, match=r"document column 'doc'.*es, nah"):
        load_corpus(path, document_col="doc")


def test_empty_and_headerless_files(tmp_path):
    (tmp_path / "e.csv").write_text("", "utf-8")
    with pytest.raises(CogprobeError, match="e.csv is empty"):
        load_corpus(tmp_path / "e.csv")
    (tmp_path / "h.tsv").write_text("es\tnah\n", "utf-8")
    with pytest.raises(CogprobeError, match="has no rows"):
        load_corpus(tmp_path / "h.tsv")
    (tmp_path / "n.jsonl").write_text('{"es": "a", "nah": "b"}\n[1, 2]\n', "utf-8")
    with pytest.raises(CogprobeError, match="line 2 is a list"):
        load_corpus(tmp_path / "n.jsonl")


def test_all_empty_or_duplicate(tmp_path):
    rows = [{"es": "", "nah": "x"}, {"es": "y", "nah": " "}, {"es": "", "nah": ""}]
    with pytest.raises(CogprobeError, match="all 3 pairs were empty or duplicates"):
        load_corpus(_write(tmp_path / "a.csv", rows))


def test_latin1_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("es,nah\naño,xihuitl\n".encode("latin-1"))
    with pytest.raises(CogprobeError, match=r"latin.csv is not UTF-8.*re-save it as UTF-8"):
        load_corpus(path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(CogprobeError, match="does not exist"):
        load_corpus(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(CogprobeError, match="unsupported file type"):
        load_corpus(tmp_path / "x.xlsx")


# --- splits --------------------------------------------------------------------------

def _keys(c: Corpus) -> set[tuple[str, str]]:
    return set(zip(c.pairs["pivot"], c.pairs["target"]))


def test_split_deterministic_disjoint_covering(axolotl):
    a, b = split_corpus(axolotl, seed=1), split_corpus(axolotl, seed=1)
    other = split_corpus(axolotl, seed=2)
    assert a.test.pairs.equals(b.test.pairs) and a.train.pairs.equals(b.train.pairs)
    assert not a.test.pairs.equals(other.test.pairs)
    train, dev, test = (_keys(s) for s in (a.train, a.dev, a.test))
    assert not (train & dev or train & test or dev & test)
    assert train | dev | test == _keys(axolotl)
    assert len(dev) == len(test) == round(0.05 * len(axolotl))
    assert (a.test.pivot_name, a.test.target_name) == ("Spanish", "Nahuatl")


def test_split_counts(axolotl):
    s = split_corpus(axolotl, dev=100, test=200)
    assert (len(s.dev), len(s.test), len(s.train)) == (100, 200, len(axolotl) - 300)


def test_split_by_document(axolotl):
    for seed in (0, 1):
        s = split_corpus(axolotl, seed=seed, by_document=True)
        docs = [set(x.pairs["document"]) for x in (s.train, s.dev, s.test)]
        assert not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])
        assert sum(map(len, (s.train, s.dev, s.test))) == len(axolotl)
        assert 0 < len(s.test) <= round(0.05 * len(axolotl))
        assert 0 < len(s.dev) <= round(0.05 * len(axolotl))


@pytest.mark.parametrize("name", ["axolotl", "tsunkua"])
def test_split_is_leak_free_up_to_normalisation(name):
    corpus = load_corpus(name)
    for by_document in (False, True):
        s = split_corpus(corpus, by_document=by_document)
        assert set(split_overlap(s).values()) == {0}
        assert sum(map(len, (s.train, s.dev, s.test))) == len(corpus)
    # the corpus itself does repeat normalised sentences, so the grouping had work to do
    assert corpus.pairs["target"].map(normalise).duplicated().sum() > 10


def test_split_groups_normalised_sentences(tmp_path):
    rows = [{"es": f"Frase {i}.", "nah": f"tlahtolli {i}"} for i in range(40)]
    rows += [{"es": "¡FRASE   3!", "nah": "otro 1"}, {"es": "otra", "nah": "Tlahtolli-7"}]
    c = load_corpus(_write(tmp_path / "a.csv", rows))
    for seed in range(5):
        s = split_corpus(c, seed=seed, dev=5, test=5)
        assert set(split_overlap(s).values()) == {0}
        where = {p: name for name in ("train", "dev", "test") for p in getattr(s, name).pairs["pivot"]}
        assert where["Frase 3."] == where["¡FRASE   3!"] and where["Frase 7."] == where["otra"]
    assert normalise(" ¡Ca-SA,  grande! ") == "casagrande" and normalise("...") == ""


def test_split_too_small(tmp_path):
    c = load_corpus(_write(tmp_path / "a.csv", [{"es": p, "nah": t} for p, t in PAIRS]))
    with pytest.raises(CogprobeError, match=r"4 pairs, too few for test=2 \+ dev=2"):
        split_corpus(c, dev=2, test=2)
    with pytest.raises(CogprobeError, match=r"fraction 0.05 of 4 pairs is an empty split"):
        split_corpus(c)
    with pytest.raises(CogprobeError, match="not between 0 and 1"):
        split_corpus(c, dev=1.5, test=1)
    with pytest.raises(CogprobeError, match="single document"):
        split_corpus(c, dev=1, test=1, by_document=True)


def test_split_by_document_too_few_documents(tmp_path):
    rows = [{"es": p, "nah": t, "document": f"d{i % 2}"} for i, (p, t) in enumerate(PAIRS)]
    c = load_corpus(_write(tmp_path / "a.csv", rows))
    with pytest.raises(CogprobeError, match=r"2 documents \(2, 2 pairs\), too few"):
        split_corpus(c, dev=1, test=1, by_document=True)


def test_split_by_document_overshoots_rather_than_empty(tmp_path):
    sizes = {"a": 1, "b": 3, "c": 3, "d": 5}
    rows = [{"es": f"{d}{i}", "nah": f"x{d}{i}", "document": d}
            for d, n in sizes.items() for i in range(n)]
    c = load_corpus(_write(tmp_path / "a.csv", rows))
    s = split_corpus(c, dev=2, test=2, by_document=True)
    docs = [set(x.pairs["document"]) for x in (s.train, s.dev, s.test)]
    assert sorted(len(d) for d in docs[1:]) == [1, 1] and "a" in docs[1] | docs[2]
    assert sorted(map(len, (s.dev, s.test))) == [1, 3]
