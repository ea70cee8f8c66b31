"""Every verb's settings live in one options dataclass: the CLI's flags are generated from it, the
folder verbs take it (or its fields as keywords), and no default is written twice in the package."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from cogprobe.cli import build_parser
from cogprobe.core.errors import CogprobeError
from cogprobe.data.evalset import Sample
from cogprobe.probe.evaluate import EvalOptions
from cogprobe.exports import ExportOptions
from cogprobe.probe.folders import capture_run, sweep_run
from cogprobe.probe.options import CaptureOptions, SweepOptions
from cogprobe.selection.folders import select_run
from cogprobe.selection.options import RankOptions, SelectOptions
from cogprobe.selection.rankings import rank_run
from cogprobe.study.config import DEFAULT_PRESET, StudyConfig
from cogprobe.tuning.config import TrainConfig

PACKAGE = Path(__file__).resolve().parent.parent / "cogprobe"
VERBS = {sweep_run: SweepOptions, capture_run: CaptureOptions, select_run: SelectOptions, rank_run: RankOptions}
OPTIONS = (SweepOptions, CaptureOptions, SelectOptions, RankOptions, ExportOptions, Sample, EvalOptions,
           TrainConfig, StudyConfig)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices


def test_the_folder_verbs_declare_none_of_their_options():
    for verb, options in VERBS.items():
        params = set(inspect.signature(verb).parameters)
        again = params & {f.name for f in dataclasses.fields(options)}
        assert not again, f"{verb.__name__} re-declares {sorted(again)} of {options.__name__}"


def test_a_verb_takes_its_options_or_their_fields_as_keywords():
    with pytest.raises(CogprobeError, match="SweepOptions has no field modes; fields: .*mode"):
        sweep_run("no-such-run", modes="skip")
    with pytest.raises(CogprobeError, match="expected SelectOptions, got SweepOptions"):
        select_run("no-such-run", SweepOptions())


def test_every_options_field_is_a_flag_with_its_default_and_help():
    sub = subcommands()
    for verb, classes in {"sweep": (Sample, SweepOptions), "capture": (Sample, CaptureOptions),
                          "select": (Sample, SelectOptions), "rank": (Sample, RankOptions),
                          "export": (ExportOptions,), "eval": (EvalOptions,)}.items():
        actions = {a.dest: a for a in sub[verb]._actions}
        for cls in classes:
            for f in dataclasses.fields(cls):
                assert f.name in actions, (verb, f.name)
                assert actions[f.name].default == f.default, (verb, f.name)
                assert actions[f.name].help == f.metadata["help"].replace("%", "%%"), (verb, f.name)


def test_no_hand_written_flag_carries_a_default_of_its_own():
    """A flag not generated from a dataclass field names a place or a switch (no default), or the preset."""
    generated = {"--" + f.name.replace("_", "-") for cls in OPTIONS for f in dataclasses.fields(cls)}
    own = []
    for verb, parser in subcommands().items():
        for action in parser._actions:
            flags = set(action.option_strings)
            if not flags or flags & generated or isinstance(action, argparse._HelpAction):
                continue
            if action.default not in (None, False, argparse.SUPPRESS) and flags != {"--preset"}:
                own.append(f"{verb} {'/'.join(sorted(flags))}={action.default!r}")
    assert not own, f"defaults written in cli.py: {own}"
    assert subcommands()["run"]._option_string_actions["--preset"].default == DEFAULT_PRESET


def literal_defaults() -> dict[tuple[str, str], list[str]]:
    """(name, literal default) -> where it is written, over every function parameter and dataclass
    field of the package (None, booleans, 0, 1 and "" are not counted: they say "nothing")."""
    def literal(node):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "knob" and node.args:
            node = node.args[0]
        if isinstance(node, ast.Constant) and node.value not in (None, True, False, 0, 1, ""):
            return repr(node.value)
        if isinstance(node, ast.Tuple) and node.elts and all(isinstance(e, ast.Constant) for e in node.elts):
            return repr(tuple(e.value for e in node.elts))
        return None

    seen: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, ast.FunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                pairs = list(zip((a.arg for a in args), defaults + node.args.kw_defaults))
            elif isinstance(node, ast.ClassDef):
                pairs = [(s.target.id, s.value) for s in node.body if isinstance(s, ast.AnnAssign) and s.value]
            for name, default in pairs:
                if default is not None and (value := literal(default)) is not None:
                    seen.setdefault((name, value), []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return seen


def test_every_default_is_written_once():
    twice = {k: v for k, v in literal_defaults().items() if len(v) > 1}
    assert not twice, "defaults written more than once (name them once and refer to them):\n" + "\n".join(
        f"{name}={value}: {', '.join(where)}" for (name, value), where in sorted(twice.items()))


def test_every_study_key_has_one_table_and_a_file_may_use_the_tables_or_not(tmp_path):
    from cogprobe.study.config import TABLES, build_config
    homes = [key for keys in TABLES.values() for key in keys]
    assert sorted(homes) == sorted(f.name for f in dataclasses.fields(StudyConfig))
    tabled, flat = tmp_path / "tabled.toml", tmp_path / "flat.toml"
    tabled.write_text('[train]\nsteps = 7\nlr = 0.001\n\n[select]\ntau = 0.7\n')
    flat.write_text('steps = 7\nlr = 0.001\ntau = 0.7\n')
    assert build_config("x", config_file=tabled) == build_config("x", config_file=flat)
    (tmp_path / "wrong.toml").write_text('[select]\nsteps = 7\n')
    with pytest.raises(CogprobeError, match=r"key 'steps' belongs in table \[train\], not \[select\]"):
        build_config("x", config_file=tmp_path / "wrong.toml")
    (tmp_path / "unknown.toml").write_text('[probe]\nsteps = 7\n')
    with pytest.raises(CogprobeError, match=r"unknown table \[probe\]"):
        build_config("x", config_file=tmp_path / "unknown.toml")


# Knobs a study sets per run rather than hands on (cogprobe/study/pipeline.py `train_config`): the run's
# folder and whether to replace it, its length and learning rate (chosen per row), its checkpoints and
# dev-curve points.
PER_RUN = {"out", "overwrite", "steps", "lr", "save_steps", "eval_steps"}


def test_a_knob_a_study_and_a_run_share_means_one_thing(tmp_path, inputs):
    """Every name both configs have is handed from the study to each run unchanged: one word, one
    meaning (a study's `eval_pairs` counts test pairs, a run's dev curve counts `dev_pairs`)."""
    from cogprobe.study.pipeline import train_config
    study_fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    shared = sorted(set(study_fields) & {f.name for f in dataclasses.fields(TrainConfig)} - PER_RUN)
    distinct = dict(batch_size=3, seq_len=48, lora_r=5, bf16=True, gradient_checkpointing=True, loss_chunk_tokens=96,
                    threads=2, schedule="linear", warmup=7, plateau_window=0.3, plateau_min_improvement=0.02,
                    plateau_min_steps=5, dev_pairs=9, train_max_sentence_tokens=40, loss_on="all", split_seed=4,
                    pivot_col="es", target_col="nah", report_to="tensorboard", resume_every=11,
                    corpus=str(inputs["corpus"]), model=str(inputs["llama"]))
    assert sorted(distinct) == shared, "give every shared knob a distinct value here"
    cfg = StudyConfig(out=str(tmp_path), converge=False, eval_steps="every:2", **distinct)
    run = train_config(cfg, tmp_path, "full", 0, lr=1e-3, steps=24)
    assert {name: getattr(run, name) for name in shared} == distinct


def test_a_knob_a_study_hands_to_its_runs_is_declared_once_in_the_run():
    """StudyConfig composes TrainConfig's knobs (`run_knob`), not re-declares them: every name the two
    share is one of the run's knobs, with the run's help, except the knobs a study sets per run."""
    from cogprobe.study.config import RUN_KNOBS
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    study = {f.name: f for f in dataclasses.fields(StudyConfig)}
    assert set(study) & set(train) - PER_RUN == set(RUN_KNOBS)
    assert not PER_RUN & set(RUN_KNOBS)
    for name in RUN_KNOBS:
        assert study[name].metadata["help"] == train[name].metadata["help"], name
