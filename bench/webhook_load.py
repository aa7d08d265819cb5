"""Webhook throughput benchmark: signed Stripe webhooks at a fixed rate, 5 % duplicates, against the
webhook service and, in the same run, a bare FastAPI endpoint (the reference).

    uv run --frozen python -m bench.webhook_load                       # 1,000/s for 60 s (+5 s warm-up)
    uv run --frozen python -m bench.webhook_load --rate 500 --duration 10
    uv run --frozen python -m bench.webhook_load --rates 250,500,750,1000 --duration 20   # a sweep
    make bench BENCH_ARGS="--duration 10"

What one run does (see bench/README.md for the method):

1. creates its own database (migrated with `esim_common.migrate`) and its own topology prefix on the
   local Postgres and RabbitMQ, and pre-creates every order the run will pay, `pending_payment` with
   known prices — no Stripe or Zendit call is needed;
2. starts the webhook service (`python -m webhook`) and the reference (`python -m bench.bare_app`) as
   separate processes, configured through the environment like in production;
3. for each rate: drives the reference, then the service, each from a separate open-loop generator
   process (`bench.loadgen`) with the same traffic, while sampling the servers' RSS and CPU from /proc;
4. checks the outcome in the database and on the `funding.order-paid` queue: every acknowledged order
   `paid`, its outbox row published, exactly one message per order;
5. prints the results, writes them to bench/results/webhooks.md (the latest run replaces the previous
   one; `--no-record` for trial runs), and removes its database, queues and exchange.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/webhook_load.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aio_pika
import asyncpg
import httpx

from bench import events, harness, procstats
from bench.harness import ROOT, count_lines
from bench.loadgen import MEASURE_END, MEASURE_START, STATUS_IO_ERROR, STATUS_TIMEOUT, Plan
from bench.procstats import CpuSnapshot, cpu_by_command, cpu_seconds, cpu_used
from bench.stats import percentile
from esim_common.migrate import migrate
from esim_common.order_repository import INSERT_ORDER
from esim_common.topology import declare_from_url, esim_topology
from esim_sandbox.serve import LOOPBACK, free_port

DEFAULT_RESULTS = ROOT / "bench" / "results" / "webhooks.md"
LOGS_DIR = ROOT / "var" / "bench"
WEBHOOK_PATH = "/api/webhooks/stripe"
SECRET = "whsec_benchmark_secret"
ORDER_PAID_QUEUE = "funding.order-paid"

# The target (issue 4): at least 1,000 webhooks/s with p99 under 50 ms, nothing failed, lost or doubled,
# the service under 150 MB.
TARGET_RATE = 1000.0
TARGET_P99_SECONDS = 0.050
TARGET_RSS_BYTES = 150 * 1024 * 1024
# "Sustained": the responses completed inside the window keep up with what was offered.
SUSTAINED_FRACTION = 0.99
# Above this share of one core the generator may be what limits the rate, not the server.
GENERATOR_CPU_WARNING = 0.7
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
SAMPLE_INTERVAL_SECONDS = 0.1
# Between steps: wait (at most this long) until the servers use less than this share of a core.
SETTLE_TIMEOUT_SECONDS = 60.0
SETTLE_SAMPLE_SECONDS = 0.5
SETTLED_CPU_SHARE = 0.1
TREE_RESCAN_SECONDS = 2.0


@dataclass
class Server:
    """A server process started by the benchmark, and what /proc says about it."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    peak_rss: int = 0  # over the whole run
    window_peak_rss: int = 0  # since the last `start_window()`
    _sampler: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(  # our own interpreter and modules
                self.command,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def tree(self) -> list[int]:
        return procstats.descendants(self.pid)

    async def _sample(self) -> None:
        """Peak of the summed RSS of the process tree (shared pages of forked workers count twice)."""
        pids: list[int] = []
        rescan_at = 0.0
        while self.popen is not None and self.popen.poll() is None:
            if time.monotonic() >= rescan_at:  # the tree rarely changes; /proc scans cost CPU
                pids = await asyncio.to_thread(self.tree)
                rescan_at = time.monotonic() + TREE_RESCAN_SECONDS
            rss = procstats.tree_rss(pids)
            self.peak_rss = max(self.peak_rss, rss)
            self.window_peak_rss = max(self.window_peak_rss, rss)
            await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)

    async def wait_ready(self) -> None:
        url = f"http://{LOOPBACK}:{self.port}{self.ready_path}"
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.popen is None or self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} not ready after {READY_TIMEOUT_SECONDS}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.2)

    def start_window(self) -> None:
        self.window_peak_rss = procstats.tree_rss(self.tree())

    def kernel_peak_rss(self) -> int:
        """Sum of VmHWM over the live tree (each process's own peak, possibly at different moments)."""
        return procstats.tree_hwm(self.tree())

    async def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            # SIGINT, not SIGTERM: uvicorn re-raises the signal once shut down, and a re-raised SIGTERM
            # would kill the process before cProfile (--profile-service) writes its file.
            self.popen.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self.popen.wait, STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait)
        await harness.cancel(self._sampler)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def count_log_lines(self, needle: str) -> int:
        return count_lines(self.log_path, needle)


