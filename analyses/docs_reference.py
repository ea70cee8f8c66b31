"""Write the docs pages that come from the code, so they cannot drift from it:

    python analyses/docs_reference.py        # or `make docs-reference`

- `docs/cli.md`: every verb of `cogprobe.cli.build_parser()`, its usage, and its flags with their
  defaults and help (the text `cogprobe VERB --help` prints). What follows the page's
  "hand-written below this line" marker is kept as it is.
- `docs/python.md`: one mkdocstrings entry per name of `cogprobe.__all__`, at the module that
  defines it (the lazy names are invisible to static analysis under `cogprobe` itself).
- `docs/architecture.md`, between its two markers: the folders and names of `core/layout.py`, the
  columns of the sweep, capture and alignment tables, and the artifact kinds of `core/artifacts.py`.

`tests/test_docs.py` fails when a committed page differs from what this script writes.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cogprobe.cli import build_parser
from cogprobe.core import artifacts, layout
from cogprobe.core.errors import CogprobeError
from cogprobe.core.io import write_text
from cogprobe.probe import alignment, capture, grid, sweep

DOCS = Path(__file__).resolve().parent.parent / "docs"
CLI_PAGE, PYTHON_PAGE, ARCHITECTURE = DOCS / "cli.md", DOCS / "python.md", DOCS / "architecture.md"
HAND_WRITTEN = "<!-- hand-written below this line -->"
START = "<!-- schemas: written by analyses/docs_reference.py from the code, do not edit by hand -->"
END = "<!-- end of schemas -->"

# ------------------------------------------------------------------ docs/cli.md

CLI_HEAD = """# Command line

<!-- written by analyses/docs_reference.py from cogprobe.cli.build_parser(), do not edit by hand -->

