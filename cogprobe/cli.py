"""`cogprobe <verb>`: a thin argparse layer over the Python API, one verb per function.

Each verb parses flags into the same arguments (or config dataclass) that a
notebook would pass, and calls the public function. A `CogprobeError` prints as
one line and exits 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from pathlib import Path

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


def _field_help(cls) -> dict[str, str]:
    """Each dataclass field's trailing comment: the one place a config knob is documented."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^ {4}(\w+):[^#\n]*#\s*(.*)$", src, re.M)}


def dataclass_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a config dataclass, typed from its annotation, help from its comment."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required or f.default is dataclasses.MISSING else f.default
        kind = str(f.type).replace(" | None", "")
        kw = dict(default=default, required=required, help=helps.get(f.name, "").replace("%", "%%"))
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float}.get(kind, str)
            kw["metavar"] = f.name.upper()
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def dataclass_from_args(cls, a, **extra):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{n: getattr(a, n) for n in names if hasattr(a, n)}, **extra)


def _say(text) -> None:
    """Print once: on the main process of a torchrun / accelerate launch."""
    from cogprobe.distributed import world
    if world().is_main:
        print(text)


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


# --- train ------------------------------------------------------------------------


def _train_flags(p):
    from cogprobe.trainconfig import TrainConfig
    dataclass_flags(p, TrainConfig)


@command("train", "fine-tune with a strategy (full, layers, lora, lora-layers), saving checkpoints")
def _train(a):
    from cogprobe.train import train
    from cogprobe.trainconfig import TrainConfig
    _say(train(dataclass_from_args(TrainConfig, a)))


_train.flags = _train_flags


# --- probing a run: sweep, capture, select ----------------------------------------------


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    from cogprobe.layersets import parse_range_list
    return parse_range_list(text, 10**6)


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _probe_flags(p):
    p.add_argument("run", help="a cogprobe run folder, an HF Trainer folder or a model folder")
    p.add_argument("--base", help="base model for adapter-only or listed checkpoints")
    p.add_argument("--tokenizer", help="folder whose tokenizer serves checkpoints saved without one "
                                      "(default: the base's)")
    p.add_argument("--out", type=Path, help="folder for the tables (default: the run folder)")
    p.add_argument("--corpus", help="default: the run's own corpus")
    p.add_argument("--pivot-col")
    p.add_argument("--target-col")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, default=32, help="held-out pairs per task")
    p.add_argument("--max-sentence-tokens", type=int, default=32, help="each sentence cut to this many tokens")
    p.add_argument("--batch-size", type=int, default=8)


def _evalset(a):
    from cogprobe.probe import EvalSet
    return EvalSet.for_run(a.run, corpus=a.corpus, pivot_col=a.pivot_col, target_col=a.target_col,
                           split=a.split, limit=a.limit, max_sentence_tokens=a.max_sentence_tokens)


def _source(a):
    """The run as given, or opened here when --tokenizer names one for checkpoints saved without."""
    if not a.tokenizer:
        return a.run
    from cogprobe.checkpoints import Checkpoints
    from cogprobe.distributed import default_device
    return Checkpoints.open(a.run, base=a.base, tokenizer=a.tokenizer).to(default_device())


def _sweep_flags(p):
    _probe_flags(p)
    p.add_argument("--mode", default="revert", choices=["revert", "skip"])
    p.add_argument("--directions", default="input,output")
    p.add_argument("--tasks", default="perception,production")
    p.add_argument("--ks", help="k grid, e.g. '0-30' or '0,2,4,8' (default: every k from 0 to L)")
    p.add_argument("--ends", action="store_true",
                   help="revert the embedding with the input end and final norm + head with the output end")
    p.add_argument("--engine", default="fast", choices=["fast", "naive"])
    p.add_argument("--overwrite", action="store_true", help="start the table again")


@command("sweep", "perception/production ablation sweeps from each end, per checkpoint")
def _sweep(a):
    from cogprobe.probe import sweep_run
    table = sweep_run(_source(a), mode=a.mode, directions=_words(a.directions), tasks=_words(a.tasks), ks=_ints(a.ks),
                      ends=a.ends, engine=a.engine, batch_size=a.batch_size, evalset=_evalset(a), out=a.out,
                      base=a.base, overwrite=a.overwrite)
    _say(f"{len(table)} rows in {(a.out or Path(a.run)) / 'sweeps.parquet'}")


_sweep.flags = _sweep_flags


def _capture_flags(p):
    _probe_flags(p)
    p.add_argument("--sites", default="resid", help="comma list of resid, attn, mlp")
    p.add_argument("--backend", default="torch", choices=["torch", "nnsight", "transformerlens"])
    p.add_argument("--overwrite", action="store_true", help="start the table again")


@command("capture", "per-layer drift, CKA, norms and logit lens of every checkpoint")
def _capture(a):
    from cogprobe.probe import capture_run
    table = capture_run(_source(a), sites=_words(a.sites), backend=a.backend, batch_size=a.batch_size,
                        evalset=_evalset(a), out=a.out, base=a.base, overwrite=a.overwrite)
    _say(f"{len(table)} rows in {(a.out or Path(a.run)) / 'activations.parquet'}")


