"""Memory: how much a process may use (`available`, `parse_bytes`) and how much a block of code
used at its peak (`PeakMemory`).

Why in the package: the probe picks its engine from the memory it may use and records the peak it
reached next to its tables, and the benchmarks measure with the same meter.

Peak memory. On CPU the kernel keeps the process's high-water mark of resident memory (VmHWM in
/proc/self/status); writing "5" to /proc/self/clear_refs resets it to the current RSS. So the peak
of a block of code is exact (no sampling gaps): reset on entry, read on exit. Where that file is not
writable, a thread samples RSS every millisecond instead (`kind` says `rss-sampled`). The numbers
are of the whole process (weights, libraries, the call's own tensors). On CUDA:
`torch.cuda.max_memory_allocated`, reset on entry.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

from cogprobe.core.errors import CogprobeError

GiB = 1 << 30
HOST = "cpu"   # the default device: memory measured is the process's resident memory
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int | float) -> int:
    """Bytes from '20GiB', '512MiB', '24GB' or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CogprobeError(f"cannot read {text!r} as an amount of memory; write it as e.g. 20GiB, 512MiB or 24GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def available(device=HOST) -> int:
    """Bytes this process may still use on `device`: the CUDA device's free memory, else the
    machine's available memory (MemAvailable)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def process_peak(device=HOST) -> int:
    """The most memory this process has held so far: on CUDA the device's allocations, else resident
    memory (VmHWM). Read without resetting anything, so a caller's own `PeakMemory` is undisturbed."""
    import torch
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M).group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory while the block runs: `.peak` (bytes), `.before` (at entry), `.kind`.

    `device`: where the measured work runs ("cpu", or "cuda" for GPU memory)."""

    def __init__(self, device: str = HOST):
        self.device = str(device)
        self.peak = self.before = 0
        self.kind = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        import torch
        _sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.kind, self.before = "cuda", torch.cuda.memory_allocated()
        elif _reset_hwm():
            self.kind, self.before = "rss-hwm", rss_bytes()
        else:
            self.kind, self.before = "rss-sampled", rss_bytes()
            self.peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        import torch
        _sync(self.device)
        if self.kind == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        elif self.kind == "rss-hwm":
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        """What the block added on top of what the process held when it started."""
        return max(0, self.peak - self.before)