# ------------------------------------------------------------------------------------------ a step


@dataclass
class Step:
    """One target driven at one rate: what the generator saw and what the machine did meanwhile."""

    target: str
    rate: float
    first_index: int
    unique_orders: int = 0
    rows: list[list[float]] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)
    server_cpu: float = 0.0
    postgres_cpu: float = 0.0
    rabbitmq_cpu: float = 0.0
    machine_busy: float = 0.0  # share of all cores
    peak_rss: int = 0  # the server's, from the start of the step to the end of its last answer
    wall: float = 0.0
    # Filled by the verification (service only).
    acked_orders: int = 0
    lost: int | None = None
    duplicated: int | None = None
    lost_examples: list[str] = field(default_factory=list)

    def measured(self, warmup: float) -> list[list[float]]:
        return [row for row in self.rows if row[2] >= warmup]

    def answered_per_second(self, warmup: float, duration: float) -> float:
        """Responses (any status) that arrived inside the measured window, per second."""
        answered = sum(
            1 for row in self.rows if row[3] >= 0 and warmup <= row[2] + row[3] <= warmup + duration
        )
        return answered / duration


@dataclass
class Stats:
    requests: int
    duplicates: int
    ok: int
    errors: int
    timeouts: int
    io_errors: int
    non_2xx: dict[int, int]
    throughput: float
    p50: float
    p90: float
    p99: float
    max: float


def stats(step: Step, warmup: float, duration: float) -> Stats:
    rows = step.measured(warmup)
    ok_rows = [row for row in rows if 200 <= row[4] < 300]
    latencies = sorted(row[3] for row in rows if row[3] >= 0)
    # Failed requests count in the latency figures too (a timeout as its timeout), so errors never
    # make the percentiles look better.
    non_2xx: dict[int, int] = {}
    for row in rows:
        status = int(row[4])
        if status > 0 and not 200 <= status < 300:
            non_2xx[status] = non_2xx.get(status, 0) + 1
    completed_in_window = sum(1 for row in ok_rows if row[2] + row[3] <= warmup + duration)
    timeouts = sum(1 for row in rows if row[4] == STATUS_TIMEOUT)
    io_errors = sum(1 for row in rows if row[4] == STATUS_IO_ERROR)
    failed_latencies = [step.generator.get("timeout", 0.0)] * timeouts
    all_latencies = sorted(latencies + failed_latencies) if failed_latencies else latencies
    return Stats(
        requests=len(rows),
        duplicates=sum(1 for row in rows if row[1]),
        ok=len(ok_rows),
        errors=len(rows) - len(ok_rows),
        timeouts=timeouts,
        io_errors=io_errors,
        non_2xx=non_2xx,
        throughput=completed_in_window / duration if duration else math.nan,
        p50=percentile(all_latencies, 0.50),
        p90=percentile(all_latencies, 0.90),
        p99=percentile(all_latencies, 0.99),
        max=all_latencies[-1] if all_latencies else math.nan,
    )


