"""How many threads verification computes with, and arithmetic whose results do not depend on that number.

Contract:
- `choose_threads(cores, load, runnable, busy)` (pure): threads for each of `busy` processes of ours computing at
  once on `cores` usable cores, given the 1-minute load average and the tasks runnable right now (both count our
  own `busy` processes, or will soon). Other work = the larger of the two, less `busy`; the free cores
  (cores - other work, rounded) are shared out; at least 1 each, and 1 each when the load is above the core count.
- `verify_threads(busy=1)`: that choice on this machine, as a `ThreadChoice` that says how it was made; an
  `OMP_NUM_THREADS` set by the user wins.
- `one_thread()`: a block in which torch computes on one thread (the previous count restored after).
- `parallel_map(function, items, threads)`: `function(item)` for each item, in order, `threads` at a time, each
  call on one torch thread. Each result is computed exactly as on one thread, whatever `threads` is: the metrics of
  `qexport verify`, its API and the pytest gate are the same numbers on one machine. (torch splits a bf16 matmul's
  work differently for 1 and 2 threads on oneDNN/AMX CPUs: a 100M-parameter model's logits then differ by up to
  0.03, and KLD p99, top-1 and max |dlogit| with them; parallel reductions of sums do the same in the last bits.)
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def choose_threads(cores: int, load: float | None, runnable: int | None = None, busy: int = 1) -> int:
    """Threads for each of `busy` processes of ours on `cores` cores (see the module docstring)."""
    cores, busy = max(1, cores), max(1, busy)
    seen = [x for x in (load, runnable) if x is not None]
    if not seen:
        return max(1, cores // busy)
    if load is not None and load > cores:  # oversubscribed: every extra thread only waits for a core
        return 1
    others = max(0.0, max(seen) - busy)
    free = round(max(0.0, cores - others))
    return max(1, min(cores, free) // busy)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # e.g. "2 cores, load 2.10: 1 free" or "OMP_NUM_THREADS=1" or "--threads"

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason})"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_load() -> tuple[float | None, int | None]:
    """(1-minute load average, tasks runnable now less the one reading this) or None where the system says
    nothing (no getloadavg, no /proc)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    runnable = None
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            runnable = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        pass
    return load, runnable


def verify_threads(busy: int = 1) -> ThreadChoice:
    """The thread count for one of `busy` processes of ours verifying at once on this machine."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp}")
    cores = usable_cores()
    load, runnable = machine_load()
    threads = choose_threads(cores, load, runnable, busy)
    shown = "unknown" if load is None else f"{load:.2f}"
    share = f", shared by {busy} workers" if busy > 1 else ""
    return ThreadChoice(threads, f"{cores} cores, load {shown}{share}; --threads N to choose")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parallel_map(function: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """`function(item)` for each item in order, at most `threads` calls at once (and in memory), each on one torch
    thread and without autograd (grad mode is per thread). The first call runs alone: a model may finish loading
    in its first forward pass (compressed-tensors decompresses its weights in a forward pre-hook), which two
    threads must not do at once."""
    import torch

    items = list(items)

    def call(item):
        with torch.no_grad():
            return function(item)

    with one_thread():  # new threads take torch's count when they start computing: 1
        if not items:
            return
        yield call(items[0])
        if threads <= 1:
            for item in items[1:]:
                yield call(item)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qexport-verify") as pool:
            for start in range(1, len(items), threads):
                yield from pool.map(call, items[start:start + threads])
