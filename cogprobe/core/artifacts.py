"""The files cogprobe writes: what each one is, what a readable copy holds, and how to remake it.

A damaged file (missing, truncated, empty, overwritten with something else) must
cost the user one sentence, never a traceback and never their other results.
`io` reads every JSON file, table and tensor file through the checks here, so
the error names the file, says what is wrong with it, and gives the fix: which
step to rerun, or, for a table derived from the checkpoints, that it can be
rebuilt and how. Files are recognised by their names (the last two parts of the
path), so the check needs no knowledge of who is reading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cogprobe.core.errors import CogprobeError

RETRAIN = "retrain with `cogprobe train ... --overwrite`"
CHECKPOINT = "delete {folder} to leave that checkpoint out, or " + RETRAIN
DERIVED = ("it is derived from the checkpoints: rebuild it with `cogprobe {verb} {tables} --overwrite` (in a "
           "study folder: delete it and rerun the same `cogprobe run`)")
SWEEP, CAPTURE = DERIVED.replace("{verb}", "sweep"), DERIVED.replace("{verb}", "capture")
TABLE_META = ("corpus", "split", "n", "sample_seed", "max_sentence_tokens", "source")


@dataclass(frozen=True)
class Kind:
    what: str                   # the file in words
    fix: str                    # how to remake it; {folder}: the file's folder, {tables}: the probe verbs' arguments
    needs: tuple[str, ...] = ()  # JSON keys ("a.b" nested) or table columns every readable copy has
    needs_rows: bool = False     # a table that is never written empty
    renamed: tuple[tuple[str, str], ...] = ()  # (old, new) column names renamed in this kind only


# columns renamed since tables were first written (old name -> new): every table read through
# `io.read_parquet` / `read_csv` gets the new names, so folders written before still read; a name
# that means another thing in other tables (compare's `strategy`, now `row`) is renamed in its kind only
RENAMED = {"gain_retained": "share", "gain_retained_low": "share_low", "gain_retained_high": "share_high",
           "layer": "block"}

KINDS: list[tuple[str, Kind]] = [
    (r"step-\d+/meta\.json", Kind("a checkpoint's record", CHECKPOINT, ("step", "kind", "base_fingerprint"))),
    (r"step-\d+/(trainable|adapter_model)\.safetensors", Kind("checkpoint tensors", CHECKPOINT)),
    (r"step-\d+/adapter_config\.json", Kind("a LoRA checkpoint's config", CHECKPOINT, ("peft_type",))),
    (r"resume/optimizer\.safetensors", Kind("the optimizer state to resume from", RETRAIN)),
    (r"resume/state\.json", Kind("the optimizer state to resume from", RETRAIN,
                                 ("step", "tokens_seen", "param_names", "param_groups", "plain_state"))),
    (r"manifest\.json", Kind("the run's manifest", RETRAIN, ("config.steps", "base.fingerprint", "save_steps"))),
    (r"train_log\.parquet", Kind("the training log", RETRAIN + " (the log cannot be rebuilt)",
                                 ("step", "loss", "lr", "grad_norm", "tokens", "seconds"))),
    (r"dev_curve\.parquet", Kind("the dev curve", RETRAIN + " (the curve is scored while training)",
                                 ("step", "task", "nll", "n_tokens", "example_nll", "example_tokens"))),
    (r"dev_curve\.parquet\.json", Kind("the dev curve's evaluation set", RETRAIN,
                                       ("corpus", "split", "n", "sample_seed", "max_sentence_tokens"))),
    (r"cost\.json", Kind("the run's cost record", RETRAIN, ("trainable_params", "peak_memory_bytes"))),
    (r"\.?sweeps\.parquet(\.part-\d+-of-\d+)?", Kind("the sweep table", SWEEP,
                                                     ("checkpoint_step", "task", "direction", "mode", "k", "ends",
                                                      "nll", "share"))),
    (r"sweeps\.parquet\.json", Kind("the sweep table's metadata", SWEEP, TABLE_META)),
    (r"\.?activations\.parquet(\.part-\d+-of-\d+)?", Kind("the capture table", CAPTURE,
                                                          ("checkpoint_step", "block", "site", "stat", "task",
                                                           "value"))),
    (r"activations\.parquet\.json", Kind("the capture table's metadata", CAPTURE, TABLE_META)),
    (r"\.?alignment\.parquet(\.part-\d+-of-\d+)?", Kind("the alignment table", CAPTURE,
                                                        ("checkpoint_step", "block", "measure", "direction",
                                                         "value", "low", "high", "example_scores"))),
    (r"alignment\.parquet\.json", Kind("the alignment table's metadata", CAPTURE, TABLE_META)),
    (r"selection[^/]*\.json", Kind("a layer selection", "it is derived: rewrite it with `cogprobe select RUN`",
                                   ("rule",))),
    (r"study\.json", Kind("the study's config", "rerun `cogprobe run` with the same options and --overwrite",
                          ("model", "corpus", "steps"))),
    (r"baseline\.csv", Kind("the base model's scores", "delete it and rerun the same `cogprobe run` to recompute it",
                            ("perception_nll", "production_nll", "chrf_perception", "chrf_production"), True)),
    (r"compare\.parquet", Kind("the comparison table", "it is derived from the tuned runs: delete it and rerun "
                               "the same `cogprobe run` to rebuild it", ("row",),
                               renamed=(("strategy", "row"),))),
]
_COMPILED = [(re.compile(rf"(^|/){pattern}$"), kind) for pattern, kind in KINDS]


def kind_of(path: str | Path) -> Kind | None:
    """The kind of artifact `path` is, from its last two path parts; None for a file cogprobe does not own."""
    tail = "/".join(Path(path).parts[-2:])
    return next((kind for pattern, kind in _COMPILED if pattern.search(tail)), None)


def renamed_columns(path: str | Path) -> dict[str, str]:
    """Old column name -> new for the table at `path`: the renames of every table and its kind's own."""
    kind = kind_of(path)
    return {**RENAMED, **dict(kind.renamed if kind else ())}


