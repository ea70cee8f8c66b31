"""`knob`: a config dataclass field with its help text, the one place a setting is documented.

`TrainConfig` and `StudyConfig` declare every field with it; the CLI builds each flag's --help
from the field's metadata (see `cli.dataclass_flags`).
"""
from __future__ import annotations

import dataclasses


def knob(default=dataclasses.MISSING, help: str = ""):
    """A dataclass field: `default` (none: the field is required) and its `help`."""
    if not help:
        raise ValueError("every config knob needs its help text")
    return dataclasses.field(default=default, metadata={"help": help})