async def drive(
    server: Server, rate: float, first_index: int, args: argparse.Namespace, run_id: str, workdir: Path
) -> Step:
    plan = Plan(
        host=LOOPBACK,
        port=server.port,
        path=WEBHOOK_PATH,
        run_id=run_id,
        first_index=first_index,
        rate=rate,
        warmup=args.warmup,
        duration=args.duration,
        duplicate_ratio=args.duplicates,
        seed=args.seed + first_index,
        event_type=args.event_type,
        secret=SECRET,
        max_connections=args.connections,
        timeout=args.timeout,
    )
    step = Step(target=server.name, rate=rate, first_index=first_index)
    pids = server.tree()
    server.start_window()
    # CPU counters at the start and the end of the measured window, which the generator announces.
    snapshots: dict[str, CpuSnapshot] = {}

    def snapshot() -> CpuSnapshot:  # the server's processes, and every Postgres backend
        return CpuSnapshot.take(lambda: cpu_seconds(pids), lambda: cpu_by_command(("postgres",)))

    result = await harness.run_loadgen(
        plan,
        workdir,
        f"{server.port}-{first_index}",
        lambda marker: snapshots.__setitem__(marker, snapshot()),
    )
    if len(snapshots) != 2:
        raise RuntimeError("the load generator did not announce its measured window")
    before, after = snapshots[MEASURE_START], snapshots[MEASURE_END]
    step.rows = result.pop("requests")
    step.unique_orders = result["unique_orders"]
    step.generator = {**result, "timeout": args.timeout}
    step.wall = after.at - before.at
    step.peak_rss = server.window_peak_rss
    step.server_cpu = cpu_used(before.processes, after.processes) / step.wall
    step.postgres_cpu = cpu_used(before.postgres, after.postgres) / step.wall
    step.rabbitmq_cpu = cpu_used(before.rabbitmq, after.rabbitmq, new_processes=False) / step.wall
    total = after.machine_total - before.machine_total
    step.machine_busy = (after.machine_busy - before.machine_busy) / total if total else math.nan
    return step


async def settle(targets: list[Target]) -> None:
    """Wait until no server is still working off the previous step (an overloaded service keeps
    processing requests whose client gave up), so that one step's backlog does not load the next."""
    pids = [pid for t in targets for pid in t.server.tree()]
    if await harness.wait_until_idle(
        lambda: cpu_seconds(pids),
        cpu_used,
        share=SETTLED_CPU_SHARE,
        at_most=SETTLE_TIMEOUT_SECONDS,
        sample=SETTLE_SAMPLE_SECONDS,
    ):
        return
    print(
        f"warning: the servers were still busy after {SETTLE_TIMEOUT_SECONDS:.0f} s; "
        "the next figures (and a late duplicate) may be affected",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- set-up and checking


async def create_orders(dsn: str, run_id: str, count: int) -> None:
    """`count` orders in pending_payment, priced by `events.price`, each with its Checkout Session id."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = [
            (
                events.transaction_id(run_id, i),
                None,
                events.OFFER_ID,
                events.price(i),
                events.CURRENCY,
                events.zendit_cost(i),
                events.CURRENCY,
                "customer@example.com",
                "Bench Customer",
                "automatic",
            )
            for i in range(count)
        ]
        # The repository's own INSERT (what checkout runs), pipelined. Parameters after capture_method
        # are optional facts about the offer (None: not known), so pad to however many it takes.
        placeholders = len(set(re.findall(r"\$(\d+)", INSERT_ORDER)))
        await conn.executemany(INSERT_ORDER, [row + (None,) * (placeholders - len(row)) for row in rows])
        await conn.execute(
            "UPDATE esim_purchases"
            "   SET stripe_checkout_session_id = 'cs_test_bench' || substr(transaction_id, 5)"
        )
        await conn.execute("VACUUM ANALYZE esim_purchases")
    finally:
        await conn.close()


async def drain_queue(amqp_url: str, queue_name: str) -> list[tuple[str | None, str | None]]:
    """(message_id, correlation_id) of every message waiting in `queue_name` (it has no consumer)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(queue_name, passive=True)
        seen: list[tuple[str | None, str | None]] = []
        arrived = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append((message.message_id, message.correlation_id))
            await message.ack()
            arrived.set()

        tag = await queue.consume(on_message)
        # Every message was confirmed before its 2xx, so they are all there: take them until a second
        # passes without one.
        while True:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), timeout=1.0)
            except TimeoutError:
                break
        await queue.cancel(tag)
        return seen


