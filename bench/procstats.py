"""What /proc says about processes and the machine: RSS, peak RSS, CPU seconds (Linux only)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_proc_file(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    raw = read_proc_file(f"/proc/{pid}/stat")
    if raw is None:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> list[int]:
    """`root` and every process below it (uvicorn workers, if any)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def rss_bytes(pid: int) -> int:
    fields = (read_proc_file(f"/proc/{pid}/statm") or "0 0").split()
    return int(fields[1]) * PAGE_SIZE


def hwm_bytes(pid: int) -> int:
    """The kernel's own peak RSS of the process (VmHWM)."""
    for line in (read_proc_file(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss(pids: Iterable[int]) -> int:
    """Summed RSS of a process tree (pages shared by forked workers count once per process)."""
    return sum(rss_bytes(pid) for pid in pids)


def tree_hwm(pids: Iterable[int]) -> int:
    """Summed VmHWM of a process tree (each process's own peak, possibly at different moments)."""
    return sum(hwm_bytes(pid) for pid in pids)


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each of `pids` that still exists."""
    found = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            found[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return found


def cpu_by_command(names: tuple[str, ...]) -> dict[int, float]:
    """CPU seconds of every process whose command is one of `names` (Postgres backends, the broker)."""
    pids = []
    for pid in _all_pids():
        comm = (read_proc_file(f"/proc/{pid}/comm") or "").strip()
        if comm in names:
            pids.append(pid)
    return cpu_seconds(pids)


def postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds of the Postgres processes that work for `database`: its backends (their title names
    the database) and the server's own processes (WAL writer, checkpointer, ...), but not the backends
    of other databases — other work on a shared server stays out of the figure."""
    pids = []
    for pid in _all_pids():
        if (read_proc_file(f"/proc/{pid}/comm") or "").strip() != "postgres":
            continue
        title = (read_proc_file(f"/proc/{pid}/cmdline") or "").replace("\0", " ")
        is_backend = "(" in title or " [local]" in title  # `user database host(port) state`
        if not is_backend or (database and f" {database} " in title):
            pids.append(pid)
    return cpu_seconds(pids)


def cpu_used(before: dict[int, float], after: dict[int, float], *, new_processes: bool = True) -> float:
    """CPU seconds used between two readings by the processes alive at the second. A process that
    started in between counts whole (unless `new_processes` is False: a `rabbitmqctl` is a beam.smp too,
    but not the broker); one that ended in between is lost, so this is a lower bound."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if new_processes or pid in before)


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    values = [int(v) for v in (read_proc_file("/proc/stat") or "cpu 0 0 0 0").splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far by the processes a benchmark watches, Postgres, RabbitMQ and the whole
    machine, at one moment (`at`: monotonic seconds)."""

    at: float
    processes: dict[Any, float]  # by pid, or by process name
    postgres: dict[int, float]
    rabbitmq: dict[int, float]
    machine_busy: float
    machine_total: float

    @classmethod
    def take(
        cls, processes: Callable[[], dict[Any, float]], postgres: Callable[[], dict[int, float]]
    ) -> CpuSnapshot:
        busy, total = machine_busy_seconds()
        return cls(
            at=time.monotonic(),
            processes=processes(),
            postgres=postgres(),
            rabbitmq=cpu_by_command(("beam.smp",)),
            machine_busy=busy,
            machine_total=total,
        )
