"""Whole-pipeline benchmark: paid orders through all five services and the emulators, as processes,
with the raw broker and database measured in the same run as the reference.

    uv run --frozen python -m bench.pipeline_load                        # the issue's targets (see below)
    uv run --frozen python -m bench.pipeline_load --rate 20 --duration 10 --burst 100 --no-record
    uv run --frozen python -m bench.pipeline_load --scenarios sustained --profile var/bench/prof
    make bench-pipeline BENCH_ARGS="--duration 30"

One run (method and how to read the figures: bench/README.md, "Whole pipeline"):

1. reference: raw aio-pika publish→consume round trips (persistent, confirmed, quorum queue) and raw
   asyncpg INSERT+UPDATE transactions, each with the services' concurrency (`bench.reference`);
2. sustained: a fresh stack (`esim_sandbox.stack.Stack`: emulators + webhook, funding, provisioning,
   notify, reconcile) on its own database and topology prefix; orders checked out and paid before the
   clock (`bench.pipeline_orders`), then their Stripe events sent open-loop at `--rate` orders/s for
   `--warmup` + `--duration` s (`bench.loadgen`); no added provider latency;
3. burst: another fresh stack; Stripe answers every /v1 call after `--stripe-latency` s and Zendit
   finishes purchases after `--zendit-done` s; one order alone (calibration), then `--burst` orders at once;
4. the outcome of every order from the database, the captured mails, the Zendit emulator's purchases
   and a tap on the event exchange; CPU and peak RSS of every process from /proc, queue depths from the
   RabbitMQ management API;
5. the results printed and written to bench/results/pipeline.md (`--no-record` for trial runs); every
   database, queue and exchange the run made is removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python bench/pipeline_load.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aio_pika
import asyncpg
import httpx

from bench import harness, procstats
from bench.harness import ROOT, Sampler, count_lines, run_loadgen
from bench.loadgen import MEASURE_END, MEASURE_START, STATUS_IO_ERROR, STATUS_TIMEOUT, Plan
from bench.pipeline_measure import (
    STEP_NAMES,
    ProviderBound,
    Spans,
    extra_copies,
    mail_arrival,
    parse_message_id,
    per_second,
    spans,
    zendit_purchases_per_order,
)
from bench.pipeline_orders import (
    EVENT_TYPES,
    OFFERS,
    PaidOrder,
    bodies_file_rows,
    create_paid_orders,
    held_event_bodies,
)
from bench.procstats import CpuSnapshot, cpu_used, postgres_cpu
from bench.stats import Distribution, mb, ms
from esim_common.migrate import migrate
from esim_common.topology import esim_topology
from esim_sandbox.stack import SERVICES, Stack

DEFAULT_RESULTS = ROOT / "bench" / "results" / "pipeline.md"
RUNS_DIR = ROOT / "var" / "bench"
PROFILE_HOOK_DIR = Path(__file__).resolve().parent / "profiling"

# Issue 6's targets.
TARGET_RATE = 50.0
TARGET_DURATION = 60.0
TARGET_P99_SECONDS = 2.0
TARGET_RSS_BYTES = 150 * 1024 * 1024
TARGET_BURST = 500
TARGET_BURST_FACTOR = 1.2
STRIPE_LATENCY_SECONDS = 0.150
ZENDIT_DONE_SECONDS = 2.0
# "Sustained": the mails that arrive inside the window keep up with the orders offered.
SUSTAINED_FRACTION = 0.99

# A wallet that never needs a top-up during a run (USD cents: $10M); "topup" starts it empty.
COVERED_WALLET = 1_000_000_000
# Delays on every Stripe /v1 call: faults of at most 1,000 calls each (stripe_emulator.faults).
STRIPE_FAULTS = 30
STRIPE_FAULT_COUNT = 1000
# The webhook service sheds deliveries beyond WEBHOOK_MAX_IN_FLIGHT (default 64) with a 503 that
# Stripe would retry; the generator never has more requests open than that, so none is shed.
DEFAULT_MAX_IN_FLIGHT = 64
BURST_RATE = 1e6  # requests per second: every request of the burst is scheduled at once
SAMPLE_INTERVAL_SECONDS = 0.1
QUEUE_SAMPLE_SECONDS = 0.5
DRAIN_POLL_SECONDS = 0.25
DRAIN_REPORT_SECONDS = 15.0
SETTLE_TIMEOUT_SECONDS = 30.0
SETTLED_CPU_SHARE = 0.15
IDLE_SECONDS = 3.0
HTTP_TIMEOUT_SECONDS = 30.0

IN_BETWEEN = (
    "paid",
    "funding",
    "awaiting_funds",
    "funded",
    "purchasing",
    "provisioned",
    "refund_pending",
)
DELIVERY_TEMPLATE = "esim_delivery"
STAMPS = ("paid_at", "funded_at", "purchased_at", "qr_stored_at", "emailed_at")


# ------------------------------------------------------------------------------------ processes


class ProcessWatch(Sampler):
    """Peak RSS (sampled) and CPU seconds of named process trees, read from /proc."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peak_rss: dict[str, int] = dict.fromkeys(roots, 0)

    def trees(self) -> dict[str, list[int]]:
        return {name: procstats.descendants(pid) for name, pid in self.roots.items()}

    async def _sample(self) -> None:
        trees = await asyncio.to_thread(self.trees)
        rescan = time.monotonic() + 2.0
        while True:
            if time.monotonic() > rescan:
                trees = await asyncio.to_thread(self.trees)
                rescan = time.monotonic() + 2.0
            for name, pids in trees.items():
                rss = procstats.tree_rss(pids)
                if rss > self.peak_rss[name]:
                    self.peak_rss[name] = rss
            await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)

    def cpu(self) -> dict[str, float]:
        return {name: sum(procstats.cpu_seconds(pids).values()) for name, pids in self.trees().items()}

    def kernel_peak(self) -> dict[str, int]:
        return {name: procstats.tree_hwm(pids) for name, pids in self.trees().items()}


def snapshot(watch: ProcessWatch, database: str) -> CpuSnapshot:
    """CPU so far of the watched processes by name, and of the Postgres processes of `database`."""
    return CpuSnapshot.take(watch.cpu, lambda: postgres_cpu(database))


@dataclass
class CpuWindow:
    """CPU used between two snapshots, as a share of one core."""

    seconds: float
    processes: dict[str, float]
    postgres: float
    rabbitmq: float
    machine_busy: float  # share of all cores

    @classmethod
    def between(cls, a: CpuSnapshot, b: CpuSnapshot) -> CpuWindow:
        wall = max(b.at - a.at, 1e-9)
        total = b.machine_total - a.machine_total
        return cls(
            seconds=wall,
            processes={
                name: (b.processes.get(name, 0.0) - a.processes.get(name, 0.0)) / wall for name in b.processes
            },
            postgres=cpu_used(a.postgres, b.postgres) / wall,
            rabbitmq=cpu_used(a.rabbitmq, b.rabbitmq, new_processes=False) / wall,
            machine_busy=(b.machine_busy - a.machine_busy) / total if total else math.nan,
        )