_capture.flags = _capture_flags


def _select_flags(p):
    _probe_flags(p)
    p.add_argument("--rule", default="budget", choices=["fixed", "curves", "budget"])
    p.add_argument("--tau", type=float, default=0.8, help="share of the gain the set must account for / keep")
    p.add_argument("--fraction", type=float, default=0.25, help="rule fixed: the CogSym fraction")
    p.add_argument("--step", type=int, help="checkpoint to read (default: the last)")
    p.add_argument("--input-task", default="perception", help="rule curves: task read at the input end")
    p.add_argument("--output-task", default="production", help="rule curves: task read at the output end")
    p.add_argument("--criterion", default="remove", choices=["remove", "keep"],
                   help="rule curves: an end's k blocks must remove tau of the gain when reverted (remove), "
                        "or keep it alone when every other block is reverted (keep)")
    p.add_argument("--max-total", type=int, help="rule budget: largest k_in + k_out to try")
    p.add_argument("--name", default="selection.json",
                   help="file written in the tables folder (keep several rules side by side)")


@command("select", "derive a CogSym layer set (fixed rule, or from the model's own curves)")
def _select(a):
    from cogprobe.probe import select_run
    sel = select_run(_source(a), rule=a.rule, tau=a.tau, fraction=a.fraction, step=a.step, input_task=a.input_task,
                     output_task=a.output_task, max_total=a.max_total, criterion=a.criterion,
                     batch_size=a.batch_size, evalset=_evalset(a), out=a.out, base=a.base, name=a.name)
    path = (a.out or Path(a.run)) / a.name
    _say(sel.table())
    _say(f"wrote {path}; train it with --layers {path}")


_select.flags = _select_flags


def _plot_flags(p):
    p.add_argument("run", type=Path, help="a folder holding sweeps/activations/train_log/compare tables")


@command("plot", "draw the figures of a run folder from its tables")
def _plot(a):
    from cogprobe.plots import plot_run
    for path in plot_run(a.run):
        print(path)


_plot.flags = _plot_flags


# --- export ------------------------------------------------------------------------


def _export_flags(p):
    p.add_argument("source", help="a layer set (selection.json, cogsym, '0-3,26-29'), or with --merged a run folder")
    p.add_argument("--to", default="peft", choices=["peft", "axolotl", "llamafactory", "trainer"],
                   help="format of the layer set")
    p.add_argument("--model", default="smollm2-135m", help="the model the set is for (its real module names)")
    p.add_argument("--out", type=Path, help="file to write (default: print)")
    p.add_argument("--lora", action="store_true", help="axolotl: a LoRA config instead of unfrozen_parameters")
    p.add_argument("--train-embeddings", action="store_true", help="axolotl: also unfreeze the input embeddings")
    p.add_argument("--train-head", action="store_true", help="axolotl: also unfreeze the final norm and LM head")
    p.add_argument("--merged", type=Path, metavar="OUT", help="write checkpoint --step of run SOURCE as an HF model folder")
    p.add_argument("--step", type=int, help="with --merged: the checkpoint step")
    p.add_argument("--base", help="with --merged: base model for adapter-only or listed checkpoints")


@command("export", "a layer set for peft / axolotl / LLaMA-Factory / HF Trainer, or a checkpoint as an HF model")
def _export(a):
    from cogprobe import export
    if a.merged:
        if a.step is None:
            raise CogprobeError("--merged needs --step N (the checkpoint to write)")
        print(f"wrote {export.export_merged(a.source, a.step, a.merged, base=a.base)}")
        return
    from cogprobe.models import load_model
    text = export.export_layer_set(load_model(a.model)[0], a.source, a.to, lora=a.lora,
                                   train_embeddings=a.train_embeddings, train_head=a.train_head)
    if a.out:
        from cogprobe.io import write_text
        write_text(a.out, text)
        print(f"wrote {a.out}")
    else:
        print(text, end="")


_export.flags = _export_flags


# --- the study ------------------------------------------------------------------------


def _run_flags(p):
    from cogprobe.studyconfig import StudyConfig
    p.add_argument("--config", type=Path, help="TOML file with StudyConfig keys")
    p.add_argument("--preset", default="quick", help="quick (default, ~14 min on 2 CPU cores) or paper")
    dataclass_flags(p, StudyConfig)
    p.set_defaults(**{f.name: None for f in dataclasses.fields(StudyConfig) if f.name != "out"})


@command("run", "the whole study: adaptation, sweeps, layer sets, CogSym vs full fine-tuning, report")
def _run(a):
    from cogprobe.study import run
    from cogprobe.studyconfig import StudyConfig, build_config
    overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(StudyConfig) if f.name != "out"}
    config = build_config(a.out, preset_name=a.preset, config_file=a.config, **overrides)
    print(run(config) / "report.md")


_run.flags = _run_flags


# --- entry point --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line, like every other error (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"cogprobe: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cogprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        # SUPPRESS: an absent subcommand flag must not overwrite the root's `cogprobe --debug VERB`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        fn.flags(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # this process only: no fork warnings
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
