"""The public face: lazy names, no environment changes at import, `cogprobe --debug VERB`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import cogprobe
from cogprobe.cli import build_parser, main


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                             "TOKENIZERS_PARALLELISM")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_is_lazy_and_leaves_the_environment_alone():
    out = _python("""
        import os, sys
        before = dict(os.environ)
        import cogprobe
        print(dict(os.environ) == before, 'torch' in sys.modules, 'transformers' in sys.modules)
    """)
    assert out == "True False False"


def test_every_public_name_resolves_to_its_function():
    from cogprobe.models import loading as models
    from cogprobe import exports as export
    assert cogprobe.load_model is models.load_model
    assert cogprobe.apply_layer_set is export.apply_layer_set
    for name in cogprobe.__all__:
        assert getattr(cogprobe, name) is not None, name
    with pytest.raises(AttributeError):
        cogprobe.no_such_name


def test_train_is_the_function_even_after_its_module_is_imported():
    out = _python("""
        import sys, cogprobe.tuning.loop, cogprobe.study.pipeline, cogprobe
        from cogprobe.tuning.loop import train
        print(cogprobe.train is train, sys.modules['cogprobe.tuning.loop'].__name__)
    """)
    assert out == "True cogprobe.tuning.loop"


def test_debug_before_or_after_the_verb():
    parse = build_parser().parse_args
    assert parse(["--debug", "plot", "x"]).debug is True
    assert parse(["plot", "x", "--debug"]).debug is True
    assert parse(["plot", "x"]).debug is False


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cogprobe.CogprobeError):
        main(["--debug", "export", "0-99", "--model", str(tmp_path / "missing")])
    assert main(["export", "0-99", "--model", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("verb,cls", [("train", "TrainConfig"), ("run", "StudyConfig")])
def test_every_config_flag_has_its_help(verb, cls):
    """Help comes from each field's metadata (`knob`), so a knob without help cannot be declared."""
    import dataclasses
    import cogprobe.study.config
    import cogprobe.tuning.config
    from cogprobe.cli import build_parser
    config = getattr(cogprobe.tuning.config if verb == "train" else cogprobe.study.config, cls)
    sub = build_parser()._subparsers._group_actions[0].choices[verb]
    helps = {a.dest: a.help for a in sub._actions}
    for f in dataclasses.fields(config):
        assert f.metadata.get("help") and helps[f.name] == f.metadata["help"].replace("%", "%%"), f.name
    from cogprobe.core.knob import knob
    with pytest.raises(ValueError, match="help text"):
        knob(3)


def test_ls_lists_the_registries(capsys, tmp_path):
    from tiny import LAYERS, save_tiny
    assert main(["ls", "rules"]) == 0
    assert capsys.readouterr().out.split()[1:] == ["fixed", "curves", "budget", "block-influence", "angular",
                                                   "weight-delta", "taylor"]
    assert main(["ls", "comparisons"]) == 0
    assert "CogSym within 3% of full fine-tuning, test NLL" in capsys.readouterr().out
    assert main(["ls", "presets"]) == 0
    assert {"quick", "standard", "paper"} <= set(capsys.readouterr().out.split())
    assert main(["ls", "rows", "--model", str(save_tiny(tmp_path / "m", "llama"))]) == 0
    rows = capsys.readouterr().out
    assert f"0-{LAYERS - 1}" in rows and "cogsym-lora-matched" in rows   # blocks: every block of this model
    with pytest.raises(SystemExit, match="2"):
        main(["ls", "nothing"])
