"""Open-loop, fixed-rate load generator for signed Stripe webhooks (runs in its own process).

    python -m bench.loadgen PLAN.json RESULT.json

Request k is *scheduled* at `start + k / rate`, whatever happened to the requests before it, and its
latency is measured from that scheduled time to the end of its response. A slow server therefore
shows up as latency (the requests it delays wait for a connection or in the socket) instead of
quietly lowering the offered rate — the "coordinated omission" a closed-loop client (send, wait,
send) suffers from.

The client is deliberately lean: raw asyncio streams, HTTP/1.1 keep-alive over a pool of connections
(opened ahead, grown on demand up to `max_connections`), one small header block per request, and event
bodies built and pretty-printed before the clock starts; only the HMAC signature is computed at send
time (duplicates are re-signed like Stripe's retries). The process reports its own CPU time so the
orchestrator can tell whether the generator, rather than the server, was the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from bench.events import event_body
from esim_sandbox.stripe_emulator.webhooks import sign

STATUS_TIMEOUT = 0  # no complete response within `timeout`
STATUS_IO_ERROR = -1  # connection refused/reset, or a response we could not parse
# uvicorn closes a keep-alive connection idle for 5 s; a request written on it as it closes fails, so
# connections idle this long are replaced rather than reused.
MAX_IDLE_SECONDS = 4.0
# Duplicates re-send one of the last DUPLICATE_WINDOW unique events: near in time, so some of them race
# the original delivery (the hard case), as Stripe's concurrent retries do.
DUPLICATE_WINDOW = 200
MEASURE_START = "measure-start"
MEASURE_END = "measure-end"


@dataclass
class Plan:
    host: str
    port: int
    path: str
    run_id: str
    first_index: int  # orders first_index, first_index + 1, ... are paid, in order
    rate: float  # requests per second, duplicates included
    warmup: float  # seconds sent before the measured window (not in the latency figures)
    duration: float  # the measured window, seconds
    duplicate_ratio: float
    seed: int
    event_type: str
    secret: str
    max_connections: int = 512
    initial_connections: int = 32
    timeout: float = 10.0
    # Instead of building event `first_index + i` from the run id: send these bodies, in this order.
    # A JSON file of [[order index, body text], ...] (the pipeline benchmark sends the events the Stripe
    # emulator recorded for real Checkout payments).
    bodies_path: str | None = None

    @property
    def total_requests(self) -> int:
        return round(self.rate * (self.warmup + self.duration))


@dataclass
class Result:
    # One row per request, in schedule order:
    # [order index, duplicate (0/1), scheduled offset s, latency s (-1 if none), status, send lag s]
    requests: list[list[float]] = field(default_factory=list)
    unique_orders: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    connections_opened: int = 0
    max_in_flight: int = 0
    error_samples: list[str] = field(default_factory=list)
    schedule_lag_p99: float = 0.0  # how late the generator itself launched requests
    schedule_lag_max: float = 0.0
    # time.time() at the schedule's origin: request k's scheduled wall-clock time is start_wall + row[2]
    # (other processes' timestamps, e.g. a mail's arrival, can then be compared with it).
    start_wall: float = 0.0


class _Connection:
    __slots__ = ("last_used", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    def usable(self) -> bool:
        return not self.reader.at_eof() and time.monotonic() - self.last_used < MAX_IDLE_SECONDS

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Pool:
    """Keep-alive connections; a request waits for one only when `limit` are busy."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[_Connection] = []
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.open_count = 0
        self.opened_total = 0

    async def _open(self) -> _Connection:
        self.open_count += 1
        self.opened_total += 1
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        except BaseException:
            self.open_count -= 1
            raise
        return _Connection(reader, writer)

    async def acquire(self) -> _Connection:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if conn.usable():
                    return conn
                self.discard(conn, wake=False)
            if self.open_count < self.limit:
                return await self._open()
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            conn_or_none = await waiter
            if conn_or_none is not None:
                return conn_or_none
            # None: a connection was discarded, so there is room to open one; loop round.

    def release(self, conn: _Connection) -> None:
        conn.last_used = time.monotonic()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def discard(self, conn: _Connection, *, wake: bool = True) -> None:
        conn.close()
        self.open_count -= 1
        while wake and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep the connection) of one HTTP/1.1 response; the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    keep = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep = b"close" not in value.lower()
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, keep


