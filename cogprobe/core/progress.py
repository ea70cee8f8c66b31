"""One progress bar for every long verb (sweep, capture, select; `train` has its own, alike): tqdm's,
with rate and ETA.

Shown by the main process only (so a launcher with N processes prints one bar) and off when the
caller asks for quiet (`--quiet`, or a study, which prints its own stage lines). A bar that an
error interrupts is cleared, so the error is the one line left on the terminal.
"""
from __future__ import annotations

import contextlib

from cogprobe.core.distributed import world


@contextlib.contextmanager
def bar(desc: str, *, total: int | None, unit: str, enabled: bool = True):
    """A tqdm bar; `total=None` when the count is not known in advance (it then shows count and rate)."""
    from tqdm.auto import tqdm
    ticks = tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and world().is_main), dynamic_ncols=True)
    try:
        yield ticks
    except BaseException:
        ticks.leave = False
        raise
    finally:
        ticks.close()
