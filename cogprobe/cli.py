"""`cogprobe <verb>`: a router over the Python API, one verb per function.

Each verb's flags are generated from the dataclasses its function takes (`dataclass_flags`: the
verb's options, `Sample` for the pairs a probe verb scores, `TrainConfig`, `StudyConfig`), so a
flag's type, default, choices and help are written once, on the field; only the arguments that
name places (a run, `--out`, `--base`) and switches are written here. A `CogprobeError` prints as
one line and exits 2; so do the faults of the machine a user fixes outside cogprobe (a full disk,
a permission, memory), see `_fault`. SIGINT and SIGTERM stop with the conventional status (130,
143) after the finished work is saved; the same command continues. `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from cogprobe.core.errors import CogprobeError

COMMANDS = {}


def command(name: str, help: str):
    """Register `fn(args)` as a subcommand whose flags are added by `fn.flags(parser)`."""
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return wrap


def dataclass_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), *, unset: bool = False,
                    groups: dict[str, tuple[str, ...]] | None = None) -> None:
    """One --flag per field of a config or options dataclass: typed from its annotation (a tuple is a
    comma list; of ints, a range list such as '0-30' or '0,2,4'), default, choices and help from the
    field (`knob`).

    `unset`: no flag is required and a flag not given is absent from the namespace, so the values
    can come from a config file with the given flags on top (`train --config`). `groups`: --help
    lists the flags under these headings (title -> field names), e.g. a study's TOML tables."""
    heading = {name: group for title, names in (groups or {}).items()
               for group in [p.add_argument_group(title)] for name in names}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required or f.default is dataclasses.MISSING else f.default
        kind = str(f.type).replace(" | None", "")
        kw = dict(default=argparse.SUPPRESS if unset else default, required=required and not unset,
                  help=f.metadata.get("help", "").replace("%", "%%"), dest=f.name)
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "tuple[str, ...]": _words,
                          "tuple[int, ...]": _ints}.get(kind, str)
            if f.metadata.get("choices") and not kind.startswith("tuple"):
                kw["choices"] = f.metadata["choices"]   # argparse shows them as the metavar
            else:
                kw["metavar"] = f.name.upper()
        heading.get(f.name, p).add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("flags", ()), **kw)


def options(cls, a):
    """The `cls` options the flags of `dataclass_flags(p, cls)` parsed into."""
    return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if f.init})


def _ints(text: str) -> tuple[int, ...] | None:
    if not text:
        return None
    from cogprobe.models.layersets import parse_range_list
    return tuple(parse_range_list(text, 10**6))


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _say(text) -> None:
    """Print once: on the main process of a torchrun / accelerate launch."""
    from cogprobe.core.distributed import world
    if world().is_main:
        print(text)


# --- prepare ------------------------------------------------------------------------


def _prepare_flags(p):
    p.add_argument("--home", type=Path, help="cache folder (default $COGPROBE_HOME or ~/.cache/cogprobe)")


@command("prepare", "download and convert the embedded model (SmolLM2-135M-Instruct) once")
def _prepare(a):
    from cogprobe.models.loading import prepare
    _say(prepare(a.home))


_prepare.flags = _prepare_flags


# --- eval ---------------------------------------------------------------------------


def _eval_flags(p):
    from cogprobe.probe.evaluate import EvalOptions
    dataclass_flags(p, EvalOptions)
    p.add_argument("--out", type=Path, help="run folder to write scores.csv into")


@command("eval", "perception and production NLL (and their shuffled-source controls) of a model")
def _eval(a):
    from cogprobe.core.memory import gib
    from cogprobe.probe.evaluate import EvalOptions, evaluate
    o = options(EvalOptions, a)
    table = evaluate(o.model, o.evalset(), batch_size=o.batch_size, out=a.out, engine=o.engine, dtype=o.dtype,
                     max_memory=o.max_memory)
    info, ran = table.attrs["evalset"], table.attrs["computed"]
    _say(table.to_string(index=False))
    _say(f"{ran['engine']} engine, {ran['dtype']}, peak {gib(ran['peak_bytes'])}")
    _say(f"{info['sampled']} {a.split} pairs from {info['documents']} documents; {info['dropped_long']} of "
         f"{info['split_pairs']} left out for a side over {a.max_sentence_tokens} tokens; "
         f"{info['dropped']['duplicate']} duplicate pair(s) dropped from the corpus; split overlap "
         f"(normalised sentences in two splits): {sum(info['overlap'].values())}")
    if a.out:
        _say(f"wrote {a.out / 'scores.csv'}")