async def run(plan: Plan) -> Result:
    loop = asyncio.get_running_loop()
    rng = random.Random(plan.seed)
    total = plan.total_requests

    # Which requests are duplicates, and of what; then every unique body, before the clock starts.
    given = _load_bodies(plan.bodies_path) if plan.bodies_path else None
    if given is not None:
        total = min(total, len(given))
    created = int(time.time())
    schedule: list[tuple[int, bool]] = []  # (order offset, duplicate)
    unique = 0
    for _ in range(total):
        if unique and rng.random() < plan.duplicate_ratio:
            schedule.append((rng.randrange(max(0, unique - DUPLICATE_WINDOW), unique), True))
        else:
            schedule.append((unique, False))
            unique += 1
    if given is not None:
        order_of = [index for index, _ in given[:unique]]
        bodies = [body for _, body in given[:unique]]
    else:
        order_of = [plan.first_index + offset for offset in range(unique)]
        bodies = [
            event_body(plan.run_id, plan.first_index + offset, plan.event_type, created)
            for offset in range(unique)
        ]
    head_template = (
        f"POST {plan.path} HTTP/1.1\r\nHost: {plan.host}:{plan.port}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        "User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\n"
        "Stripe-Signature: {signature}\r\nContent-Length: {length}\r\n\r\n"
    )
    secret = plan.secret

    pool = _Pool(plan.host, plan.port, plan.max_connections)
    warm = await asyncio.gather(
        *(pool._open() for _ in range(min(plan.initial_connections, plan.max_connections)))
    )
    for conn in warm:
        pool.release(conn)

    result = Result(unique_orders=unique)
    rows = result.requests
    in_flight = 0
    launch_lags: list[float] = []

    async def one(k: int, scheduled: float) -> None:
        nonlocal in_flight
        offset, duplicate = schedule[k]
        body = bodies[offset]
        latency = -1.0
        status = STATUS_IO_ERROR
        send_lag = -1.0
        in_flight += 1
        result.max_in_flight = max(result.max_in_flight, in_flight)
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(plan.timeout):
                conn = await pool.acquire()
                sent = loop.time()
                send_lag = sent - scheduled
                # Signed at send time with the current timestamp, like each of Stripe's attempts.
                signature = sign(body, secret)
                head = head_template.format(signature=signature, length=len(body)).encode()
                conn.writer.write(head + body)
                status, keep = await _read_response(conn.reader)
            latency = loop.time() - scheduled
            if keep:
                pool.release(conn)
            else:
                pool.discard(conn)
            conn = None
        except TimeoutError:
            status = STATUS_TIMEOUT
            _sample(result, f"timeout after {plan.timeout}s (request {k})")
        except Exception as exc:
            _sample(result, f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                pool.discard(conn)
            in_flight -= 1
        rows.append([order_of[offset], int(duplicate), scheduled - start, latency, status, send_lag])

    tasks: set[asyncio.Task[None]] = set()
    cpu0 = time.process_time()
    start = loop.time() + 0.05
    result.start_wall = time.time() + (start - loop.time())

    async def announce_window() -> None:
        """Tell the orchestrator (stdout) when the measured window starts and ends, so it can read
        the servers' CPU counters over exactly that window."""
        await asyncio.sleep(max(0.0, start + plan.warmup - loop.time()))
        print(MEASURE_START, flush=True)
        await asyncio.sleep(max(0.0, start + plan.warmup + plan.duration - loop.time()))
        print(MEASURE_END, flush=True)

    announcer = loop.create_task(announce_window())
    k = 0
    while k < total:
        now = loop.time()
        while k < total and start + k / plan.rate <= now:
            scheduled = start + k / plan.rate
            launch_lags.append(now - scheduled)
            task = loop.create_task(one(k, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if k < total:
            await asyncio.sleep(max(0.0, start + k / plan.rate - loop.time()))
    await announcer
    if tasks:
        await asyncio.wait(tasks, timeout=plan.timeout + 5)
    result.cpu_seconds = time.process_time() - cpu0
    result.wall_seconds = loop.time() - start
    result.connections_opened = pool.opened_total
    pool.close_all()
    launch_lags.sort()
    if launch_lags:
        result.schedule_lag_p99 = launch_lags[min(len(launch_lags) - 1, int(len(launch_lags) * 0.99))]
        result.schedule_lag_max = launch_lags[-1]
    rows.sort(key=lambda row: row[2])
    return result


def _load_bodies(path: str) -> list[tuple[int, bytes]]:
    with open(path) as f:
        return [(int(index), body.encode()) for index, body in json.load(f)]


def _sample(result: Result, message: str) -> None:
    if len(result.error_samples) < 10:
        result.error_samples.append(message)


def main(argv: list[str]) -> int:
    plan_path, result_path = argv
    with open(plan_path) as f:
        plan = Plan(**json.load(f))
    # Ahead of the servers for the CPU (it needs a few % of a core), so that a busy machine delays the
    # answers, not the sending: the schedule is what the latencies are measured from. Unprivileged
    # runs keep the default priority.
    with contextlib.suppress(OSError):
        os.nice(-5)
    result = asyncio.run(run(plan))
    with open(result_path, "w") as f:
        json.dump(asdict(result), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