# --------------------------------------------------------------------------------- the broker


class QueueWatch(Sampler):
    """Backlog of every work queue, live (a passive declare answers with the ready messages), and at
    the end how many messages each queue received (RabbitMQ management API, when reachable)."""

    def __init__(
        self, amqp_url: str, queue_names: list[str], prefix: str, api: str | None, auth: tuple[str, str]
    ):
        self.amqp_url = amqp_url
        self.queue_names = queue_names
        self.prefix = prefix
        self.api = api
        self.auth = auth
        self.peak: dict[str, int] = {}
        self.total: dict[str, int] = {}  # sum over samples, for the mean backlog
        self.samples = 0

    async def _sample(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            while True:
                for name in self.queue_names:
                    queue = await channel.declare_queue(name, passive=True)
                    ready = int(queue.declaration_result.message_count or 0)
                    short = name[len(self.prefix) :]
                    self.peak[short] = max(self.peak.get(short, 0), ready)
                    self.total[short] = self.total.get(short, 0) + ready
                self.samples += 1
                await asyncio.sleep(QUEUE_SAMPLE_SECONDS)
        finally:
            await connection.close()

    def mean(self, name: str) -> float:
        return self.total.get(name, 0) / self.samples if self.samples else math.nan

    async def published(self) -> dict[str, int] | None:
        """Messages each queue under the prefix received (routed publishes, dead-lettered copies)."""
        if not self.api:
            return None
        try:
            async with httpx.AsyncClient(timeout=5.0, auth=self.auth) as client:
                response = await client.get(
                    f"{self.api}/queues/%2F", params={"columns": "name,message_stats"}
                )
                response.raise_for_status()
                found = [q for q in response.json() if str(q.get("name", "")).startswith(self.prefix)]
        except (httpx.HTTPError, ValueError):
            return None
        return {
            q["name"][len(self.prefix) :]: int((q.get("message_stats") or {}).get("publish") or 0)
            for q in found
        }


class Tap:
    """A private queue bound to the event exchange with `#`: every event the services publish, once."""

    def __init__(self, amqp_url: str, exchange: str, queue_name: str) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.queue_name = queue_name
        self.seen: list[tuple[str, str, str]] = []  # routing key, correlation id (order), message id
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        # Classic, exclusive, auto-deleted: it goes with the connection and costs the broker little.
        queue = await channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await queue.bind(self.exchange, routing_key="#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.seen.append(
                (message.routing_key or "", message.correlation_id or "", message.message_id or "")
            )

        await queue.consume(on_message, no_ack=True)

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


# ---------------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    key: str  # "sustained" | "burst"
    orders: int  # orders sent (the burst: plus one calibration order before it)
    rate: float  # orders per second (the burst: all at once)
    warmup: float
    duration: float
    zendit_done: float
    stripe_latency: float
    wallet: str  # "covered" | "topup"
    events: str

    @property
    def burst(self) -> bool:
        return self.key == "burst"

    @property
    def events_per_order(self) -> int:
        return len(EVENT_TYPES[self.events])


@dataclass
class OrderOutcome:
    transaction_id: str
    index: int
    scheduled: float  # epoch seconds: its first event's scheduled send
    acked: bool  # one of its webhooks got a 2xx
    status: str | None = None
    stamps: dict[str, float | None] = field(default_factory=dict)
    mail_at: float | None = None  # the first esim_delivery mail's arrival
    mails: int = 0
    spans: Spans | None = None


@dataclass
class Outcome:
    """What one scenario measured."""

    scenario: Scenario
    start_wall: float = 0.0  # the schedule's origin
    orders: list[OrderOutcome] = field(default_factory=list)
    measured: list[OrderOutcome] = field(default_factory=list)  # in the window (or the burst)
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)
    completed_per_second: float = math.nan
    burst_seconds: float = math.nan
    calibration_seconds: float = math.nan
    calibration_stripe_calls: int | None = None
    lost: list[str] = field(default_factory=list)
    unfinished: int = 0  # of the lost: still on their way through the pipeline when the drain ended
    not_delivered: Counter[str] = field(default_factory=Counter)
    duplicate_mails: int = 0
    other_mails: Counter[str] = field(default_factory=Counter)
    duplicate_purchases: int = 0
    purchases: int = 0
    duplicate_events: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    duplicate_transitions: int = 0
    retry_publishes: int = 0
    dlq_messages: dict[str, int] = field(default_factory=dict)
    queue_peaks: dict[str, int] = field(default_factory=dict)
    queue_means: dict[str, float] = field(default_factory=dict)
    queues_watched: bool = True
    transactions: int | None = None
    stripe_calls: int | None = None
    topups: int = 0
    cpu: CpuWindow | None = None
    idle: CpuWindow | None = None  # the stack doing nothing, just before the load
    # From the first request to the last mail: every order through every stage (CPU per order).
    cpu_all: CpuWindow | None = None
    orders_all: int = 0
    generator_cpu: float = math.nan
    peak_rss: dict[str, int] = field(default_factory=dict)
    kernel_rss: dict[str, int] = field(default_factory=dict)
    error_lines: dict[str, int] = field(default_factory=dict)
    bound: ProviderBound | None = None
    setup_seconds: float = 0.0
    logs_dir: str = ""

    @property
    def completed(self) -> int:
        return sum(1 for order in self.measured if order.mail_at is not None)


def _mgmt_api(amqp_url: str, override: str | None) -> tuple[str | None, tuple[str, str]]:
    parts = urlsplit(amqp_url)
    auth = (parts.username or "guest", parts.password or "guest")
    if override == "none":
        return None, auth
    return (override or f"http://{parts.hostname or '127.0.0.1'}:15672/api"), auth


async def _settle(watch: ProcessWatch, names: list[str]) -> None:
    """Until the stack is idle again (set-up work, a previous step's tail), at most a while."""
    await harness.wait_until_idle(
        watch.cpu,
        lambda before, after: sum(after[n] - before.get(n, 0.0) for n in names),
        share=SETTLED_CPU_SHARE,
        at_most=SETTLE_TIMEOUT_SECONDS,
    )


