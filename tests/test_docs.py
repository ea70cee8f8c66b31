"""The docs stay true: every ```python block of README.md and docs/*.md runs, and the generated pages
(docs/cli.md, docs/python.md, the schemas of docs/architecture.md) match the code.

The convention for code blocks in the docs:
- A ```python block is run, top to bottom, each block on its own (fresh globals) in an empty
  temporary folder, so relative paths such as "runs/probe" land there. It must be complete: what it
  uses, it makes (imports, models, runs).
- Before it runs, the test puts tiny inputs in place of the embedded ones: the string literal
  "smollm2-135m" (the embedded model) becomes a tiny random llama folder (tests/tiny.py) and
  "axolotl" (the embedded corpus) a CSV of 1,440 short pairs (`docs_corpus`: enough for the
  default 64 dev pairs). So write examples on those two names, at sizes a reader would use; nothing
  is downloaded and each block takes seconds here.
- Shell commands go in ```bash blocks and printed output in ```text blocks: neither is run.
- The README's blocks import nothing but `cogprobe`: the tour shows the public API only.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "analyses"))

import docs_reference  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
EMBEDDED = {"smollm2-135m": "model", "axolotl": "corpus"}   # literal in a block -> the tiny input put there


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line, code) of every ```python block of `page`."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = [pytest.param(page, line, code, id=f"{page.relative_to(ROOT)}:{line}")
          for page in PAGES for line, code in python_blocks(page)]


def with_tiny_inputs(code: str, tiny: dict) -> str:
    """`code` with each embedded name's string literal replaced by its tiny input's path."""
    for name, key in EMBEDDED.items():
        code = code.replace(f'"{name}"', repr(str(tiny[key])))
    return code


def run_block(code: str, where: str) -> dict:
    """Run one block as a script (fresh globals); an error propagates, so a broken block fails."""
    scope = {"__name__": "__main__"}
    exec(compile(code, where, "exec"), scope)
    return scope


def docs_corpus(path: Path) -> Path:
    """1,440 distinct short Spanish-Nahuatl-like pairs (the words of tests/helpers.py) as a CSV."""
    import pandas as pd
    from helpers import ES, NAH, VERB_ES, VERB_NAH
    when = [("hoy", "axcan"), ("ayer", "yalhua"), ("mañana", "moztla"), ("ahora", "niman"), ("siempre", "mochipa"),
            ("nunca", "ayic"), ("aquí", "nican"), ("allá", "ompa")]
    rows = [dict(es=f"{ES[i]} {VERB_ES[j]} {ES[k]} {w_es}", nah=f"{NAH[i]} {VERB_NAH[j]} {NAH[k]} {w_nah}")
            for i in range(6) for j in range(5) for k in range(6) for w_es, w_nah in when]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def tiny(inputs, tmp_path_factory):
    return dict(model=inputs["llama"], corpus=docs_corpus(tmp_path_factory.mktemp("docs") / "pairs.csv"))


def test_there_are_blocks_to_run():
    assert any(page.name == "README.md" for page, *_ in (b.values for b in BLOCKS))


@pytest.mark.parametrize("page,line,code", BLOCKS)
def test_every_python_block_runs(page, line, code, tiny, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    run_block(with_tiny_inputs(code, tiny), f"{page.name}:{line}")


def test_a_broken_block_fails(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = 'import cogprobe\nmodel, tok = cogprobe.load_model("smollm2-135m")\ncogprobe.no_such_verb(model)\n'
    with pytest.raises(AttributeError, match="no_such_verb"):
        run_block(with_tiny_inputs(broken, tiny), "broken")
    assert str(tiny["model"]) in with_tiny_inputs(broken, tiny)


def test_the_readme_imports_only_cogprobe():
    for line, code in python_blocks(ROOT / "README.md"):
        for node in ast.walk(ast.parse(code)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert all(n == "cogprobe" for n in names), f"README.md:{line} imports {names}"


def test_the_readme_links_resolve():
    """The README is read on GitHub, outside the docs site (whose links `mkdocs build --strict` checks)."""
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200, "move detail into docs/"


@pytest.mark.parametrize("page", list(docs_reference.pages()), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_pages_match_the_code(page):
    assert docs_reference.pages()[page] == page.read_text(), "rerun `python analyses/docs_reference.py`"


def test_every_docs_page_is_in_the_site():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}\n" in config, f"{page.name} is not in mkdocs.yml's nav"
