"""`knob`: a config or options dataclass field with its help text, the one place a setting and its
default are documented.

`TrainConfig`, `StudyConfig` and every verb's options (`SweepOptions`, `SelectOptions`, ...) declare
their fields with it; the CLI builds each subcommand's flags from those fields (`cli.dataclass_flags`),
so a flag's type, default, choices and --help come from here and nowhere else.
"""
from __future__ import annotations

import dataclasses

from cogprobe.core.errors import CogprobeError


def knob(default=dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
         flags: tuple[str, ...] = ()):
    """A dataclass field: `default` (none: the field is required), its `help`, the `choices` the
    command line offers (the verb itself checks values, with its own message), and extra
    command-line spellings (`flags`, e.g. ("--limit",))."""
    if not help:
        raise ValueError("every config knob needs its help text")
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flags": flags})


def with_changes(cls, options=None, changes: dict | None = None):
    """`options` (default: `cls()`) with the keyword `changes` on top, for verbs that take either an
    options object or its fields as keywords; an unknown keyword is one line naming the known ones."""
    options = cls() if options is None else options
    if not isinstance(options, cls):
        raise CogprobeError(f"expected {cls.__name__}, got {type(options).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(changes or {}) - names)
    if unknown:
        raise CogprobeError(f"{cls.__name__} has no field {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
    return dataclasses.replace(options, **changes) if changes else options
