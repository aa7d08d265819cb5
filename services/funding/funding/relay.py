"""The announcement relay: publishes order.funded events that nobody published after the commit.

A batch funds orders in one transaction and the deciding delivery publishes their order.funded after
the commit; if that publish fails, each order's own order.paid delivery publishes its event (fund_order
module docstring). Not every funded order has such a delivery left: one dead-lettered while it was in
funding, or one sent back by provisioning whose order.paid re-publish ran out of retries. Every
RELAY_INTERVAL_SECONDS this loop publishes the order.funded rows still unpublished RELAY_AFTER_SECONDS
after they were written, holding each row until the broker confirms it (then stamping it), as the
deliveries do. It skips the rows a delivery holds while publishing them (SKIP LOCKED), and a delivery
that comes after it finds them stamped: never twice. Each event it publishes is a WARNING and a count
(esim_funding_announcements_relayed_total): it means the usual path lost one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from esim_common.events import OrderFunded
from esim_common.publisher import EventPublisher
from funding import repository as repo
from funding.metrics import announcements_relayed

log = logging.getLogger("esim.funding.relay")

# Far above the gap between a decision's commit and its own publish (milliseconds), so that the relay
# publishes only what the usual path has lost.
RELAY_AFTER_SECONDS = 10.0
RELAY_INTERVAL_SECONDS = 10.0
RELAY_BATCH = 100  # rows per transaction; a longer backlog takes more rounds


class AnnouncementRelay:
    def __init__(self, *, pool: Callable[[], asyncpg.Pool], publisher: EventPublisher) -> None:
        self._pool = pool  # a getter: the pool exists only once the service has started
        self._publisher = publisher

    async def run_once(self) -> int:
        """Publish the stranded order.funded events; returns how many it published."""
        relayed = 0
        while True:
            published = await self._relay_batch()
            relayed += published
            if published < RELAY_BATCH:
                return relayed

    async def _relay_batch(self) -> int:
        """One transaction holding the rows it found while it publishes them one by one. The ones the
        broker confirmed are stamped (committed) even when a later publish fails; that failure is raised
        after the commit, and the next round tries the rest."""
        published: list[OrderFunded] = []
        failed: Exception | None = None
        async with self._pool().acquire() as conn, conn.transaction():
            stranded = await repo.stranded_announcements(
                conn, older_than_seconds=RELAY_AFTER_SECONDS, limit=RELAY_BATCH
            )
            for event in stranded:
                try:
                    await self._publisher.publish(event)
                except Exception as exc:  # raised below, once the confirmed ones are stamped
                    failed = exc
                    break
                published.append(event)
            await repo.mark_all_announced(conn, [e.event_id for e in published])
        for event in published:
            announcements_relayed.inc()
            log.warning(
                "order.funded relayed: nobody had published it",
                extra={"transaction_id": event.transaction_id, "event_id": str(event.event_id)},
            )
        if failed is not None:
            raise failed
        return len(published)

    async def run_forever(self) -> None:
        """Relay until cancelled; a failed round (broker or database away) is logged and the next one
        tries again."""
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.error("order.funded relay round failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(RELAY_INTERVAL_SECONDS)