_eval.flags = _eval_flags


# --- train ------------------------------------------------------------------------


def _train_flags(p):
    from cogprobe.tuning.config import TrainConfig
    p.add_argument("--config", type=Path, help="a TrainConfig as JSON (what `cogprobe run` hands each row's "
                                              "training); flags given as well override its values")
    dataclass_flags(p, TrainConfig, unset=True)


@command("train", "fine-tune with a strategy (full, layers, lora, lora-layers), saving checkpoints")
def _train(a):
    from cogprobe.tuning.loop import train
    _say(train(train_config(a)))


def train_config(a):
    """The TrainConfig of `cogprobe train`: --config's values, then the flags given."""
    from cogprobe.core import io
    from cogprobe.tuning.config import TrainConfig
    values = io.read_json(a.config) if a.config else {}
    fields = [f for f in dataclasses.fields(TrainConfig) if f.init]
    values.update({f.name: getattr(a, f.name) for f in fields if hasattr(a, f.name)})
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise CogprobeError(f"train needs {flags}: give them as flags or in a --config JSON file")
    return TrainConfig.from_dict(values)


_train.flags = _train_flags


# --- probing a run: sweep, capture, select ----------------------------------------------


def _probe_flags(p, cls):
    """The flags every probe verb shares (the checkpoints, the pairs, where tables go), then `cls`'s."""
    from cogprobe.data.evalset import Sample
    p.add_argument("run", help="a cogprobe run folder, an HF Trainer folder or a model folder")
    p.add_argument("--base", help="base model for adapter-only or listed checkpoints")
    p.add_argument("--tokenizer", help="folder whose tokenizer serves checkpoints saved without one "
                                      "(default: the base's)")
    p.add_argument("--out", type=Path, help="folder for the tables (default: the run folder)")
    dataclass_flags(p, Sample)
    dataclass_flags(p, cls)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _one_writer(a):
    """The folder a probe verb writes its tables into, locked (main process only): a second sweep,
    capture or select on it waits for the first, as a second `train` does."""
    import contextlib
    from cogprobe.core.distributed import world
    from cogprobe.tuning.runfolder import locked
    if not world().is_main:
        return contextlib.nullcontext()
    return locked(a.out or Path(a.run), log=lambda m: print(m, file=sys.stderr))


def _evalset(a):
    from cogprobe.data.evalset import Sample
    return options(Sample, a).evalset(a.run)


def _source(a):
    """The run as given, or opened here when --tokenizer names one for checkpoints saved without."""
    if not a.tokenizer:
        return a.run
    from cogprobe.tuning.checkpoints import Checkpoints
    from cogprobe.core.distributed import default_device
    return Checkpoints.open(a.run, base=a.base, tokenizer=a.tokenizer).to(default_device())


def _sweep_flags(p):
    from cogprobe.probe.options import SweepOptions
    _probe_flags(p, SweepOptions)
    p.add_argument("--overwrite", action="store_true", help="start the table again")


@command("sweep", "perception/production ablation sweeps from each end, per checkpoint")
def _sweep(a):
    from cogprobe.probe.folders import sweep_run
    from cogprobe.probe.options import SweepOptions
    with _one_writer(a):
        table = sweep_run(_source(a), options(SweepOptions, a), evalset=_evalset(a), out=a.out, base=a.base,
                          overwrite=a.overwrite, progress=not a.quiet)
    _say(f"{len(table)} rows in {(a.out or Path(a.run)) / 'sweeps.parquet'}")


_sweep.flags = _sweep_flags


def _capture_flags(p):
    from cogprobe.probe.options import CaptureOptions
    _probe_flags(p, CaptureOptions)
    p.add_argument("--overwrite", action="store_true", help="start the table again")