async def verify(dsn: str, amqp_url: str, queue_name: str, run_id: str, steps: list[Step]) -> None:
    """Fill `lost` and `duplicated` of each service step from the database and the queue.

    lost       an order whose webhook got a 2xx but is not `paid`, or has no published order.paid in
               the outbox, or no order.paid message on funding.order-paid
    duplicated order.paid messages beyond one per order (by message_id, and by transaction id)
    """
    messages = await drain_queue(amqp_url, queue_name)
    per_txn: dict[str, int] = {}
    per_message_id: dict[str, int] = {}
    for message_id, correlation_id in messages:
        per_txn[correlation_id or "?"] = per_txn.get(correlation_id or "?", 0) + 1
        per_message_id[message_id or "?"] = per_message_id.get(message_id or "?", 0) + 1
    conn = await asyncpg.connect(dsn)
    try:
        status = {
            r["transaction_id"]: r["status"]
            for r in await conn.fetch("SELECT transaction_id, status FROM esim_purchases")
        }
        published = {
            r["transaction_id"]
            for r in await conn.fetch(
                "SELECT transaction_id FROM outbox"
                " WHERE routing_key = 'order.paid' AND published_at IS NOT NULL"
            )
        }
    finally:
        await conn.close()
    for step in steps:
        acked = {int(row[0]) for row in step.rows if 200 <= row[4] < 300}
        step.acked_orders = len(acked)
        lost = []
        duplicated = 0
        for index in range(step.first_index, step.first_index + step.unique_orders):
            txn = events.transaction_id(run_id, index)
            count = per_txn.get(txn, 0)
            duplicated += max(0, count - 1)
            if index in acked and (status.get(txn) != "paid" or txn not in published or count == 0):
                lost.append(f"{txn}: status={status.get(txn)} published={txn in published} messages={count}")
        step.lost = len(lost)
        step.lost_examples = lost[:5]
        step.duplicated = duplicated
    # A message id seen twice is a duplicate whatever its correlation id says.
    extra_by_id = sum(count - 1 for count in per_message_id.values() if count > 1)
    if steps and extra_by_id > sum(step.duplicated or 0 for step in steps):
        steps[-1].duplicated = (
            (steps[-1].duplicated or 0) + extra_by_id - sum(step.duplicated or 0 for step in steps)
        )


# -------------------------------------------------------------------------------------- reporting


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.0f} MB"


def _ratio(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.1f}×"


def _errors(s: Stats) -> str:
    parts = [f"{code}: {count}" for code, count in sorted(s.non_2xx.items())]
    if s.timeouts:
        parts.append(f"timeouts: {s.timeouts}")
    if s.io_errors:
        parts.append(f"connection errors: {s.io_errors}")
    return f"{s.errors}" + (f" ({', '.join(parts)})" if parts else "")


def passes(step: Step, s: Stats) -> list[str]:
    """Why this service step misses the target (empty: it meets it)."""
    misses = []
    if s.throughput < SUSTAINED_FRACTION * step.rate:
        misses.append(f"throughput {s.throughput:.0f}/s < {SUSTAINED_FRACTION:.0%} of {step.rate:.0f}/s")
    if not s.p99 < TARGET_P99_SECONDS:
        misses.append(f"p99 {_ms(s.p99)} ≥ {_ms(TARGET_P99_SECONDS)}")
    if s.errors:
        misses.append(f"{s.errors} errors")
    if step.lost:
        misses.append(f"{step.lost} lost")
    if step.duplicated:
        misses.append(f"{step.duplicated} duplicated")
    if step.peak_rss >= TARGET_RSS_BYTES:
        misses.append(f"peak RSS {_mb(step.peak_rss)} ≥ {_mb(TARGET_RSS_BYTES)}")
    return misses


@dataclass
class Target:
    """Something the benchmark drives: the reference, the webhook service, or a baseline service."""

    label: str
    server: Server
    is_service: bool  # a webhook service: its outcome is checked (lost, duplicated) and held to the target
    steps: list[Step] = field(default_factory=list)
    kernel_peak_rss: int = 0
    error_lines: int = 0

    @property
    def peak_rss(self) -> int:
        return self.server.peak_rss


