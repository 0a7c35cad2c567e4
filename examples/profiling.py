"""Side-by-side timing and peak-memory measurement for the demo and the benchmarks.

Paths compared with each other are timed interleaved (:func:`interleaved_times`): round-robin, one
call of each path per round, so that load from other processes hits every path alike; ratios are
taken within each round, then their median (:meth:`Interleaved.ratio`).

Peak memory is measured above the level at entry: on CUDA with the caching allocator's statistics,
on CPU with the process's resident-set high-water mark (Linux: reset through /proc/self/clear_refs).
Absolute times on shared machines drift; compare paths measured in the same run, as ratios.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak memory ``fn()`` allocates above the level at entry (None where it can't be measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        _synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - start
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        # glibc keeps freed buffers resident for reuse; handing their pages back first makes a
        # path that reuses memory freed by an earlier one fault it in again, so it counts.
        libc.malloc_trim(0)
    start = _proc_status_bytes("VmRSS")
    if start is None or not _reset_cpu_peak():
        return None
    result = fn()
    del result
    return max(0, _proc_status_bytes("VmHWM") - start)


@dataclass
class Measurement:
    name: str
    median_s: float
    peak_bytes: int | None


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``repeats`` calls of ``fn()``, each synchronised on ``device``."""
    device = torch.device(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Interleaved:
    """Wall times of paths timed round-robin: ``times[name][r]`` is path ``name``'s call in round ``r``."""

    times: dict[str, list[float]]

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times.values()), []))

    def median(self, name: str) -> float:
        """Median seconds of path ``name`` over the rounds."""
        return statistics.median(self.times[name])

    def ratio(self, name: str, base: str) -> float:
        """Median over rounds of time(``name``) / time(``base``) in the same round: a stall that hits
        one round hits both of its calls, so it shifts the ratios less than it shifts the medians."""
        return statistics.median(a / b for a, b in zip(self.times[name], self.times[base]))


def interleaved_times(paths: Mapping[str, Callable[[], object]], rounds: int, device: torch.device | str = "cpu",
                      warmup: int = 1, progress: Callable[[str], None] | None = None) -> Interleaved:
    """Times the ``paths`` (name -> callable) round-robin: ``warmup`` untimed calls of each, then
    ``rounds`` rounds of one timed call of each path in the mapping's order (each call synchronised on
    ``device``). ``progress`` (optional) receives a line before each round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        if progress is not None:
            progress(f"round {r + 1}/{rounds}: {', '.join(paths)}")
        for name, fn in paths.items():
            times[name].append(median_seconds(fn, 1, device))
    return Interleaved(times)


def measure(fn: Callable[[], object], name: str = "", device: torch.device | str = "cpu", repeats: int = 5,
            warmup: int = 1) -> Measurement:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup``, and its peak memory."""
    for _ in range(warmup):
        fn()
    return Measurement(name, median_seconds(fn, repeats, device), peak_memory_bytes(fn, device))


def load_average() -> str:
    """The machine's load averages over 1, 5 and 15 minutes, for a benchmark's report (``n/a`` where unknown):
    on a shared machine, what else ran beside the measurement."""
    try:
        return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "load average n/a"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