def _read_mails(mail_dir: Path) -> list[tuple[str, str, float]]:
    """(template, transaction id, arrival) of every captured mail of notify's."""
    found = []
    parser = BytesHeaderParser()
    for path in sorted(mail_dir.glob("*.eml")):
        arrival = mail_arrival(path.name) or path.stat().st_mtime
        with path.open("rb") as f:
            head = b""
            for line in f:  # the headers only: the QR image is in the body
                if line in (b"\r\n", b"\n"):
                    break
                head += line
        parsed = parse_message_id(parser.parsebytes(head).get("Message-ID"))
        template, txn = parsed if parsed else ("unknown", path.name)
        found.append((template, txn, arrival))
    return found


async def _db_orders(dsn: str) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Every order with its status and step stamps (epoch seconds), duplicated transitions, top-ups."""
    conn = await asyncpg.connect(dsn)
    try:
        columns = ", ".join(f"extract(epoch FROM {c})::float8 AS {c}" for c in STAMPS)
        rows = await conn.fetch(f"SELECT transaction_id, status, {columns} FROM esim_purchases")
        doubled = await conn.fetchval(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM order_transitions"
            " GROUP BY transaction_id, from_status, to_status HAVING count(*) > 1) AS d"
        )
        topups = await conn.fetchval("SELECT count(*) FROM wallet_topups")
    finally:
        await conn.close()
    return {r["transaction_id"]: dict(r) for r in rows}, int(doubled), int(topups)


async def _xact_commits(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        # Statistics reach pg_stat_database when a backend is idle, within a second or so.
        return int(
            await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        )
    finally:
        await conn.close()


async def _status_counts(conn: asyncpg.Connection) -> Counter[str]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM esim_purchases GROUP BY status")
    return Counter({r["status"]: r["n"] for r in rows})


def _count_mails(mail_dir: Path) -> int:
    return sum(1 for _ in mail_dir.glob("*.eml"))


async def _drain(dsn: str, mail_dir: Path, expected: int, seconds: float) -> None:
    """Until every paid order has left the in-between states and its mail is in, or `seconds` passed."""
    deadline = time.monotonic() + seconds
    report_at = time.monotonic() + DRAIN_REPORT_SECONDS
    conn = await asyncpg.connect(dsn)
    try:
        while time.monotonic() < deadline:
            counts = await _status_counts(conn)
            in_between = sum(counts[s] for s in IN_BETWEEN)
            mails = await asyncio.to_thread(_count_mails, mail_dir)
            if in_between == 0 and mails >= min(expected, counts["delivered"]):
                return
            if time.monotonic() >= report_at:  # a long backlog: say that it moves
                report_at += DRAIN_REPORT_SECONDS
                print(f"  ... {counts['delivered']} delivered, {in_between} on their way", flush=True)
            await asyncio.sleep(DRAIN_POLL_SECONDS)
    finally:
        await conn.close()


async def _stripe_faults(client: httpx.AsyncClient, stripe: str, latency: float) -> int:
    for _ in range(STRIPE_FAULTS):
        response = await client.post(
            f"{stripe}/_sandbox/faults",
            json={"path": "/v1/*", "delay_seconds": latency, "count": STRIPE_FAULT_COUNT},
        )
        response.raise_for_status()
    return STRIPE_FAULTS * STRIPE_FAULT_COUNT


async def _stripe_faults_left(client: httpx.AsyncClient, stripe: str) -> int:
    response = await client.get(f"{stripe}/_sandbox/faults")
    response.raise_for_status()
    return sum(int(f["remaining"]) for f in response.json()["data"])


class Run(harness.Resources):
    """Everything one benchmark run made, so that all of it can be removed at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.stacks: list[Stack] = []
        self.dir = RUNS_DIR / f"pipeline-{self.run_id}"
        self.extra_env = dict(item.split("=", 1) for item in args.service_env)

    async def cleanup(self) -> None:
        for stack in self.stacks:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stack.stop)
        await self.remove()
        if not self.args.keep_files:
            for stack in self.stacks:  # thousands of mails and QR codes; the logs stay
                shutil.rmtree(stack.mail_dir, ignore_errors=True)
                shutil.rmtree(stack.qr_dir, ignore_errors=True)


