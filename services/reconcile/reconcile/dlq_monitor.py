"""DLQ depth for Prometheus: `esim_dlq_depth{queue}`, refreshed every 15 s by passive declares.

A passive declare reads a queue's ready-message count without touching a message, so the gauge can
never take a dead letter away from an operator. The label is bounded: the DLQ names of the topology.

The age of the oldest dead letter is not exported: it is in a header of the message at the head of the
queue, and reading it means a `basic.get` every round — a redelivery each time, which counts towards
a quorum queue's delivery limit on RabbitMQ 4.0 to 4.2 (default 20, then the message is dropped). Alert
on `esim_dlq_depth > 0` held `for:` a while instead.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Gauge

from esim_common.topology import Topology
from reconcile.dead_letters import dead_letter_queues
from reconcile.dlq_broker import DeadLetterBroker

log = logging.getLogger("esim.reconcile.dlq")

# Prometheus scrapes every 15 s by default; refreshing as often keeps a scrape at most one period old.
REFRESH_INTERVAL_SECONDS = 15.0

dlq_depth = Gauge(
    "esim_dlq_depth",
    "Messages waiting in a dead-letter queue (ready ones: a message being peeked is not counted).",
    ("queue",),
)


class DeadLetterMonitor:
    def __init__(
        self, amqp_url: str, topology: Topology, *, interval_seconds: float = REFRESH_INTERVAL_SECONDS
    ) -> None:
        self._broker = DeadLetterBroker(amqp_url)
        self._names = list(dead_letter_queues(topology))
        self._interval_seconds = interval_seconds

    async def run_once(self) -> int:
        """Refresh the gauge; returns the dead letters counted over every DLQ. A DLQ that is not
        declared loses its series (no number is better than a stale one)."""
        total = 0
        for name, counts in (await self._broker.counts(self._names)).items():
            if counts is None:
                dlq_depth.remove(name)
                continue
            dlq_depth.labels(queue=name).set(counts.ready)
            total += counts.ready
        return total

    async def run_forever(self) -> None:
        """Refresh until cancelled; a failed round (broker away) is logged and the next one tries again."""
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("DLQ depth not refreshed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self._interval_seconds)
