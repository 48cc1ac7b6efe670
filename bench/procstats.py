"""Process measurements for the benchmarks, read from /proc (Linux only).

Peak summed RSS of process groups, sampled in a thread, and the CPU time the
processes used. RSS counts a shared page (the Ray object store's included) in
every process that maps it, so summed figures are upper bounds.
"""

from __future__ import annotations

import os
import threading
import time

SAMPLE_INTERVAL_S = 0.02  # between RSS samples
GROUP_REFRESH_S = 0.5  # between listings of the processes to sample
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, str, str]]:
    """Map pid -> (parent pid, comm, command line) for every process in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read(300).replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while the table was read
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(entry)] = (parent, comm, command)
    return table


def descendants(table: dict[int, tuple[int, str, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _comm, _command) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0  # the process has ended


def cpu_seconds(path: str) -> float:
    """Return user + system CPU time from a /proc stat file, 0 if the process has ended."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class ProcessSampler:
    """Measure the peak summed RSS of process groups, and the CPU time they and the driver use.

    RSS is sampled every :data:`SAMPLE_INTERVAL_S` in a thread, and the groups
    are listed again every :data:`GROUP_REFRESH_S`, because Ray may start
    workers during a run. CPU time is read at the start and the end, over every
    process of the groups and this driver, less the sampling thread's own.
    A process that ends during the run loses its CPU time from the sum.
    """

    def __init__(self, groups) -> None:
        self.groups = groups  # callable returning {group name: set of pids}
        self.peaks: dict[str, int] = {}
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._own_cpu_seconds = 0.0

    def _cpu_now(self, pids: set[int]) -> dict[int, float]:
        return {pid: cpu_seconds(f"/proc/{pid}/stat") for pid in pids | {os.getpid()}}

    def _run(self) -> None:
        own_stat = f"/proc/self/task/{threading.get_native_id()}/stat"
        next_refresh = 0.0
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            if time.monotonic() >= next_refresh:
                current = self.groups()
                self._seen |= set().union(*current.values())
                next_refresh = time.monotonic() + GROUP_REFRESH_S
            for name, pids in current.items():
                self.peaks[name] = max(self.peaks.get(name, 0), sum(rss_bytes(p) for p in pids))
        self._own_cpu_seconds = cpu_seconds(own_stat)

    def __enter__(self) -> ProcessSampler:
        self._seen = set().union(*self.groups().values())
        self._cpu_start = self._cpu_now(self._seen)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._seen |= set().union(*self.groups().values())
        cpu_end = self._cpu_now(self._seen)
        used = sum(end - self._cpu_start.get(pid, 0.0) for pid, end in cpu_end.items())
        self.cpu_seconds = used - self._own_cpu_seconds


def all_descendants(root: int) -> set[int]:
    """Every process below ``root`` (a driver and the local Ray it started)."""
    return descendants(process_table(), root)