def damaged(path: str | Path, problem: str) -> CogprobeError:
    """One line: the file, what it is, what is wrong with it, and the fix."""
    path = Path(path)
    kind = kind_of(path)
    if kind is None:
        return CogprobeError(f"{path} {problem}; restore it, or remake it with the command that wrote it")
    tables = path.parent if (path.parent / "manifest.json").is_file() else f"RUN --out {path.parent}"
    return CogprobeError(f"{path} ({kind.what}) {problem}; {kind.fix.format(folder=path.parent, tables=tables)}")


def check_keys(path: str | Path, obj) -> None:
    """A JSON artifact that parses but is not what its name says (wrong type, keys missing) is damaged too."""
    kind = kind_of(path)
    if kind is None:
        return
    if not isinstance(obj, dict):
        raise damaged(path, f"holds a JSON {type(obj).__name__}, not an object")
    missing = [key for key in kind.needs if not _has(obj, key.split("."))]
    if missing:
        raise damaged(path, f"lacks {', '.join(repr(k) for k in missing)} (overwritten with other JSON?)")


def _has(obj, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return False
        obj = obj[key]
    return True


def check_columns(path: str | Path, columns, rows: int | None = None) -> None:
    """A table that parses but lacks the columns of its kind (another table copied over it), or has no
    rows when its kind is never written empty (a truncated CSV), is damaged."""
    kind = kind_of(path)
    missing = [c for c in (kind.needs if kind else ()) if c not in set(columns)]
    if missing:
        raise damaged(path, f"lacks columns {', '.join(missing)} (overwritten with another table?)")
    if rows == 0 and kind is not None and kind.needs_rows:
        raise damaged(path, "has no rows (truncated?)")
