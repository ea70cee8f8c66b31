"""Processes and devices: the one place cogprobe asks accelerate where it runs.

Launched plainly, cogprobe is one process on one device (CUDA if present, else
CPU). Launched by `torchrun` or `accelerate launch`, every process runs the same
command: training is data-parallel (accelerate's `Accelerator`), sweeps and
capture split their work between the processes and the main process merges the
parts (see `probe`). On CPU the processes talk over gloo; accelerate only takes
the multi-CPU path when asked for the CPU, hence `cpu=` below.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def on_cpu() -> bool:
    """True where there is no CUDA device: accelerate must then be told so (its multi-CPU path)."""
    return not torch.cuda.is_available()


def state():
    """accelerate's process state (a per-process singleton): rank, world size, device."""
    from accelerate import PartialState
    return PartialState(cpu=on_cpu())


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones."""
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            state().wait_for_everyone()

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every size-th item from position rank (round robin)."""
        return list(items[self.rank::self.size])

    def chunk(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of `items` (neighbours stay together: a sweep's configurations
        share block prefixes with their neighbours)."""
        n = len(items)
        return list(items[n * self.rank // self.size: n * (self.rank + 1) // self.size])

    def part(self, path: Path) -> Path:
        """The file this rank writes its part of `path` into (world size in the name, so parts of an
        interrupted run with another process count are never mixed in). One process writes `path` itself."""
        return path if self.size == 1 else _part_name(path, self.rank, self.size)

    def parts(self, path: Path) -> list[Path]:
        return [_part_name(path, r, self.size) for r in range(self.size)]


def _part_name(path: Path, rank: int, size: int) -> Path:
    return path.with_name(f".{path.name}.part-{rank}-of-{size}")


def world() -> World:
    """The current process's rank, world size and device (rank 0 of 1 when launched plainly)."""
    s = state()
    return World(s.process_index, s.num_processes, s.device)


def default_device() -> torch.device:
    """Where models go: this process's CUDA device when there is one, else the CPU."""
    return world().device if not on_cpu() else torch.device("cpu")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to `n` (None: left as they are) for the block, restored after.

    Two processes side by side on a 2-core CPU, each at torch's default of one thread per core,
    oversubscribe it: every parallel region waits on a thread the other process has descheduled."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