Every verb is a thin layer over one Python function; its flags are that function's arguments
(see [Python API](python.md)). `cogprobe VERB --help` prints the same text. Errors are one line
naming the problem and the fix; `--debug`, before or after the verb, shows the traceback instead.
Where a verb reads a run, a model or a corpus, the [input sources](#input-sources) below apply."""

NOTES = {"train": "Defaults are `TrainConfig`'s; with `--config`, the file's values, then the flags given.",
         "run": "Defaults are the `quick` preset's (`--preset`; a preset's values, then `--config`, then flags)."}


def config_defaults(verb: str) -> dict:
    """What a verb's unset flags fall back to: `train` its TrainConfig's defaults, `run` the quick preset's."""
    if verb == "train":
        from cogprobe.tuning.config import TrainConfig
        return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    if verb == "run":
        from cogprobe.study.config import build_config
        return dataclasses.asdict(build_config("OUT", preset_name="quick"))
    return {}


def cell(text) -> str:
    """`text` on one line, safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def flag_row(action: argparse.Action, fallback: dict) -> str:
    name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.choices:
        name += " {" + ",".join(map(str, action.choices)) + "}"
    default = action.default if action.default not in (None, argparse.SUPPRESS) else fallback.get(action.dest)
    shown = "" if default in (None, argparse.SUPPRESS) or action.dest in ("out", "debug") else f"`{default}`"
    shown = '`""`' if default == "" else shown
    return f"| {name} | {shown} | {cell((action.help or '').replace('%%', '%'))} |"


def verb_section(name: str, parser: argparse.ArgumentParser) -> str:
    usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
    fallback = config_defaults(name)
    rows = []
    for group in parser._action_groups:   # a study's flags come under its TOML tables ([data], [train], ...)
        shown = [a for a in group._group_actions
                 if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        heading = [f"| **{group.title}** | | |"] if shown and group.title.startswith("[") else []
        rows += heading + [flag_row(a, fallback) for a in shown]
    note = [NOTES[name], ""] if name in NOTES else []
    return "\n".join([f"## `cogprobe {name}`", "", cell(parser.description), "", "```text", usage, "```", "",
                      *note, "| flag | default | what it does |", "|---|---|---|", *rows])


def cli_page(hand_written: str) -> str:
    """The generated verbs, then the hand-written part of the committed page."""
    verbs = build_parser()._subparsers._group_actions[0].choices
    sections = [verb_section(name, parser) for name, parser in verbs.items()]
    return "\n\n".join([CLI_HEAD, *sections, hand_written.strip()]) + "\n"


# ------------------------------------------------------------------ docs/python.md

PYTHON_HEAD = """# Python API

<!-- written by analyses/docs_reference.py from cogprobe.__all__, do not edit by hand -->

Everything below is importable from `cogprobe` itself (`cogprobe.train`, `cogprobe.sweep_run`, ...);
the names load on first use, so `import cogprobe` loads neither torch nor transformers. Each verb of
the [command line](cli.md) calls one of these functions; a notebook and a shell do the same things.
The README's short tour uses them in order; the [integrations](integrations.md) page shows
`apply_layer_set` with your own trainer."""


def python_page() -> str:
    import cogprobe
    entries = [f"## `cogprobe.{name}`\n\n::: {getattr(cogprobe, name).__module__}.{name}\n"
               "    options:\n      show_root_heading: false"
               for name in cogprobe.__all__ if callable(getattr(cogprobe, name))]
    return "\n\n".join([PYTHON_HEAD, *entries]) + "\n"


# ------------------------------------------------------------------ docs/architecture.md, its schemas

def codes(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


def schemas() -> str:
    names = [(k, v) for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)]
    # a pipe inside a code span would end the table cell: the pattern goes in <code>, with the regex's pipes and
    # backslashes as entities (so Markdown neither splits the cell nor eats an escape)
    html = {chr(92): "&#92;", "|": "&#124;"}
    kinds = [f"| <code>{''.join(html.get(c, c) for c in pattern)}</code> | {k.what} | {codes(k.needs)} |"
             for pattern, k in artifacts.KINDS]
    renamed = [f"`{a}` → `{b}`" for a, b in artifacts.RENAMED.items()]
    renamed += [f"`{a}` → `{b}` (in `{pattern.replace(chr(92), '')}` only)"
                for pattern, k in artifacts.KINDS for a, b in k.renamed]
    return "\n".join([
        "**Folders** (the docstring of `cogprobe/core/layout.py`):", "", "```text", layout.__doc__.strip(), "```", "",
        "**Names** (`cogprobe/core/layout.py`, where each file name, and each key the files share, is defined once):",
        "", "| constant | value |", "|---|---|", *[f"| `{k}` | `{v}` |" for k, v in names], "",
        "**Table columns** (one row per observation):", "",
        "| table | columns (`COLUMNS` of the module) |", "|---|---|",
        f"| `{layout.SWEEPS}` (`probe/sweep.py`) | {codes(sweep.COLUMNS)} |",
        f"| `{layout.ACTIVATIONS}` (`probe/capture.py`) | {codes(capture.COLUMNS)} |",
        f"| `{layout.ALIGNMENT}` (`probe/alignment.py`) | {codes(alignment.COLUMNS)} |", "",
        f"An adaptive sweep (`probe/grid.py`) adds `k_grid` to every row: {codes((grid.COARSE, grid.REFINED))}.",
        "",
        f"Capture's `stat` is one of {codes(capture.STATS)}; alignment's `measure` one of {codes(alignment.MEASURES)}.",
        "", "**Artifact kinds** (`KINDS` of `cogprobe/core/artifacts.py`): every file cogprobe reads is recognised by "
        "its name and checked for what a readable copy holds; a damaged one costs one line naming the file and the "
        "fix.",
        "", "| file (pattern) | what it is | a readable copy has |", "|---|---|---|", *kinds, "",
        "Old column names, read as the new ones (`RENAMED`): " + ", ".join(renamed) + "."])


def spliced(page: str, text: str) -> str:
    """`page` with the text between its schema markers replaced by `text`."""
    if page.count(START) != 1 or page.count(END) != 1 or page.index(START) > page.index(END):
        raise CogprobeError(f"{ARCHITECTURE} needs the two markers once each, in order: {START!r} then {END!r}")
    head, rest = page.split(START)
    return f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}"


# ------------------------------------------------------------------ all three

def pages() -> dict[Path, str]:
    """What each generated page should hold, from the code and the committed pages' hand-written parts."""
    committed = CLI_PAGE.read_text() if CLI_PAGE.is_file() else ""
    hand_written = HAND_WRITTEN + committed.split(HAND_WRITTEN, 1)[1] if HAND_WRITTEN in committed else HAND_WRITTEN
    return {CLI_PAGE: cli_page(hand_written), PYTHON_PAGE: python_page(),
            ARCHITECTURE: spliced(ARCHITECTURE.read_text(), schemas())}


def main() -> None:
    for path, text in pages().items():
        write_text(path, text)
        print(path)


if __name__ == "__main__":
    main()