async def run_reference(run: Run, kind: str) -> dict[str, Any]:
    args = run.args
    if kind == "pg":
        dsn = run.database("ref")
        admin = await asyncpg.connect(harness.with_database(run.base_dsn, "postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{run.databases[-1]}"')
        finally:
            await admin.close()
        target = [dsn]
    else:
        target = [run.amqp_url, f"bench-{run.run_id}-ref."]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.reference",
        kind,
        *target,
        f"--concurrency={args.ref_concurrency}",
        f"--duration={args.ref_duration}",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    database = run.databases[-1] if kind == "pg" else ""
    before = snapshot(ProcessWatch({}), database)
    out, _ = await process.communicate()
    after = snapshot(ProcessWatch({}), database)
    if process.returncode != 0:
        raise RuntimeError(f"bench.reference {kind} failed (exit {process.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    window = CpuWindow.between(before, after)
    result.update(
        postgres_cpu=window.postgres, rabbitmq_cpu=window.rabbitmq, machine_busy=window.machine_busy
    )
    return result


async def run_scenario(run: Run, scenario: Scenario) -> Outcome:
    args = run.args
    outcome = Outcome(scenario)
    suffix = scenario.key[0]  # s | b
    dsn = run.database(suffix)
    database = run.databases[-1]
    prefix = run.prefix(suffix)
    workdir = run.dir / scenario.key
    extra_env = dict(run.extra_env)
    if args.profile:
        profile_dir = args.profile / scenario.key
        profile_dir.mkdir(parents=True, exist_ok=True)
        extra_env["BENCH_PROFILE_DIR"] = str(profile_dir)
        extra_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROFILE_HOOK_DIR), os.environ.get("PYTHONPATH")])
        )
    started = time.monotonic()
    print(
        f"[{scenario.key}] database {run.databases[-1]}, topology prefix {prefix!r}, logs {workdir}/logs",
        flush=True,
    )
    await migrate(dsn, create_database=True)
    stack = Stack(
        database_url=dsn, amqp_url=run.amqp_url, workdir=workdir, topology_prefix=prefix, extra_env=extra_env
    )
    run.stacks.append(stack)
    await asyncio.to_thread(stack.start)
    outcome.logs_dir = str(workdir / "logs")
    watch = ProcessWatch({name: p.popen.pid for name, p in stack.processes.items() if p.popen is not None})
    watch.start()
    stripe, zendit = stack.url("stripe"), stack.url("zendit")
    topology = esim_topology(prefix=prefix)
    api, auth = _mgmt_api(run.amqp_url, args.management_api)
    queues = QueueWatch(run.amqp_url, [q.name for q in topology.queues], prefix, api, auth)
    tap = Tap(run.amqp_url, topology.exchange, f"{prefix}bench.tap")
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as client:
            wallet = COVERED_WALLET if scenario.wallet == "covered" else 0
            (await client.post(f"{zendit}/_sandbox/wallet", json={"balance": wallet})).raise_for_status()
            (
                await client.post(f"{zendit}/_sandbox/purchase_delay", json={"seconds": scenario.zendit_done})
            ).raise_for_status()
            (await client.post(f"{stripe}/_sandbox/webhook_delivery", json={"hold": True})).raise_for_status()
            secret = (await client.get(f"{stripe}/_sandbox/webhook_endpoints")).json()["secret"]
            count = scenario.orders + (1 if scenario.burst else 0)
            print(f"[{scenario.key}] checking out and paying {count} orders (events held) ...", flush=True)
            paid = await create_paid_orders(stack.url("webhook"), stripe, count, run.run_id)
            bodies = await held_event_bodies(stripe, paid, scenario.events)
            # Back to normal delivery for anything later (refunds, Issuing); the payments stay held.
            (await client.delete(f"{stripe}/_sandbox/webhook_delivery")).raise_for_status()
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("VACUUM ANALYZE")
            finally:
                await conn.close()
            outcome.setup_seconds = time.monotonic() - started
            await tap.start()
            queues.start()
            await _settle(watch, list(watch.roots))
            idle_from = snapshot(watch, database)
            await asyncio.sleep(IDLE_SECONDS)
            outcome.idle = CpuWindow.between(idle_from, snapshot(watch, database))
            if args.profile:  # profiles from here on: the load, not the start-up and set-up
                for name in SERVICES:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(watch.roots[name], signal.SIGUSR1)
            armed = (
                await _stripe_faults(client, stripe, scenario.stripe_latency)
                if scenario.stripe_latency
                else 0
            )
            max_in_flight = int(extra_env.get("WEBHOOK_MAX_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT))
            with tempfile.TemporaryDirectory(prefix="esim-bench-") as tmp:
                tmpdir = Path(tmp)

                def plan(
                    name: str, orders: list[PaidOrder], rate: float, warmup: float, duration: float
                ) -> Plan:
                    path = tmpdir / f"bodies-{name}.json"
                    path.write_text(json.dumps(bodies_file_rows(orders, bodies)))
                    return Plan(
                        host="127.0.0.1",
                        port=stack.ports["webhook"],
                        path="/api/webhooks/stripe",
                        run_id=run.run_id,
                        first_index=0,
                        rate=rate,
                        warmup=warmup,
                        duration=duration,
                        duplicate_ratio=0.0,
                        seed=0,
                        event_type=EVENT_TYPES[scenario.events][0],
                        secret=secret,
                        max_connections=max_in_flight,
                        initial_connections=min(16, max_in_flight),
                        timeout=args.timeout,
                        bodies_path=str(path),
                    )

                snapshots: dict[str, CpuSnapshot] = {}
                commits_before = await _xact_commits(dsn)
                results: list[dict[str, Any]] = []
                if scenario.burst:
                    # One order alone first: its time is what the providers' latencies cost one order here.
                    mails_before = 0
                    left_before = await _stripe_faults_left(client, stripe) if armed else 0
                    calibration = await run_loadgen(
                        plan(
                            "calibration", paid[:1], BURST_RATE, 0.0, scenario.events_per_order / BURST_RATE
                        ),
                        tmpdir,
                        "calibration",
                        lambda marker: None,
                    )
                    results.append(calibration)
                    await _drain(dsn, stack.mail_dir, 1, args.drain_timeout)
                    first = _read_mails(stack.mail_dir)
                    if first:
                        outcome.calibration_seconds = first[0][2] - calibration["start_wall"]
                    if armed:
                        outcome.calibration_stripe_calls = left_before - await _stripe_faults_left(
                            client, stripe
                        )
                    mails_before = len(first)
                    await _settle(watch, list(watch.roots))
                    burst_orders = paid[1:]
                    left_before = await _stripe_faults_left(client, stripe) if armed else 0
                    print(f"[burst] {len(burst_orders)} orders at once ...", flush=True)
                    snapshots[MEASURE_START] = snapshot(watch, database)
                    result = await run_loadgen(
                        plan(
                            "burst",
                            burst_orders,
                            BURST_RATE,
                            0.0,
                            len(burst_orders) * scenario.events_per_order / BURST_RATE,
                        ),
                        tmpdir,
                        "burst",
                        lambda marker: None,
                    )
                    results.append(result)
                    await _drain(dsn, stack.mail_dir, mails_before + len(burst_orders), args.drain_timeout)
                    snapshots[MEASURE_END] = snapshot(watch, database)
                    outcome.cpu_all = CpuWindow.between(snapshots[MEASURE_START], snapshots[MEASURE_END])
                    outcome.orders_all = len(burst_orders)
                    if armed:
                        outcome.stripe_calls = left_before - await _stripe_faults_left(client, stripe)
                    measured_indexes = {order.index for order in burst_orders}
                else:
                    print(
                        f"[sustained] {scenario.rate:g} orders/s for {scenario.warmup:g} s warm-up + "
                        f"{scenario.duration:g} s ...",
                        flush=True,
                    )
                    load_start = snapshot(watch, database)
                    result = await run_loadgen(
                        plan(
                            "sustained",
                            paid,
                            scenario.rate * scenario.events_per_order,
                            scenario.warmup,
                            scenario.duration,
                        ),
                        tmpdir,
                        "sustained",
                        lambda marker: snapshots.__setitem__(marker, snapshot(watch, database)),
                    )
                    results.append(result)
                    print("[sustained] sent; waiting for the last orders ...", flush=True)
                    await _drain(dsn, stack.mail_dir, len(paid), args.drain_timeout)
                    outcome.cpu_all = CpuWindow.between(load_start, snapshot(watch, database))
                    outcome.orders_all = len(paid)
                    measured_indexes = None
                # Late duplicates (a redelivery, a second publish) would come now.
                await _settle(watch, list(watch.roots))
                await asyncio.sleep(1.0)
                outcome.transactions = await _xact_commits(dsn) - commits_before
            outcome.cpu = CpuWindow.between(snapshots[MEASURE_START], snapshots[MEASURE_END])
            main = results[-1]
            outcome.start_wall = main["start_wall"]
            outcome.generator = {k: v for k, v in main.items() if k != "requests"}
            outcome.generator_cpu = (
                main["cpu_seconds"] / main["wall_seconds"] if main.get("wall_seconds") else math.nan
            )
            outcome.queue_peaks = dict(queues.peak)
            outcome.queue_means = {name: queues.mean(name) for name in queues.peak}
            published = await queues.published() or {}
            outcome.queues_watched = bool(published)
            outcome.retry_publishes = sum(n for name, n in published.items() if ".retry." in name)
            outcome.dlq_messages = {name: n for name, n in published.items() if name.endswith(".dlq") and n}
            state = (await client.get(f"{zendit}/_sandbox/state")).json()
        await tap.stop()
        await queues.stop()
        outcome.kernel_rss = watch.kernel_peak()
        outcome.peak_rss = dict(watch.peak_rss)
        await _collect(outcome, dsn, stack, paid, results, measured_indexes, state, tap)
        for name, process in stack.processes.items():
            outcome.error_lines[name] = count_lines(process.log_path, '"level": "ERROR"')
        if scenario.burst:
            outcome.bound = ProviderBound.for_wallet(
                scenario.wallet,
                zendit_done_seconds=scenario.zendit_done,
                stripe_latency=scenario.stripe_latency,
            )
        return outcome
    finally:
        await queues.stop()
        await tap.stop()
        await watch.stop()
        await asyncio.to_thread(stack.stop)


async def _collect(
    outcome: Outcome,
    dsn: str,
    stack: Stack,
    paid: list[PaidOrder],
    results: list[dict[str, Any]],
    measured_indexes: set[int] | None,
    zendit_state: dict[str, Any],
    tap: Tap,
) -> None:
    """Every order's fate: webhook answers, database, mails, Zendit purchases, published events."""
    scenario = outcome.scenario
    by_index = {order.index: order for order in paid}
    first_sent: dict[int, float] = {}
    acked: set[int] = set()
    for result in results:
        for index, _dup, offset, _latency, status, _lag in result["requests"]:
            index = int(index)
            at = result["start_wall"] + offset
            first_sent[index] = min(first_sent.get(index, at), at)
            outcome.requests += 1
            if 200 <= status < 300:
                acked.add(index)
            elif status == STATUS_TIMEOUT:
                outcome.errors["timeout"] += 1
            elif status == STATUS_IO_ERROR:
                outcome.errors["connection error"] += 1
            else:
                outcome.errors[str(int(status))] += 1
        outcome.error_samples += result.get("error_samples", [])
    rows, outcome.duplicate_transitions, outcome.topups = await _db_orders(dsn)
    mails = _read_mails(stack.mail_dir)
    delivery_mails: dict[str, list[float]] = {}
    for template, txn, arrival in mails:
        if template == DELIVERY_TEMPLATE:
            delivery_mails.setdefault(txn, []).append(arrival)
        else:
            outcome.other_mails[template] += 1
    outcome.duplicate_mails = extra_copies(len(v) for v in delivery_mails.values())
    purchases = zendit_purchases_per_order(zendit_state.get("purchases", {}))
    outcome.purchases = sum(purchases.values())
    outcome.duplicate_purchases = extra_copies(purchases.values())
    per_event = Counter((rk, txn) for rk, txn, _ in tap.seen)
    outcome.events = Counter(rk for rk, _, _ in tap.seen)
    for (rk, _txn), n in per_event.items():
        if rk.startswith("order.") and n > 1:
            outcome.duplicate_events[rk] += n - 1
    for index, sent_at in sorted(first_sent.items()):
        txn = by_index[index].transaction_id
        row = rows.get(txn, {})
        arrivals = sorted(delivery_mails.get(txn, []))
        order = OrderOutcome(
            transaction_id=txn,
            index=index,
            scheduled=sent_at,
            acked=index in acked,
            status=row.get("status"),
            stamps={c: row.get(c) for c in STAMPS},
            mail_at=arrivals[0] if arrivals else None,
            mails=len(arrivals),
        )
        order.spans = spans(order.scheduled, order.stamps, order.mail_at)
        outcome.orders.append(order)
        if order.acked and order.mail_at is None:
            outcome.lost.append(f"{txn}: status {order.status}")
            outcome.unfinished += order.status in IN_BETWEEN
        if order.acked and order.status != "delivered":
            outcome.not_delivered[str(order.status)] += 1
    if scenario.burst:
        outcome.measured = [o for o in outcome.orders if measured_indexes and o.index in measured_indexes]
        done = [o.mail_at for o in outcome.measured if o.mail_at is not None]
        if done and len(done) == len(outcome.measured):
            outcome.burst_seconds = max(done) - outcome.start_wall
        outcome.completed_per_second = len(done) / outcome.burst_seconds if done else math.nan
    else:
        begin = outcome.start_wall + scenario.warmup
        end = begin + scenario.duration
        outcome.measured = [o for o in outcome.orders if begin <= o.scheduled < end]
        all_mails = [arrival for arrivals in delivery_mails.values() for arrival in arrivals[:1]]
        outcome.completed_per_second = per_second(all_mails, begin, end)


# ------------------------------------------------------------------------------------ report


def _dist_row(label: str, values: list[float]) -> str:
    d = Distribution.of(values)
    return f"| {label} | {d.count} | {ms(d.p50)} | {ms(d.p90)} | {ms(d.p99)} | {ms(d.max)} | {ms(d.mean)} |"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


@dataclass
class Report(harness.RunReport):
    reference: dict[str, dict[str, Any]]
    outcomes: dict[str, Outcome]

    def render(self) -> str:
        a = self.args
        out = [
            "# Whole-pipeline benchmark: latest run",
            "",
            "Written by `bench/pipeline_load.py` (method and how to read it: "
            "[bench/README.md](../README.md#whole-pipeline-benchmark-benchpipeline_loadpy)). "
            "Each run replaces this file; `git log -p bench/results/pipeline.md` keeps the earlier ones.",
            "",
            *self.header_lines(
                "; everything (PostgreSQL, RabbitMQ, the emulators, the five services, the generator) on "
                "these cores"
            ),
            "- **orders**: real checkouts (`POST /api/create-checkout-session`, offers "
            f"{', '.join(OFFERS)} in turn) paid in the Stripe emulator before the clock starts, their "
            "events held; the benchmark "
            f"sends those events ({' then '.join(EVENT_TYPES[a.events])}, signed at send time) open-loop, "
            f"at most {DEFAULT_MAX_IN_FLIGHT} requests open (the service's `WEBHOOK_MAX_IN_FLIGHT`)",
            "- **services**: `python -m <service>` each, default settings"
            + (
                ", with " + ", ".join(f"`{k}={v}`" for k, v in sorted(self._extra().items()))
                if self._extra()
                else ""
            )
            + (" — **under cProfile (figures not comparable)**" if a.profile else ""),
        ]
        verdicts = self._verdicts()
        if verdicts:
            out += ["", "## Verdict", "", "| target | measured | verdict |", "|---|---|---|", *verdicts]
        if "sustained" in self.outcomes:
            out += self._sustained(self.outcomes["sustained"])
        if "burst" in self.outcomes:
            out += self._burst(self.outcomes["burst"])
        if self.reference:
            out += self._reference()
        return "\n".join(out) + "\n"

    def _extra(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.args.service_env)

    def _verdicts(self) -> list[str]:
        rows = []
        s = self.outcomes.get("sustained")
        if s is not None:
            sc = s.scenario
            sustained_met = (
                sc.rate >= TARGET_RATE
                and sc.duration >= TARGET_DURATION
                and s.completed_per_second >= SUSTAINED_FRACTION * sc.rate
            )
            to_mail = Distribution.of(
                [o.spans.to_mail for o in s.measured if o.spans and o.spans.to_mail is not None]
            )
            rows.append(
                f"| ≥ {TARGET_RATE:g} orders/s sustained for {TARGET_DURATION:g} s "
                f"(offered {sc.rate:g}/s for "
                f"{sc.duration:g} s) | {s.completed_per_second:.1f} orders/s emailed inside the window | "
                f"{_verdict(sustained_met)} |"
            )
            rows.append(
                f"| p99 webhook → email < {TARGET_P99_SECONDS:g} s | p99 {ms(to_mail.p99)} "
                f"(p50 {ms(to_mail.p50)}) | "
                f"{_verdict(to_mail.p99 < TARGET_P99_SECONDS and not s.lost)} |"
            )
        for o in self.outcomes.values():
            dup = o.duplicate_mails + o.duplicate_purchases + sum(o.duplicate_events.values())
            rows.append(
                f"| {o.scenario.key}: 0 lost, 0 duplicated | {len(o.lost)} lost, {dup} duplicated | "
                f"{_verdict(not o.lost and not dup and not o.errors)} |"
            )
        b = self.outcomes.get("burst")
        if b is not None and b.bound is not None:
            limit = TARGET_BURST_FACTOR * b.bound.seconds
            ratio = b.burst_seconds / b.bound.seconds if b.bound.seconds else math.nan
            rows.append(
                f"| burst of {b.scenario.orders} within {TARGET_BURST_FACTOR:g} × provider-bound "
                f"({TARGET_BURST_FACTOR:g} × {b.bound.seconds:.2f} s = {limit:.2f} s) | all emailed after "
                f"{ms(b.burst_seconds)} = **{ratio:.1f}×** the provider-bound time | "
                f"{_verdict(b.burst_seconds <= limit and b.scenario.orders >= TARGET_BURST)} |"
            )
        peaks: dict[str, int] = {}
        for o in self.outcomes.values():
            for name, rss in o.peak_rss.items():
                if name in SERVICES:
                    peaks[name] = max(peaks.get(name, 0), rss)
        if peaks:
            worst = max(peaks, key=lambda n: peaks[n])
            rows.append(
                f"| peak RSS < {mb(TARGET_RSS_BYTES)} per service | highest: {worst} {mb(peaks[worst])} "
                f"({', '.join(f'{n} {mb(v)}' for n, v in peaks.items())}) | "
                f"{_verdict(peaks[worst] < TARGET_RSS_BYTES)} |"
            )
        return rows

    def _steps(self, o: Outcome) -> list[str]:
        out = [
            "",
            "Per step, from the order's timestamps (`paid_at` … `emailed_at`, stamped by Postgres `now()` "
            "in the transaction that moved it) and the mail's arrival at the SMTP capture; every order "
            "measured:",
            "",
            "| step | orders | p50 | p90 | p99 | max | mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label in STEP_NAMES.items():
            values = [
                getattr(x.spans, key) for x in o.measured if x.spans and getattr(x.spans, key) is not None
            ]
            out.append(_dist_row(label, values))
        return out

    def _outcome_lines(self, o: Outcome) -> list[str]:
        events = ", ".join(f"{rk} {n}" for rk, n in sorted(o.events.items()))
        lines = [
            f"- **orders sent**: {len(o.orders)} ({o.requests} webhook requests); webhook errors: "
            + (", ".join(f"{k}: {v}" for k, v in sorted(o.errors.items())) if o.errors else "none"),
            f"- **lost** (webhook answered 2xx, no eSIM mail within the drain timeout, "
            f"{self.args.drain_timeout:g} s after the last request): {len(o.lost)}"
            + (
                f", of which {o.unfinished} were still on their way (a backlog, not a loss of data) and "
                f"{len(o.lost) - o.unfinished} had stopped — e.g. {'; '.join(o.lost[:3])}"
                if o.lost
                else ""
            ),
            "- **not delivered** (status when the run ended): "
            + (", ".join(f"{k} {v}" for k, v in sorted(o.not_delivered.items())) or "none"),
            f"- **duplicated**: eSIM mails beyond one per order {o.duplicate_mails}; Zendit purchases "
            f"beyond one per order {o.duplicate_purchases} ({o.purchases} purchases); order.* events beyond "
            "one per order "
            f"and type {sum(o.duplicate_events.values())}"
            + (
                f" ({', '.join(f'{k} {v}' for k, v in sorted(o.duplicate_events.items()))})"
                if o.duplicate_events
                else ""
            )
            + f"; repeated state transitions {o.duplicate_transitions}",
            "- **other mails**: "
            + (", ".join(f"{k} {v}" for k, v in sorted(o.other_mails.items())) or "none")
            + f"; wallet top-ups: {o.topups}",
            f"- **events published** (tap on the exchange): {events or 'none seen'}; "
            "copies to retry/delay tiers: "
            f"{o.retry_publishes if o.queues_watched else 'n/a'}"
            + (f"; dead-lettered: {o.dlq_messages}" if o.dlq_messages else ""),
            "- **ERROR log lines**: " + ", ".join(f"{n} {c}" for n, c in o.error_lines.items()),
        ]
        return lines

    def _cpu(self, o: Outcome) -> list[str]:
        if o.cpu is None:
            return []
        cores = os.cpu_count() or 1
        whole = o.cpu_all or o.cpu
        # The broker is shared with whatever else runs here: count what it did beyond its idle level.
        rabbitmq_ours = max(0.0, whole.rabbitmq - (o.idle.rabbitmq if o.idle else 0.0))
        per_order = whole.seconds / o.orders_all * 1000 if o.orders_all else math.nan

        def row(
            label: str, share: float, rss: str = "", idle: float = math.nan, total: float = math.nan
        ) -> str:
            idle_text = "" if math.isnan(idle) else f"{idle:.1%}"
            return f"| {label} | {share:.0%} | {total * per_order:.1f} ms | {rss} | {idle_text} |"

        out = [
            "",
            f"CPU as a share of one core over the measured window ({o.cpu.seconds:.1f} s; the machine has "
            f"{cores} cores = {100 * cores} %); CPU per order: from the first request to the last mail "
            f"({whole.seconds:.1f} s, {o.orders_all} orders, so every order went through every stage); "
            "peak RSS (sampled every 100 ms; the kernel's VmHWM in brackets); CPU of the idle stack just "
            "before the load:",
            "",
            "| process | CPU | CPU per order | peak RSS | CPU when idle |",
            "|---|---|---|---|---|",
        ]
        idle = o.idle
        for name, share in o.cpu.processes.items():
            label = f"{name} (emulators + SMTP capture)" if name == "sandbox" else name
            rss = f"{mb(o.peak_rss.get(name, 0))} ({mb(o.kernel_rss.get(name, 0))})"
            idle_share = idle.processes.get(name, math.nan) if idle else math.nan
            out.append(row(label, share, rss, idle_share, whole.processes.get(name, math.nan)))
        out.append(
            row(
                "PostgreSQL (this database's backends + the server's own processes)",
                o.cpu.postgres,
                idle=idle.postgres if idle else math.nan,
                total=whole.postgres,
            )
        )
        out.append(
            row(
                "RabbitMQ (the whole broker; per order: above its idle level)",
                o.cpu.rabbitmq,
                idle=idle.rabbitmq if idle else math.nan,
                total=rabbitmq_ours,
            )
        )
        ours_all = sum(whole.processes.values()) + whole.postgres + rabbitmq_ours
        generator = o.generator_cpu if not math.isnan(o.generator_cpu) else 0.0
        ours = sum(o.cpu.processes.values()) + o.cpu.postgres + o.cpu.rabbitmq + generator
        out.append(f"| load generator | {generator:.0%} | | | |")
        out.append(
            f"| everything else on the machine (other users, kernel) | "
            f"{max(0.0, o.cpu.machine_busy * cores - ours):.0%} | | | |"
        )
        out.append(
            f"| **whole machine busy** | {o.cpu.machine_busy * cores:.0%} of {100 * cores} % | "
            f"ours: **{ours_all * per_order:.0f} ms** | | |"
        )
        counts = []
        if o.transactions is not None and o.completed:
            counts.append(f"{o.transactions / max(len(o.orders), 1):.1f} database transactions (commits)")
        messages = sum(o.events.values()) + o.retry_publishes
        if messages and o.orders:
            counts.append(f"{messages / len(o.orders):.1f} broker messages (events + retry/delay copies)")
        if counts:
            out += ["", "Per order sent: " + ", ".join(counts) + "."]
        busiest = sorted(((n, v) for n, v in o.queue_peaks.items() if v), key=lambda x: -x[1])
        out += [
            "",
            f"Backlog of the work queues (ready messages, sampled every {QUEUE_SAMPLE_SECONDS:g} s from the "
            "start of the load to the last mail; a consumer holds up to its prefetch, 16, unacknowledged "
            "besides): "
            + (
                ", ".join(f"`{n}` peak {v}, mean {o.queue_means.get(n, math.nan):.1f}" for n, v in busiest)
                or "never above 0"
            ),
        ]
        if not o.queues_watched:
            out += ["", "Retry-tier copies: the RabbitMQ management API was not reachable (n/a)."]
        return out

    def _sustained(self, o: Outcome) -> list[str]:
        sc = o.scenario
        to_mail = [x.spans.to_mail for x in o.measured if x.spans and x.spans.to_mail is not None]
        d = Distribution.of(to_mail)
        out = [
            "",
            "## Sustained load",
            "",
            f"{sc.rate:g} orders/s offered for {sc.warmup:g} s warm-up + {sc.duration:g} s measured; "
            "no added provider latency (Stripe answers at once; Zendit purchases are DONE after "
            f"{sc.zendit_done:g} s); "
            + (
                f"Zendit wallet at {COVERED_WALLET / 100:,.0f} USD, so **no top-up is needed**"
                if sc.wallet == "covered"
                else "Zendit wallet empty at the start: top-ups through single-use Issuing cards"
            )
            + f". Set-up (stack start, {len(o.orders)} checkouts and payments): {o.setup_seconds:.0f} s.",
            "",
            f"- **completed**: {o.completed_per_second:.1f} orders/s (eSIM mails that arrived inside the "
            f"measured window, per second); {o.completed} of the {len(o.measured)} orders sent in the window "
            "were emailed by the end",
            f"- **time to eSIM** (first webhook's scheduled send → the mail at the SMTP capture): p50 "
            f"{ms(d.p50)}, p90 {ms(d.p90)}, p99 {ms(d.p99)}, max {ms(d.max)}",
            *self._outcome_lines(o),
            f"- **generator**: launch lag p99 {ms(o.generator.get('schedule_lag_p99', math.nan))}, max "
            f"{ms(o.generator.get('schedule_lag_max', math.nan))}; logs: `{o.logs_dir}`",
        ]
        out += self._steps(o)
        out += self._cpu(o)
        return out

    def _burst(self, o: Outcome) -> list[str]:
        sc = o.scenario
        bound = o.bound
        out = [
            "",
            "## Burst with realistic provider latency",
            "",
            f"Every Stripe `/v1` call answers after {sc.stripe_latency * 1000:.0f} ms (emulator faults with "
            f"`delay_seconds` on `/v1/*`); Zendit purchases are DONE {sc.zendit_done:g} s after they are "
            "placed; "
            + (
                "the wallet covers every order (no top-up)."
                if sc.wallet == "covered"
                else "the wallet starts empty (top-ups through single-use Issuing cards)."
            )
            + f" One order alone first (calibration), then {sc.orders} orders whose events are all "
            "scheduled at the same instant.",
            "",
        ]
        if bound is not None:
            ratio = o.burst_seconds / bound.seconds if bound.seconds else math.nan
            out += [
                f"- **provider-bound time** (one order through the providers' latencies alone, unlimited "
                f"parallelism; the calls are counted in `bench/pipeline_measure.py`): {bound.formula()}",
                f"- **one order alone**: {ms(o.calibration_seconds)} from its webhook to its mail"
                + (
                    f" ({o.calibration_stripe_calls} Stripe calls meanwhile)"
                    if o.calibration_stripe_calls is not None
                    else ""
                ),
                f"- **the burst**: all {sc.orders} emailed {ms(o.burst_seconds)} after the burst started = "
                f"**{ratio:.1f}×** the provider-bound time (target ≤ {TARGET_BURST_FACTOR:g}×), "
                f"{o.completed_per_second:.0f} orders/s; Stripe calls during the burst: "
                f"{o.stripe_calls if o.stripe_calls is not None else 'n/a'}",
            ]
        to_mail = [x.spans.to_mail for x in o.measured if x.spans and x.spans.to_mail is not None]
        d = Distribution.of(to_mail)
        out.append(
            f"- **time to eSIM** in the burst: p50 {ms(d.p50)}, p90 {ms(d.p90)}, p99 {ms(d.p99)}, "
            f"max {ms(d.max)}"
        )
        out += self._outcome_lines(o)
        out += self._steps(o)
        out += self._cpu(o)
        return out

    def _reference(self) -> list[str]:
        a = self.args
        amqp, pg = self.reference.get("amqp"), self.reference.get("pg")
        out = [
            "",
            "## Reference: the raw parts, same run",
            "",
            f"`bench.reference`, {a.ref_concurrency} concurrent workers (the services' prefetch; the "
            "database pool at most 10 connections, like a service's), "
            f"{a.ref_duration:g} s each, alone on the machine (closed loop: capacity):",
            "",
            "| part | operations/s | p50 | p99 | its own CPU | PostgreSQL CPU | RabbitMQ CPU |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, r in (
            ("aio-pika publish (persistent, confirmed, mandatory) → quorum queue → consume + ack", amqp),
            ("asyncpg transaction: INSERT + UPDATE, COMMIT", pg),
        ):
            if r:
                own = r["cpu_seconds"] / r["wall_seconds"] if r.get("wall_seconds") else math.nan
                out.append(
                    f"| {label} | {r['per_second']:.0f} | {ms(r['p50'])} | {ms(r['p99'])} | {own:.0%} | "
                    f"{r['postgres_cpu']:.0%} | {r['rabbitmq_cpu']:.0%} |"
                )
        s = self.outcomes.get("sustained")
        if s is not None and s.orders and s.completed_per_second > 0:
            messages = (sum(s.events.values()) + s.retry_publishes) / len(s.orders)
            transactions = (s.transactions or 0) / len(s.orders)
            out += ["", "The pipeline as a ratio of the raw parts (sustained scenario):", ""]
            if amqp and messages:
                ceiling = amqp["per_second"] / messages
                out.append(
                    f"- broker: {messages:.1f} messages per order → the raw round trips would carry "
                    f"{ceiling:.0f} orders/s; the pipeline completed {s.completed_per_second:.1f}/s = "
                    f"{s.completed_per_second / ceiling:.0%} of that "
                    f"({s.completed_per_second * messages:.0f} messages/s = "
                    f"{s.completed_per_second * messages / amqp['per_second']:.0%} of the raw rate)"
                )
            if pg and transactions:
                ceiling = pg["per_second"] / transactions
                out.append(
                    f"- database: {transactions:.1f} transactions per order → the raw transactions would "
                    "carry "
                    f"{ceiling:.0f} orders/s; the pipeline completed {s.completed_per_second:.1f}/s = "
                    f"{s.completed_per_second / ceiling:.0%} of that"
                )
            out.append(
                "- the raw figures are each measured alone on an otherwise idle machine; in the pipeline the "
                "broker, the database, the emulators and five Python services share the same two cores"
            )
        return out


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser("bench.pipeline_load", __doc__)
    parser.add_argument("--scenarios", default="sustained,burst", help="sustained, burst or both (default)")
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="sustained: orders per second (50)")
    parser.add_argument("--duration", type=float, default=TARGET_DURATION, help="sustained: measured s (60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="sustained: seconds sent before (5)")
    parser.add_argument(
        "--sustained-zendit-done", type=float, default=0.0, help="sustained: Zendit purchase time, s (0)"
    )
    parser.add_argument("--burst", type=int, default=TARGET_BURST, help="burst: orders at once (500)")
    parser.add_argument(
        "--stripe-latency", type=float, default=STRIPE_LATENCY_SECONDS, help="burst: s (0.15)"
    )
    parser.add_argument("--zendit-done", type=float, default=ZENDIT_DONE_SECONDS, help="burst: s (2.0)")
    parser.add_argument(
        "--wallet",
        choices=("covered", "topup"),
        default="covered",
        help="covered: no top-up needed (default); topup: the wallet starts empty",
    )
    parser.add_argument("--events", choices=tuple(EVENT_TYPES), default="both", help="events per order")
    parser.add_argument(
        "--drain-timeout", type=float, default=180.0, help="s to wait for the last mails after sending (180)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per webhook request, s (30)")
    parser.add_argument("--ref-concurrency", type=int, default=16)
    parser.add_argument("--ref-duration", type=float, default=10.0)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--management-api", help="RabbitMQ management API base (default http://<amqp host>:15672/api; none)"
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra settings of every service",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="run the services under cProfile, .prof files to DIR"
    )
    parser.add_argument("--keep-files", action="store_true", help="keep the captured mails and QR codes")
    harness.add_output_options(parser, DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not set(args.scenario_list) <= {"sustained", "burst"} or not args.scenario_list:
        parser.error("--scenarios takes sustained, burst or both")
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.burst < 1:
        parser.error("rate, duration and burst must be positive, warm-up not negative")
    return args


async def run(args: argparse.Namespace, command: str) -> Report:
    started = datetime.now(UTC)
    bench = Run(args)
    print(
        f"bench {bench.run_id}: databases esim_bench_{bench.run_id}_*, prefixes bench-{bench.run_id}-*",
        flush=True,
    )
    reference: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, Outcome] = {}
    async with harness.cleaned_up(bench.cleanup):
        versions = await harness.server_versions(bench.base_dsn, bench.amqp_url)
        if not args.skip_reference:
            for kind in ("amqp", "pg"):
                print(f"reference: {kind} ...", flush=True)
                reference[kind] = await run_reference(bench, kind)
                print(
                    f"  {reference[kind]['per_second']:.0f}/s, p99 {ms(reference[kind]['p99'])}", flush=True
                )
        for key in args.scenario_list:
            burst = key == "burst"
            scenario = Scenario(
                key=key,
                orders=args.burst if burst else math.ceil(args.rate * (args.warmup + args.duration)),
                rate=math.inf if burst else args.rate,
                warmup=0.0 if burst else args.warmup,
                duration=0.0 if burst else args.duration,
                zendit_done=args.zendit_done if burst else args.sustained_zendit_done,
                stripe_latency=args.stripe_latency if burst else 0.0,
                wallet=args.wallet,
                events=args.events,
            )
            outcomes[key] = await run_scenario(bench, scenario)
            o = outcomes[key]
            print(
                f"[{key}] {len(o.lost)} lost, completed {o.completed_per_second:.1f}/s"
                + (f", burst {ms(o.burst_seconds)}" if burst else ""),
                flush=True,
            )
        return Report(args, command, started, versions, reference, outcomes)


def main(argv: list[str] | None = None) -> int:
    return harness.main("bench.pipeline_load", argv, parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