@dataclass
class Report(harness.RunReport):
    service: Target
    reference: Target | None
    baseline: Target | None
    service_env: dict[str, str]

    def _row(self, target: Target, step: Step, s: Stats) -> str:
        checked = target.is_service
        label = f"**{target.label}**" if target is self.service else target.label
        return (
            f"| {label} | {step.rate:.0f} | {s.throughput:.0f} | {s.requests} ({s.duplicates}) "
            f"| {_ms(s.p50)} | {_ms(s.p90)} | {_ms(s.p99)} | {_ms(s.max)} | {_errors(s)} "
            f"| {step.lost if checked else '–'} | {step.duplicated if checked else '–'} "
            f"| {step.server_cpu:.0%} | {_mb(step.peak_rss)} |"
        )

    def _ratio_row(self, label: str, a: tuple[Target, Step, Stats], b: tuple[Target, Step, Stats]) -> str:
        (_, sa, xa), (_, sb, xb) = a, b
        return (
            f"| {label} | | {_ratio(xa.throughput, xb.throughput)} | | {_ratio(xa.p50, xb.p50)} "
            f"| {_ratio(xa.p90, xb.p90)} | {_ratio(xa.p99, xb.p99)} | {_ratio(xa.max, xb.max)} | | | "
            f"| {_ratio(sa.server_cpu, sb.server_cpu)} | {_ratio(sa.peak_rss, sb.peak_rss)} |"
        )

    def targets(self) -> list[Target]:
        return [t for t in (self.reference, self.baseline, self.service) if t is not None]

    def render(self) -> str:
        a = self.args
        settings = (
            ", with " + ", ".join(f"`{k}={v}`" for k, v in sorted(self.service_env.items()))
            if self.service_env
            else ", default settings"
        )
        out = [
            "# Webhook benchmark: latest run",
            "",
            "Written by `bench/webhook_load.py` (method and how to run: [bench/README.md](../README.md)).",
            "Each run replaces this file; `git log -p bench/results/webhooks.md` keeps the earlier ones.",
            "",
            *self.header_lines(
                " (both local, sharing the cores with the service and the generator)",
                " (other work on the machine makes figures noisy)",
            ),
            f"- **traffic**: signed `{a.event_type}` events, {a.duplicates:.0%} duplicates (same event "
            f"re-sent, re-signed), open loop at a fixed rate, {a.warmup:g} s warm-up + {a.duration:g} s "
            f"measured per rate, up to {a.connections} keep-alive connections, {a.timeout:g} s timeout",
            f"- **service**: `python -m webhook`{settings}",
            '- **reference**: `python -m bench.bare_app`, a FastAPI endpoint answering `{"received": true}`, '
            "served by the same `esim_common.service.run` with the same logging set-up and settings",
        ]
        if self.baseline:
            out.append(f"- **baseline**: {self.baseline.label}, the same service from another source tree")
        out += [
            "",
            "## Results",
            "",
            "Latency runs from each request's *scheduled* send time to the end of its response (no "
            "coordinated omission); a timeout counts as its timeout. Throughput counts 2xx answers completed "
            "inside the measured window.",
            "",
            "| target | offered /s | achieved /s | requests (dup.) | p50 | p90 | p99 | max | errors | lost "
            "| duplicated | server CPU | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        verdicts = []
        for index, service_step in enumerate(self.service.steps):
            rows: dict[str, tuple[Target, Step, Stats]] = {}
            for target in self.targets():
                step = target.steps[index]
                rows[target.label] = (target, step, stats(step, a.warmup, a.duration))
                out.append(self._row(*rows[target.label]))
            service_row = rows[self.service.label]
            if self.reference:
                out.append(
                    self._ratio_row("ratio service / reference", service_row, rows[self.reference.label])
                )
            if self.baseline:
                out.append(
                    self._ratio_row("ratio service / baseline", service_row, rows[self.baseline.label])
                )
            verdicts.append((service_step.rate, passes(service_step, service_row[2])))
        out += ["", "## Verdict", ""]
        for rate, misses in verdicts:
            out.append(
                f"- {rate:.0f}/s: "
                + ("**meets the target**" if not misses else "misses: " + "; ".join(misses))
            )
        met = [rate for rate, misses in verdicts if not misses]
        target_met = any(rate >= TARGET_RATE for rate in met)
        out.append(
            f"- the target (≥ {TARGET_RATE:.0f}/s sustained, p99 < {_ms(TARGET_P99_SECONDS)}, no errors, "
            f"nothing lost or duplicated, RSS < {_mb(TARGET_RSS_BYTES)}) is "
            f"**{'met' if target_met else 'not met'}**"
            + (
                f"; the highest rate tried that meets it: {max(met):.0f}/s"
                if met
                else "; no rate tried meets it"
            )
        )
        out += [
            "",
            "## Where the CPU went",
            "",
            "Share of one core during the measured window (the machine has "
            f"{os.cpu_count()} cores: {100 * (os.cpu_count() or 1)} %) and, in brackets, CPU milliseconds "
            "per request answered in the window.",
            "",
            "| target | offered /s | server | generator | Postgres (all backends) | RabbitMQ | machine busy "
            "| generator launch lag p99 / max | connections |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for target in self.targets():
            for step in target.steps:
                g = step.generator
                generator_cpu = g["cpu_seconds"] / g["wall_seconds"] if g.get("wall_seconds") else math.nan
                warn = " ⚠" if generator_cpu > GENERATOR_CPU_WARNING else ""
                answered = step.answered_per_second(a.warmup, a.duration)

                def share(cpu: float, answered: float = answered) -> str:
                    per_request = f"{cpu / answered * 1000:.2f} ms" if answered else "n/a"
                    return f"{cpu:.0%} ({per_request})"

                lag = f"{_ms(g['schedule_lag_p99'])} / {_ms(g['schedule_lag_max'])}"
                out.append(
                    f"| {target.label} | {step.rate:.0f} | {share(step.server_cpu)} "
                    f"| {generator_cpu:.0%}{warn} | {share(step.postgres_cpu)} | {share(step.rabbitmq_cpu)} "
                    f"| {step.machine_busy:.0%} | {lag} | {g['connections_opened']} |"
                )
        out += [
            "",
            "Postgres CPU includes every other client of the local server during the step. "
            f"A generator above {GENERATOR_CPU_WARNING:.0%} of a core (⚠) may itself limit the rate.",
            "",
        ]
        for target in self.targets():
            out.append(
                f"- {target.label}: peak RSS over the whole run {_mb(target.peak_rss)} (sampled sum over "
                f"its processes), kernel VmHWM {_mb(target.kernel_peak_rss)}"
                + (f"; ERROR lines in its log: {target.error_lines}" if target.is_service else "")
            )
        examples = [f"{t.label}: {e}" for t in self.targets() for step in t.steps for e in step.lost_examples]
        if examples:
            out += ["", "Lost orders (first few):", "", *[f"- {example}" for example in examples[:10]]]
        samples = [
            f"{t.label}: {sample}"
            for t in self.targets()
            for step in t.steps
            for sample in step.generator.get("error_samples", [])
        ]
        if samples:
            out += ["", "Error samples:", "", *[f"- {sample}" for sample in samples[:10]]]
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser("bench.webhook_load", __doc__)
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="webhooks per second (default 1000)")
    parser.add_argument(
        "--rates", help="comma-separated rates for a sweep, e.g. 250,500,750,1000 (overrides --rate)"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per rate (default 60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds sent before measuring (default 5)")
    parser.add_argument("--duplicates", type=float, default=0.05, help="share of duplicate deliveries (0.05)")
    parser.add_argument("--event-type", choices=events.EVENT_TYPES, default=events.PAYMENT_INTENT_SUCCEEDED)
    parser.add_argument("--connections", type=int, default=256, help="max keep-alive connections (256)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds (10)")
    parser.add_argument("--seed", type=int, default=4, help="seed of the duplicate choice")
    parser.add_argument("--skip-reference", action="store_true", help="do not measure the bare endpoint")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the webhook service (and of the reference), e.g. LOG_LEVEL=WARNING",
    )
    parser.add_argument(
        "--profile-service",
        type=Path,
        metavar="FILE.prof",
        help="run the service under cProfile and write its profile here (slows it down; not for figures)",
    )
    parser.add_argument(
        "--baseline-pythonpath",
        type=Path,
        metavar="DIR",
        help="also drive a second webhook service whose packages come from DIR first (e.g. a copy of "
        "services/webhook from another commit), to compare two versions in one run",
    )
    harness.add_output_options(parser, DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    args.rate_list = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    if any(rate <= 0 for rate in args.rate_list) or args.duration <= 0 or args.warmup < 0:
        parser.error("rates and duration must be positive, warm-up not negative")
    if not 0 <= args.duplicates < 1:
        parser.error("--duplicates is a fraction in [0, 1)")
    return args


def server_env(extra: dict[str, str], **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ZENDIT_", "SMTP_"))}
    env.update(
        {
            "ENVIRONMENT": "sandbox",
            "HTTP_HOST": LOOPBACK,
            "STRIPE_WEBHOOK_SECRETS": SECRET,
            # Nothing on the webhook path calls Stripe or Zendit; unreachable addresses prove it (a call
            # would fail loudly in the log instead of quietly reaching a real or emulated provider).
            "STRIPE_API_BASE": "http://127.0.0.1:9",
            "ZENDIT_API_BASE": "http://127.0.0.1:9/v1",
            "ZENDIT_TOPUP_URL": "http://127.0.0.1:9/v1/wallet/topup",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(settings)
    env.update(extra)
    return env


def service_command(args: argparse.Namespace) -> list[str]:
    profile = ["-m", "cProfile", "-o", str(args.profile_service.resolve())] if args.profile_service else []
    return [sys.executable, *profile, "-m", "webhook"]


async def run(args: argparse.Namespace, command: str) -> Report:
    started = datetime.now(UTC)
    made = harness.Resources()
    run_id, amqp_url = made.run_id, made.amqp_url
    dsn = made.database()
    prefix = made.prefix()
    topology = esim_topology(prefix=prefix)
    extra = dict(item.split("=", 1) for item in args.service_env)
    service_settings = {"DATABASE_URL": dsn, "AMQP_URL": amqp_url, "TOPOLOGY_PREFIX": prefix}

    def service_server(name: str, log_name: str, pythonpath: Path | None = None) -> Server:
        port = free_port()
        env = server_env(extra, **service_settings, HTTP_PORT=str(port))
        if pythonpath is not None:  # its packages shadow the editable installs of this tree
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(pythonpath.resolve()), env.get("PYTHONPATH")])
            )
        return Server(name, service_command(args), env, port, "/readyz", LOGS_DIR / log_name)

    service = Target("webhook service", service_server("webhook service", "webhook-service.log"), True)
    reference = None
    if not args.skip_reference:
        port = free_port()
        bare = Server(
            "bare FastAPI",
            [sys.executable, "-m", "bench.bare_app"],
            server_env(extra, HTTP_PORT=str(port)),
            port,
            "/readyz",
            LOGS_DIR / "bare-app.log",
        )
        reference = Target("bare FastAPI (reference)", bare, False)
    baseline = None
    if args.baseline_pythonpath:
        label = f"baseline (PYTHONPATH={args.baseline_pythonpath})"
        baseline = Target(
            label, service_server(label, "webhook-baseline.log", args.baseline_pythonpath), True
        )
    targets = [t for t in (reference, baseline, service) if t is not None]
    services = [t for t in targets if t.is_service]
    orders_needed = len(services) * sum(
        math.ceil(rate * (args.warmup + args.duration)) + 1 for rate in args.rate_list
    )
    print(f"bench {run_id}: database esim_bench_{run_id}, topology prefix {prefix!r}", flush=True)

    async def cleanup() -> None:
        for target in targets:
            await target.server.stop()
        await made.remove()

    async with harness.cleaned_up(cleanup):
        await migrate(dsn, create_database=True)
        await declare_from_url(amqp_url, topology)
        versions = await harness.server_versions(dsn, amqp_url)
        print(f"creating {orders_needed} orders in pending_payment ...", flush=True)
        await create_orders(dsn, run_id, orders_needed)
        for target in targets:
            target.server.start()
        for target in targets:
            await target.server.wait_ready()
        cursor = 0
        with tempfile.TemporaryDirectory(prefix="esim-bench-") as tmp:
            workdir = Path(tmp)
            for rate in args.rate_list:
                for target in targets:
                    print(f"{target.label} at {rate:.0f}/s ...", flush=True)
                    # The reference gets the same traffic as the service that follows it (its orders
                    # are never looked at); each service pays orders of its own.
                    await settle(targets)
                    step = await drive(target.server, rate, cursor, args, run_id, workdir)
                    target.steps.append(step)
                    if target.is_service:
                        cursor += step.unique_orders
                    s = stats(step, args.warmup, args.duration)
                    print(
                        f"  {s.throughput:.0f}/s, p50 {_ms(s.p50)}, p99 {_ms(s.p99)}, errors {s.errors}",
                        flush=True,
                    )
        # The last step's backlog (requests whose client gave up) may still publish: wait it out, or
        # a late duplicate would escape the count.
        await settle(targets)
        print("checking the database and the funding.order-paid queue ...", flush=True)
        await verify(
            dsn,
            amqp_url,
            topology.queue(ORDER_PAID_QUEUE).name,
            run_id,
            [s for t in services for s in t.steps],
        )
        for target in targets:
            target.kernel_peak_rss = target.server.kernel_peak_rss()
            target.error_lines = target.server.count_log_lines('"level": "ERROR"')
        return Report(args, command, started, versions, service, reference, baseline, extra)


def main(argv: list[str] | None = None) -> int:
    return harness.main("bench.webhook_load", argv, parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
