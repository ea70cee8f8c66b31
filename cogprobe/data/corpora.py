"""Parallel corpora: pivot-language sentences paired with a new language.

A corpus is a table of (pivot, target, document) strings. It comes either from
the `elotl` package by name (`axolotl` Spanish-Nahuatl, `tsunkua` Spanish-Otomí,
`kolo` Spanish-Mixtec), loaded at run time so that no copy of the texts is
redistributed, or from a `.csv`, `.tsv` or `.jsonl` file with a header.

Loading cleans the pairs the same way for every source: whitespace is stripped,
pairs with an empty side are dropped, and repeated (pivot, target) pairs are
dropped after their first occurrence. `Corpus.dropped` counts what went. Each
kept pair gets a `pair_id` (its row in the cleaned corpus), the key of every
per-example score.

Splits are leak-free: pairs that share a normalised pivot or target sentence
(NFKC, case-folded, everything but letters, digits and marks removed) are one
group, and a group never straddles two splits, so no sentence of the test split
is in train even up to case, punctuation and spacing. `split_overlap` counts it.
"""
from __future__ import annotations

import csv
import io
import json
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.data import sources as corpus_sources
from cogprobe.core.errors import CogprobeError

COLUMNS = ["pair_id", "pivot", "target", "document"]
SUFFIXES = (".csv", ".tsv", ".jsonl")

# Column names taken to be language codes, with the name a prompt uses for them.
# An auto-detected or code-named column gets the language's name, so a CSV with
# columns `es`/`nah` prompts exactly like the built-in `axolotl`.
LANGUAGES = {
    "es": "Spanish", "spa": "Spanish", "en": "English", "eng": "English",
    "pt": "Portuguese", "fr": "French",
    "nah": "Nahuatl", "nci": "Nahuatl", "nhe": "Nahuatl", "azz": "Nahuatl",
    "oto": "Otomí", "ote": "Otomí", "ots": "Otomí", "otz": "Otomí",
    "mix": "Mixtec", "mxb": "Mixtec", "mig": "Mixtec",
    "quy": "Quechua", "que": "Quechua", "gn": "Guarani", "grn": "Guarani",
    "ay": "Aymara", "aym": "Aymara", "shp": "Shipibo-Konibo", "cni": "Asháninka",
    "hch": "Wixarika", "tar": "Rarámuri", "czn": "Chatino", "bzd": "Bribri",
}

# elotl ships headerless CSVs; these are their layouts (checked against elotl 0.1.1).
ELOTL = {
    "axolotl": ["es", "nah", "variant", "document", "iso"],
    "tsunkua": ["es", "oto", "variant", "document", "file", "id"],
    "kolo": ["es", "mix", "variant", "document"],
}


@dataclass(frozen=True, eq=False)
class Corpus:
    """Cleaned sentence pairs; `pairs` has exactly the columns pair_id, pivot, target, document."""

    name: str
    pairs: pd.DataFrame
    pivot_name: str
    target_name: str
    dropped: dict[str, int] = field(default_factory=dict)  # {"empty": n, "duplicate": m}

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True)
class Splits:
    train: Corpus
    dev: Corpus
    test: Corpus


def load_corpus(spec: str | Path, *, pivot_col: str | None = None,
                target_col: str | None = None, document_col: str | None = None,
                pivot_name: str | None = None, target_name: str | None = None) -> Corpus:
    """Load an elotl corpus by name or a CSV/TSV/JSONL file, choose its columns, clean it."""
    path = Path(spec)
    if str(spec) in ELOTL:
        name, table = str(spec), _read_elotl(str(spec))
    elif found := corpus_sources.read(spec):  # datasets folders, Parquet, hub dataset ids
        name, table = found
    elif path.suffix.lower() in SUFFIXES or path.exists():
        name, table = path.stem, _read_file(path)
    else:
        raise CogprobeError(
            f"unknown corpus {str(spec)!r}: known corpora are {', '.join(ELOTL)}; "
            f"a path to a {'/'.join(s[1:].upper() for s in SUFFIXES)} file also works")
    pivot, target = _choose_columns(table, pivot_col, target_col, where=name)
    if document_col is not None and document_col not in table.columns:
        raise _missing("document", document_col, table, name)
    document = document_col or ("document" if "document" in table.columns else None)
    pairs = pd.DataFrame({
        "pivot": table[pivot],
        "target": table[target],
        "document": table[document] if document else "",
    })
    pairs, dropped = _clean(pairs, name)
    return Corpus(name, pairs, pivot_name or LANGUAGES.get(pivot, pivot),
                  target_name or LANGUAGES.get(target, target), dropped)


