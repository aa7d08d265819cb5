"""What both benchmarks (`bench.webhook_load`, `bench.pipeline_load`) do around their measurements: the
databases and topology prefixes a run makes and removes, the load generator process, waiting until the
servers are idle, background samplers, signal handling, the machine description and the results file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

from bench.loadgen import MEASURE_END, MEASURE_START, Plan
from bench.procstats import read_proc_file
from esim_common.topology import delete_from_url, esim_topology

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY_DELETE_TIMEOUT_SECONDS = 30

T = TypeVar("T")


# ------------------------------------------------------------------- what a run makes, and removes


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


class Resources:
    """The databases and topology prefixes one run makes on the shared servers, so that all of them are
    removed at the end: `esim_bench_<id>[_<suffix>]` and `bench-<id>[-<suffix>].`."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(4)
        self.base_dsn = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
        self.amqp_url = os.environ.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
        self.databases: list[str] = []
        self.prefixes: list[str] = []

    def database(self, suffix: str = "") -> str:
        """The DSN of a new database of this run (created by the caller)."""
        name = f"esim_bench_{self.run_id}" + (f"_{suffix}" if suffix else "")
        self.databases.append(name)
        return with_database(self.base_dsn, name)

    def prefix(self, suffix: str = "") -> str:
        """A new topology prefix of this run (declared by the caller, or by the services)."""
        prefix = f"bench-{self.run_id}" + (f"-{suffix}" if suffix else "") + "."
        self.prefixes.append(prefix)
        return prefix

    async def remove(self) -> None:
        """Delete every queue and exchange under the run's prefixes and drop its databases; say on stderr
        what is left behind on the shared servers."""
        for prefix in self.prefixes:
            try:
                await asyncio.wait_for(
                    delete_from_url(self.amqp_url, esim_topology(prefix=prefix)),
                    timeout=TOPOLOGY_DELETE_TIMEOUT_SECONDS,
                )
            except Exception as exc:
                print(f"could not delete the queues under prefix {prefix!r}: {exc!r}", file=sys.stderr)
        if not self.databases:
            return
        try:
            admin = await asyncpg.connect(with_database(self.base_dsn, "postgres"))
            try:
                for name in self.databases:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()
        except Exception as exc:
            print(f"could not drop the databases {self.databases}: {exc!r}", file=sys.stderr)


@contextlib.asynccontextmanager
async def cleaned_up(cleanup: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run the body, then `cleanup` however it ends: SIGTERM cancels the run like Ctrl-C does, and a
    second Ctrl-C cannot cut the clean-up short (and leave processes, queues or databases behind)."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            await cleanup()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


async def server_versions(dsn: str, amqp_url: str) -> dict[str, str]:
    """PostgreSQL's and RabbitMQ's versions, for the results."""
    conn = await asyncpg.connect(dsn)
    try:
        postgres = "PostgreSQL " + str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()
    amqp = await aio_pika.connect(amqp_url)
    try:
        rabbitmq = str(amqp.transport.connection.server_properties.get("version", "?"))  # type: ignore[union-attr]
    finally:
        await amqp.close()
    return {"postgres": postgres, "rabbitmq": rabbitmq}


# ----------------------------------------------------------------------------------- processes


async def cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Sampler:
    """Something that samples in a background task from `start()` to `stop()`."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        await cancel(self._task)

    async def _sample(self) -> None:
        raise NotImplementedError


async def run_loadgen(
    plan: Plan, workdir: Path, name: str, on_marker: Callable[[str], None]
) -> dict[str, Any]:
    """Run `plan` in a load generator process (`bench.loadgen`) and return its result; `on_marker` is
    called at the start and the end of the measured window, which the generator announces."""
    plan_path = workdir / f"plan-{name}.json"
    result_path = workdir / f"result-{name}.json"
    plan_path.write_text(json.dumps(plan.__dict__))
    generator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        str(plan_path),
        str(result_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert generator.stdout is not None
    try:
        async for line in generator.stdout:
            marker = line.decode().strip()
            if marker in (MEASURE_START, MEASURE_END):
                on_marker(marker)
        returncode = await generator.wait()
    finally:  # cancelled (SIGTERM, Ctrl-C) or failed: the generator must not go on sending
        if generator.returncode is None:
            generator.kill()
            await generator.wait()
    if returncode != 0:
        raise RuntimeError(f"the load generator failed (exit {returncode})")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


async def wait_until_idle(
    read: Callable[[], T], used: Callable[[T, T], float], *, share: float, at_most: float, sample: float = 0.5
) -> bool:
    """Until the CPU `used` between two `read`s `sample` seconds apart is below `share` of a core (a
    previous step's backlog, set-up work), for `at_most` seconds; False if it never was."""
    deadline = time.monotonic() + at_most
    while time.monotonic() < deadline:
        before = read()
        await asyncio.sleep(sample)
        if used(before, read()) / sample < share:
            return True
    return False


def count_lines(path: Path, needle: str) -> int:
    """Lines of a log file that contain `needle` (0 if there is no file)."""
    if not path.exists():
        return 0
    with path.open(errors="replace") as f:
        return sum(1 for line in f if needle in line)


# ------------------------------------------------------------------------------------- results


def machine_description() -> dict[str, str]:
    model = "unknown CPU"
    for line in (read_proc_file("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in (read_proc_file("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "machine": f"{model}, {os.cpu_count()} cores, {mem_kb / 1024 / 1024:.0f} GiB RAM",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (with uncommitted changes)" if dirty else commit


@dataclass
class RunReport:
    """A benchmark's results; each starts with when, which commit, which command and on what machine."""

    args: argparse.Namespace
    command: str
    started: datetime
    versions: dict[str, str]  # "postgres", "rabbitmq": `server_versions()`

    def render(self) -> str:
        raise NotImplementedError

    def header_lines(self, machine_note: str, load_note: str = "") -> list[str]:
        """`machine_note` ends the machine line (what shares the cores), `load_note` the load line."""
        info = machine_description()
        return [
            f"- **date**: {self.started:%Y-%m-%d %H:%M} UTC",
            f"- **git commit**: {git_commit()}",
            f"- **command**: `{self.command}`",
            f"- **machine**: {info['machine']}; {info['os']}; Python {info['python']}; "
            f"{self.versions.get('postgres', '?')}; RabbitMQ {self.versions.get('rabbitmq', '?')}"
            f"{machine_note}",
            f"- **load average at the end**: {info['load']}{load_note}",
        ]


def argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc.splitlines()[0] if doc else None
    )


def add_output_options(parser: argparse.ArgumentParser, default_results: Path) -> None:
    parser.add_argument("--results", type=Path, default=default_results, help="markdown file to (over)write")
    parser.add_argument("--no-record", action="store_true", help="print the results only (trial runs)")


def main(
    module: str,
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace, str], Coroutine[Any, Any, RunReport]],
) -> int:
    """Parse, run, print the results and (unless `--no-record`) write them to `--results`."""
    args = parse_args(argv)
    command = f"uv run --frozen python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(run(args, command.strip()))
    text = report.render()
    print()
    print(text)
    if not args.no_record:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
        shown = args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results
        print(f"written to {shown}")
    return 0
