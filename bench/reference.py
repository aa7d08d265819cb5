"""The raw parts the pipeline is built from, measured alone: the reference of the pipeline benchmark.

    python -m bench.reference amqp AMQP_URL QUEUE_PREFIX --concurrency 16 --duration 10
    python -m bench.reference pg DATABASE_URL --concurrency 16 --duration 10

`amqp`: round trips through RabbitMQ as the services make them — a persistent message published to a
durable topic exchange with publisher confirms and `mandatory`, routed to a quorum queue, consumed with
a prefetch and acknowledged — by `concurrency` workers, each publishing its next message once its last
one came back (closed loop: this measures capacity, not latency under a given load). One connection,
a publishing channel and a consuming channel, like a FastStream service.

`pg`: transactions as a service makes them — BEGIN; INSERT a row; UPDATE it; COMMIT — by `concurrency`
workers over a pool of at most DATABASE_POOL_MAX_SIZE (10) connections, like a service.

Prints one JSON object: operations completed inside the measured window, per second, and the latency
distribution of one operation. Runs in its own process so that its CPU is its own, like a service's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aio_pika
import asyncpg

from bench.stats import Distribution

# About the size of an order event (ids, money, a timestamp) as the services publish it.
MESSAGE_BYTES = 512
# Like esim_common.settings: broker_prefetch and database_pool_max_size.
SERVICE_POOL_MAX = 10
TABLE = "bench_reference"


async def closed_loop(
    operation: Callable[[int], Awaitable[None]], concurrency: int, warmup: float, duration: float
) -> dict[str, float]:
    """`concurrency` workers repeating `operation` until the window ends; the window's figures."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup, start + warmup + duration)
    latencies: list[float] = []
    counter = itertools.count()
    cpu0 = time.process_time()

    async def worker() -> None:
        while (now := loop.time()) < window[1]:
            await operation(next(counter))
            done = loop.time()
            if now >= window[0] and done <= window[1]:
                latencies.append(done - now)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    spread = Distribution.of(latencies)
    return {
        "operations": len(latencies),
        "per_second": len(latencies) / duration,
        "p50": spread.p50,
        "p90": spread.p90,
        "p99": spread.p99,
        "max": spread.max,
        "cpu_seconds": time.process_time() - cpu0,
        "wall_seconds": loop.time() - start,
    }


async def amqp(url: str, prefix: str, concurrency: int, warmup: float, duration: float) -> dict[str, float]:
    connection = await aio_pika.connect(url)
    async with connection:
        publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=concurrency)
        exchange = await publishing.declare_exchange(
            f"{prefix}reference", aio_pika.ExchangeType.TOPIC, durable=True, auto_delete=True
        )
        queue = await consuming.declare_queue(
            f"{prefix}reference", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(f"{prefix}reference", routing_key="order.#")
        waiting: dict[str, asyncio.Future[None]] = {}

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            future = waiting.pop(message.message_id or "", None)
            if future is not None and not future.done():
                future.set_result(None)

        tag = await queue.consume(on_message)
        body = b"x" * MESSAGE_BYTES
        loop = asyncio.get_running_loop()

        async def round_trip(n: int) -> None:
            message_id = f"ref-{n}"
            arrived = waiting[message_id] = loop.create_future()
            await exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="order.reference",
                mandatory=True,
            )
            await arrived

        try:
            return await closed_loop(round_trip, concurrency, warmup, duration)
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            with contextlib.suppress(Exception):
                await consuming.queue_delete(queue.name)
            with contextlib.suppress(Exception):
                await publishing.exchange_delete(exchange.name)


async def postgres(dsn: str, concurrency: int, warmup: float, duration: float) -> dict[str, float]:
    size = min(concurrency, SERVICE_POOL_MAX)
    pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
    assert pool is not None
    try:
        await pool.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, status text NOT NULL,"
            " amount bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        )

        async def transaction(n: int) -> None:
            key = f"ref-{n}"
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO {TABLE} (id, status, amount) VALUES ($1, 'paid', $2)", key, n
                )
                await conn.execute(
                    f"UPDATE {TABLE} SET status = 'funded', updated_at = now() WHERE id = $1", key
                )

        return await closed_loop(transaction, concurrency, warmup, duration)
    finally:
        with contextlib.suppress(Exception):
            await pool.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("amqp", "pg"))
    parser.add_argument("url")
    parser.add_argument("prefix", nargs="?", default="bench-reference.")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.kind == "amqp":
        result = asyncio.run(amqp(args.url, args.prefix, args.concurrency, args.warmup, args.duration))
    else:
        result = asyncio.run(postgres(args.url, args.concurrency, args.warmup, args.duration))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