def _read_elotl(name: str) -> pd.DataFrame:
    import elotl.corpus

    with warnings.catch_warnings():  # elotl uses the deprecated importlib.resources.read_text
        warnings.simplefilter("ignore", DeprecationWarning)
        rows = elotl.corpus.load(name)
    if not isinstance(rows, list):  # elotl returns 0 for names it doesn't know
        raise CogprobeError(f"elotl does not ship corpus {name!r}; check the elotl version")
    names = ELOTL[name]
    return pd.DataFrame([(r + [""] * len(names))[: len(names)] for r in rows],
                        columns=names, dtype=str)


def _read_file(path: Path) -> pd.DataFrame:
    """Read every cell as text (no NA guessing: "NA" may be a word)."""
    if path.suffix.lower() not in SUFFIXES:
        raise CogprobeError(f"{path}: unsupported file type {path.suffix!r}; "
                            f"save the corpus as {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise CogprobeError(f"corpus file {path} does not exist; check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CogprobeError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                            "re-save it as UTF-8") from None
    if not text.strip():
        raise CogprobeError(f"{path} is empty; give a file with a header and sentence pairs")
    if path.suffix.lower() == ".jsonl":
        table = _parse_jsonl(text, path)
    else:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str,
                                keep_default_na=False, quoting=csv.QUOTE_MINIMAL).fillna("")
        except (pd.errors.ParserError, ValueError) as e:
            raise CogprobeError(f"{path} is not a readable {path.suffix[1:].upper()} "
                                f"file ({str(e).strip()}); fix the file") from None
    if table.empty:
        raise CogprobeError(f"{path} has no rows; give a file with sentence pairs under the header")
    return table


def _parse_jsonl(text: str, path: Path) -> pd.DataFrame:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CogprobeError(f"{path} line {i} is not JSON ({e.msg}); "
                                "write one JSON object per line") from None
        if not isinstance(row, dict):
            raise CogprobeError(f"{path} line {i} is a {type(row).__name__}, not an object; "
                                'write one object per line, e.g. {"es": ..., "nah": ...}')
        rows.append({k: "" if v is None else str(v) for k, v in row.items()})
    return pd.DataFrame(rows, dtype=str).fillna("")


def _choose_columns(table: pd.DataFrame, pivot_col: str | None, target_col: str | None,
                    where: str) -> tuple[str, str]:
    """Explicit columns win; else `pivot`/`target`, else `es` plus exactly one language code."""
    cols = list(table.columns)
    if pivot_col is None and target_col is None and {"pivot", "target"} <= set(cols):
        return "pivot", "target"
    pivot = pivot_col or ("es" if "es" in cols else None)
    target = target_col
    if target is None:
        codes = [c for c in cols if c in LANGUAGES and c != pivot]
        target = codes[0] if len(codes) == 1 else None
    if pivot is None or target is None:
        raise CogprobeError(
            f"{where}: cannot tell which columns hold the pivot and target sentences "
            f"(columns: {', '.join(map(str, cols))}); name them with --pivot-col X --target-col Y")
    for role, col in (("pivot", pivot), ("target", target)):
        if col not in cols:
            raise _missing(role, col, table, where)
    if pivot == target:
        raise CogprobeError(f"{where}: pivot and target are both column {pivot!r}; "
                            "name two different columns")
    return pivot, target


