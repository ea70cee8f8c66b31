"""Layer sets: which blocks a strategy trains, and the CogSym rule.

A layer set can be written four ways, all resolved against the model's block
count L:
  - an explicit list with ranges: "0-3,26-29" (inclusive ranges, any order);
  - "cogsym": the paper's rule with f = 0.25;
  - "cogsym:F": the same rule with another fraction F in (0, 1];
  - a path to a selection.json written by `cogprobe select` (its "layers" list).

The CogSym rule (the paper says "the 25% outermost layers"; rounding and the
split between the ends are not published, so they are fixed here):
  n = round(f * L) blocks (Python's round: half to even), n_bottom = ceil(n / 2)
  from the input end and n_top = floor(n / 2) from the output end, so the
  bottom takes the extra block when n is odd. For L = 30, f = 0.25: n = 8,
  blocks 0-3 and 26-29.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from cogprobe.core.errors import CogprobeError

DEFAULT_FRACTION = 0.25


def check_fraction(f: float, what: str = "CogSym fraction") -> float:
    if not (isinstance(f, (int, float)) and 0 < f <= 1):
        raise CogprobeError(f"{what} must be in (0, 1], got {f!r}")
    return float(f)


def cogsym(n_layers: int, fraction: float = DEFAULT_FRACTION) -> list[int]:
    """The outermost round(f*L) blocks, split between the ends (bottom takes the odd one)."""
    fraction = check_fraction(fraction)
    n = round(fraction * n_layers)
    if n == 0:
        raise CogprobeError(f"CogSym fraction {fraction} of {n_layers} blocks rounds to zero blocks; "
                            f"use a fraction of at least {0.5 / n_layers:.3g}")
    bottom, top = math.ceil(n / 2), n // 2
    return sorted(set(range(bottom)) | set(range(n_layers - top, n_layers)))


def outer(n_layers: int, k_in: int, k_out: int) -> list[int]:
    """[0, k_in) ∪ [L - k_out, L): the blocks kept by an outer (input + output end) set."""
    return sorted(set(range(k_in)) | set(range(n_layers - k_out, n_layers)))


def parse_range_list(text: str, n_layers: int) -> list[int]:
    """"0-3,26-29" -> [0, 1, 2, 3, 26, 27, 28, 29], checked against L."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise CogprobeError(f"cannot read layer set {text!r}: {part!r} is not a block number or range "
                                "(write e.g. '0-3,26-29')") from None
        if hi_i < lo_i:
            raise CogprobeError(f"layer range {part!r} in {text!r} runs backwards; write it as {hi_i}-{lo_i}")
        out.extend(range(lo_i, hi_i + 1))
    if not out:
        raise CogprobeError(f"layer set {text!r} is empty; give at least one block, e.g. '0-3,26-29' or 'cogsym'")
    if len(out) != len(set(out)):
        dupes = sorted({i for i in out if out.count(i) > 1})
        raise CogprobeError(f"layer set {text!r} lists blocks {dupes} more than once; give each block once")
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise CogprobeError(f"layer set {text!r} has blocks {bad} out of range for a model with "
                            f"{n_layers} blocks (valid: 0-{n_layers - 1})")
    return sorted(out)


def resolve(spec: str | list[int] | Path, n_layers: int) -> list[int]:
    """Any layer-set spelling -> sorted block indices, validated against L."""
    if isinstance(spec, (list, tuple)):
        return parse_range_list(",".join(str(i) for i in spec), n_layers)
    text = str(spec).strip()
    if text == "cogsym":
        return cogsym(n_layers)
    if text.startswith("cogsym:"):
        try:
            f = float(text.split(":", 1)[1])
        except ValueError:
            raise CogprobeError(f"cannot read the fraction in {text!r}; write e.g. cogsym:0.25") from None
        return cogsym(n_layers, f)
    if text.endswith(".json") or Path(text).is_file():
        return _from_selection(Path(text), n_layers)
    return parse_range_list(text, n_layers)


def _from_selection(path: Path, n_layers: int) -> list[int]:
    if not path.is_file():
        raise CogprobeError(f"selection file {path} does not exist; run `cogprobe select` first or give blocks like '0-3,26-29'")
    try:
        sel = json.loads(path.read_text(encoding="utf-8"))
        layers, sel_n = sel["layers"], sel.get("n_layers", n_layers)
    except (ValueError, KeyError, TypeError):  # ValueError: not JSON, or not text at all
        raise CogprobeError(f"{path} is not a cogprobe selection file (needs a 'layers' list)") from None
    if sel_n != n_layers:
        raise CogprobeError(f"{path} was selected for a model with {sel_n} blocks, this one has {n_layers} blocks; select again for this model")
    return resolve(list(layers), n_layers)


def to_string(layers: list[int]) -> str:
    """[0,1,2,3,26,27] -> "0-3,26-27" (the --layers form)."""
    parts, start = [], None
    for i, b in enumerate(layers):
        if start is None:
            start = b
        if i + 1 == len(layers) or layers[i + 1] != b + 1:
            parts.append(f"{start}-{b}" if b != start else f"{b}")
            start = None
    return ",".join(parts)