@command("capture", "per-block drift, CKA, norms, logit lens and cross-lingual alignment of every checkpoint")
def _capture(a):
    from cogprobe.probe.folders import capture_run
    from cogprobe.probe.options import CaptureOptions
    with _one_writer(a):
        table = capture_run(_source(a), options(CaptureOptions, a), evalset=_evalset(a), out=a.out, base=a.base,
                            overwrite=a.overwrite, progress=not a.quiet)
    _say(f"{len(table)} rows in {(a.out or Path(a.run)) / 'activations.parquet'}"
         + (" (and alignment.parquet beside it)" if a.alignment else ""))


_capture.flags = _capture_flags


def _select_flags(p):
    from cogprobe.selection.options import SelectOptions
    _probe_flags(p, SelectOptions)


@command("select", "derive a CogSym layer set (fixed rule, or from the model's own curves)")
def _select(a):
    from cogprobe.selection.folders import select_run
    from cogprobe.selection.options import SelectOptions
    with _one_writer(a):
        sel = select_run(_source(a), options(SelectOptions, a), evalset=_evalset(a), out=a.out, base=a.base,
                         progress=not a.quiet)
    path = (a.out or Path(a.run)) / a.name
    _say(sel.table())
    if sel.stability:
        from cogprobe.selection.stability import table
        _say(table(sel.stability))
    _say(f"wrote {path}; train it with --layers {path}")


_select.flags = _select_flags


def _rank_flags(p):
    from cogprobe.selection.options import RankOptions
    _probe_flags(p, RankOptions)


@command("rank", "cheap per-block rankings of a run (no sweep), with their cost, into rankings.parquet")
def _rank(a):
    from cogprobe.selection.options import RankOptions
    from cogprobe.selection.rankings import rank_run
    with _one_writer(a):
        rank_run(_source(a), options(RankOptions, a), evalset=_evalset(a), out=a.out, base=a.base, log=_say)


_rank.flags = _rank_flags


def _plot_flags(p):
    p.add_argument("run", type=Path, help="a folder holding sweeps/activations/train_log/compare tables")


@command("plot", "draw the figures of a run folder from its tables")
def _plot(a):
    from cogprobe.study.figures import plot_run
    for path in plot_run(a.run):
        _say(path)


_plot.flags = _plot_flags


# --- export ------------------------------------------------------------------------


def _export_flags(p):
    from cogprobe.exports import ExportOptions
    p.add_argument("source", help="a layer set (selection.json, cogsym, '0-3,26-29'), or with --merged a run folder")
    dataclass_flags(p, ExportOptions)
    p.add_argument("--out", type=Path, help="file to write (default: print)")
    p.add_argument("--merged", type=Path, metavar="OUT",
                   help="write checkpoint --step of run SOURCE as an HF model folder")
    p.add_argument("--step", type=int, help="with --merged: the checkpoint step")
    p.add_argument("--base", help="with --merged: base model for adapter-only or listed checkpoints")


@command("export", "a layer set for peft / axolotl / LLaMA-Factory / HF Trainer, or a checkpoint as an HF model")
def _export(a):
    from cogprobe import exports as export
    if a.merged:
        if a.step is None:
            raise CogprobeError("--merged needs --step N (the checkpoint to write)")
        print(f"wrote {export.export_merged(a.source, a.step, a.merged, base=a.base)}")
        return
    from cogprobe.models.loading import load_model
    o = options(export.ExportOptions, a)
    text = export.export_layer_set(load_model(o.model)[0], a.source, o.to, lora=o.lora,
                                   train_embeddings=o.train_embeddings, train_head=o.train_head)
    if a.out:
        from cogprobe.core.io import write_text
        write_text(a.out, text)
        print(f"wrote {a.out}")
    else:
        print(text, end="")


_export.flags = _export_flags


# --- the study ------------------------------------------------------------------------