def _missing(role: str, col: str, table: pd.DataFrame, where: str) -> CogprobeError:
    return CogprobeError(f"{where}: no {role} column {col!r}; "
                         f"the columns are {', '.join(map(str, table.columns))}")


def _clean(pairs: pd.DataFrame, name: str) -> tuple[pd.DataFrame, dict[str, int]]:
    n = len(pairs)
    pairs = pairs.astype(str).apply(lambda col: col.str.strip())
    kept = pairs[(pairs["pivot"] != "") & (pairs["target"] != "")]
    n_empty = n - len(kept)
    kept = kept.drop_duplicates(["pivot", "target"], keep="first")
    if kept.empty:
        raise CogprobeError(f"{name}: all {n} pairs were empty or duplicates; "
                            "check the column choice and the file's contents")
    dropped = {"empty": n_empty, "duplicate": n - n_empty - len(kept)}
    kept = kept.reset_index(drop=True)
    kept.insert(0, "pair_id", np.arange(len(kept)))
    return kept[COLUMNS], dropped


SPLIT_FRACTION = 0.05   # dev and test each: a twentieth of the pairs, enough for intervals on ~5k pairs


def split_corpus(corpus: Corpus, *, seed: int = 0, dev: float | int = SPLIT_FRACTION,
                 test: float | int = SPLIT_FRACTION, by_document: bool = False) -> Splits:
    """Split into disjoint, leak-free train/dev/test, the same for the same seed.

    `dev`/`test` are fractions (0 < x < 1) or pair counts. Pairs sharing a normalised
    sentence form a group (see the module docstring); `by_document=True` also puts each
    document in one group. Groups are shuffled by the seed, and each goes to the first of
    test, dev that it fits into without passing the asked size, else to train. Groups of
    sentences are small (axolotl's largest is 24 pairs), so those sizes come out exact
    or a few pairs short; documents are large, so by document they come out at most as
    large as asked. A split that no group fits into gets the smallest group left over.
    """
    n = len(corpus)
    if n < 3:  # say why, e.g. a file of one pair repeated: its duplicates were dropped
        dropped = " and ".join(f"{v} {k}" for k, v in corpus.dropped.items() if v)
        why = f" ({dropped} dropped)" if dropped else ""
        raise CogprobeError(f"{corpus.name} has {n} distinct non-empty pair(s){why}, too few for train, dev and "
                            "test splits; give a corpus with more distinct pairs")
    n_test, n_dev = _count("test", test, n), _count("dev", dev, n)
    if n_test + n_dev >= n:
        raise CogprobeError(f"{corpus.name} has {n} pairs, too few for test={n_test} + "
                            f"dev={n_dev} and a non-empty train split; ask for smaller splits")
    if by_document:
        _check_documents(corpus)
    group = sentence_groups(corpus.pairs, by_document=by_document)
    parts = _assign(group, np.random.default_rng(seed), n_test, n_dev)
    if by_document and not (len(parts[1]) and len(parts[2])):
        sizes = corpus.pairs["document"].value_counts()
        raise CogprobeError(
            f"{corpus.name} has {len(sizes)} documents ({', '.join(map(str, sorted(sizes)))} "
            "pairs), too few to give train, dev and test whole documents; "
            "split with by_document=False")
    train, dev_, test_ = (_subset(corpus, idx, s) for idx, s in zip(parts, ("train", "dev", "test")))
    return Splits(train, dev_, test_)


def normalise(sentence: str) -> str:
    """A sentence as the leak check compares it: NFKC, case-folded, letters, digits and marks only."""
    text = unicodedata.normalize("NFKC", sentence).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LNM")