def _run_flags(p):
    from cogprobe.study.config import DEFAULT_PRESET, TABLES, StudyConfig
    p.add_argument("--config", type=Path, help="TOML file with StudyConfig keys, flat or in the tables the "
                   "flags are listed under below ([data], [train], ...), as the presets are written")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="quick (default: the whole chain on 48 probe pairs, "
                   "about 9 minutes on 2 CPU cores), standard (the evidence study: hours per language) or paper")
    dataclass_flags(p, StudyConfig, groups={f"[{table}]": keys for table, keys in TABLES.items()})
    p.set_defaults(**{f.name: None for f in dataclasses.fields(StudyConfig) if f.name != "out"})


@command("run", "the whole study: adaptation, sweeps, layer sets, CogSym vs full fine-tuning, report")
def _run(a):
    from cogprobe.study.pipeline import run
    from cogprobe.study.config import StudyConfig, build_config
    overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(StudyConfig) if f.name != "out"}
    config = build_config(a.out, preset_name=a.preset, config_file=a.config, **overrides)
    _say(run(config) / "report.md")


_run.flags = _run_flags


# --- ls ------------------------------------------------------------------------------

LISTINGS = ("rows", "presets", "rules", "comparisons")


def _ls_flags(p):
    p.add_argument("what", choices=LISTINGS, help="rows: what each comparison row trains (on --model's blocks); "
                   "presets: every preset's knobs; rules: the layer-set rules; comparisons: what the "
                   "report and the evidence headline compare")
    p.add_argument("--model", help="rows: the model whose blocks the sets name (default: the embedded model)")


@command("ls", "list the registries: comparison rows, presets, layer-set rules, the comparisons that matter")
def _ls(a):
    import pandas as pd
    if a.what == "rules":
        from cogprobe.selection.folders import rules
        table = pd.DataFrame(dict(rule=rules()))
    elif a.what == "presets":
        from cogprobe.study.config import presets
        table = presets()
    elif a.what == "comparisons":
        from cogprobe.study.comparisons import table
        table = table()
    else:
        from cogprobe.models.loading import block_count
        from cogprobe.study.config import StudyConfig
        from cogprobe.study.rows import table
        table = table(block_count(a.model or StudyConfig.model), StudyConfig.lora_r)
    with pd.option_context("display.max_colwidth", 100, "display.width", 200):
        _say(table.to_string(index=False))


_ls.flags = _ls_flags


# --- verify --------------------------------------------------------------------------


def _verify_flags(p):
    p.add_argument("folder", type=Path, help="a run folder, a study folder or a folder of tables")


@command("verify", "check every checkpoint, checksum and table of a run or study folder (exit 1 on a problem)")
def _verify(a):
    from cogprobe.checks import verify
    found = verify(a.folder)
    for line in found:
        print(line)
    print(f"{a.folder}: {len(found)} problem(s)" if found else f"{a.folder}: all is well")
    return 1 if found else 0


_verify.flags = _verify_flags


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` saves what is finished (a cluster's scheduler
    sends it before killing a job)."""


def _terminate(signum, frame):
    raise Terminated()


def _fault(err: BaseException) -> str | None:
    """One line for a fault of the machine rather than of cogprobe's input; None for a bug."""
    from cogprobe.core.io import RERUN, write_failure
    if isinstance(err, PermissionError):
        return (f"permission denied: {err.filename or 'a file or folder cogprobe needs'}; give the user running "
                f"cogprobe access to it (or choose another output folder) and {RERUN}")
    if isinstance(err, OSError):
        known = write_failure(Path(err.filename) if err.filename else Path("the output folder"), err)
        return str(known) if known else None
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        where = "GPU" if type(err).__name__ == "OutOfMemoryError" else "CPU"
        return (f"out of {where} memory; lower --batch-size (training, sweeps), --limit (pairs scored) or the "
                f"model size, and {RERUN}: finished work is kept")
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # this process only: no fork warnings
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args) or 0
    except CogprobeError as err:
        if args.debug:
            raise
        print(f"cogprobe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("SIGINT", 130)
        print(f"cogprobe: interrupted ({name}); finished work is kept: rerun the same command to continue "
              "(`train` with --resume)", file=sys.stderr)
        return code
    except (OSError, MemoryError, RuntimeError) as err:
        line = None if args.debug else _fault(err)
        if line is None:
            raise
        print(f"cogprobe: error: {line}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