def sentence_groups(pairs: pd.DataFrame, *, by_document: bool = False) -> np.ndarray:
    """Group label of each pair: connected components of pairs that share a normalised pivot or
    target (or a document), by union-find. A sentence that normalises to nothing links nothing."""
    parent = np.arange(len(pairs))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = [pairs["pivot"].map(normalise), pairs["target"].map(normalise)]
    if by_document:
        keys.append(pairs["document"].astype(str))
    for column in keys:
        first: dict[str, int] = {}
        for i, key in enumerate(column):
            if key:
                parent[root(i)] = root(first.setdefault(key, i))
    return np.array([root(i) for i in range(len(pairs))])


def split_overlap(splits: Splits) -> dict[str, int]:
    """Normalised pivot and target sentences found in two splits (0 for a split made here)."""
    sets = {name: {side: set(getattr(splits, name).pairs[side].map(normalise)) - {""}
                   for side in ("pivot", "target")} for name in ("train", "dev", "test")}
    return {f"{a}-{b} {side}": len(sets[a][side] & sets[b][side])
            for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")) for side in ("pivot", "target")}


def _count(what: str, size: float | int, n: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise CogprobeError(f"{what} size {size!r} is not a number; give a fraction or a count")
    if isinstance(size, float):
        if not 0 < size < 1:
            raise CogprobeError(f"{what} fraction {size} is not between 0 and 1; "
                                "give a fraction like 0.05 or a whole number of pairs")
        count = round(size * n)
        if count == 0:
            raise CogprobeError(f"{what} fraction {size} of {n} pairs is an empty split; "
                                "ask for a larger fraction or a count of at least 1")
        return count
    if size < 1:
        raise CogprobeError(f"{what} count {size} would be an empty split; ask for at least 1 pair")
    return size


def _check_documents(corpus: Corpus) -> None:
    sizes = corpus.pairs["document"].value_counts()
    if len(sizes) == 1:
        raise CogprobeError(f"{corpus.name} has a single document "
                            f"({sizes.index[0]!r}); split with by_document=False")


def _assign(group: np.ndarray, rng: np.random.Generator, n_test: int, n_dev: int) -> list[np.ndarray]:
    """[train, dev, test] row indices: whole groups, in a seeded order, test and dev filled first."""
    labels, sizes = np.unique(group, return_counts=True)
    size_of = dict(zip(labels.tolist(), sizes.tolist()))
    targets, assigned, counts, train = [n_test, n_dev], [[], []], [0, 0], []
    for g in labels[rng.permutation(len(labels))].tolist():
        slot = next((i for i in (0, 1) if counts[i] + size_of[g] <= targets[i]), None)
        if slot is None:
            train.append(g)
        else:
            assigned[slot].append(g)
            counts[slot] += size_of[g]
    for i in (0, 1):  # nothing fitted: take the smallest group left, overshooting
        if counts[i] == 0 and len(train) > 1:
            g = min(train, key=lambda x: (size_of[x], x))
            train.remove(g)
            assigned[i].append(g)
    where = lambda gs: np.flatnonzero(np.isin(group, gs))  # noqa: E731
    return [where(train), where(assigned[1]), where(assigned[0])]


def _subset(corpus: Corpus, idx: np.ndarray, split: str) -> Corpus:
    """One split; it keeps the corpus' `dropped` counts, so whoever holds a split can say what cleaning left out."""
    pairs = corpus.pairs.iloc[np.sort(idx)].reset_index(drop=True)
    return Corpus(f"{corpus.name}:{split}", pairs, corpus.pivot_name, corpus.target_name, corpus.dropped)


def dropped_note(corpus: Corpus) -> str | None:
    """The line that says which pairs cleaning dropped before the split (None when none were): a corpus
    that shrinks unannounced makes its pair counts look like a different corpus."""
    parts = [f"{n} {kind}" for kind, n in corpus.dropped.items() if n]
    if not parts:
        return None
    return (f"{corpus.name.split(':')[0]}: {' and '.join(parts)} pair(s) dropped before the split "
            "(a repeated pair is kept once, an empty one not at all)")
