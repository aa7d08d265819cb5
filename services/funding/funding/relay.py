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

Each row stands on its own: one whose payload is not an OrderFunded, or that the broker refuses, is an
ERROR and a count (esim_funding_announcement_relay_failures_total), skipped for the round, and tried
again the next round after the others; it never blocks the rows behind it. Every round also sets
esim_funding_oldest_unpublished_announcement_seconds, which an alert watches for rows stuck for good.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
from pydantic import ValidationError

from esim_common.events import OrderFunded
from esim_common.publisher import EventPublisher
from funding import repository as repo
from funding.metrics import (
    announcement_relay_failures,
    announcements_relayed,
    oldest_unpublished_announcement,
)

log = logging.getLogger("esim.funding.relay")

# Far above the gap between a decision's commit and its own publish (milliseconds). Measured from
# outbox.created_at, the start of the transaction that wrote the row: a long batch transaction's row
# is already seconds "old" when it commits, and must not be taken from its deciding delivery.
RELAY_AFTER_SECONDS = 30.0
RELAY_INTERVAL_SECONDS = 10.0
RELAY_BATCH = 100  # rows per transaction; a longer backlog takes more batches
# When the broker itself is away every publish fails, each after up to the confirm timeout: a round
# stops after this many rather than hold the backlog's rows while it tries each one.
MAX_PUBLISH_FAILURES_PER_ROUND = 3


@dataclass
class _Round:
    failed_before: set[uuid.UUID]  # rows that failed last round: tried after the others
    tried: list[uuid.UUID] = field(default_factory=list)  # each row is tried once per round
    failed: set[uuid.UUID] = field(default_factory=set)
    publish_failures: int = 0
    published: int = 0

    @property
    def broker_failing(self) -> bool:
        return self.publish_failures >= MAX_PUBLISH_FAILURES_PER_ROUND

    def failing_after(self) -> set[uuid.UUID]:
        """The rows the next round tries last. A round stopped early keeps the earlier failures it did
        not try again: otherwise two sets of failing rows could take turns ahead of a good row forever."""
        if not self.broker_failing:
            return self.failed
        return self.failed | (self.failed_before - set(self.tried))


def _without_input(exc: ValidationError) -> ValueError:
    """What was wrong with the payload, without quoting it (the log never repeats stored values)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    return ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in errors))


class AnnouncementRelay:
    def __init__(self, *, pool: Callable[[], asyncpg.Pool], publisher: EventPublisher) -> None:
        self._pool = pool  # a getter: the pool exists only once the service has started
        self._publisher = publisher
        self._failed_last_round: set[uuid.UUID] = set()

    async def run_once(self) -> int:
        """Publish the stranded order.funded events, then record the age of the oldest one still
        unpublished; returns how many it published."""
        round_ = _Round(failed_before=self._failed_last_round)
        while await self._relay_batch(round_):
            pass
        if round_.broker_failing:
            log.error(
                "order.funded relay round stopped: the broker refuses publishes",
                extra={"failures": round_.publish_failures},
            )
        self._failed_last_round = round_.failing_after()
        oldest_unpublished_announcement.set(await repo.oldest_unpublished_announcement_seconds(self._pool()))
        return round_.published

    async def _relay_batch(self, round_: _Round) -> bool:
        """One transaction holding the rows it found while it publishes them one by one; the ones the
        broker confirmed are stamped as it commits. True while more rows may be waiting."""
        confirmed: list[repo.StrandedRow] = []
        async with self._pool().acquire() as conn, conn.transaction():
            rows = await repo.stranded_announcements(
                conn,
                older_than_seconds=RELAY_AFTER_SECONDS,
                limit=RELAY_BATCH,
                tried=round_.tried,
                failed_before=list(round_.failed_before),
            )
            for row in rows:
                if round_.broker_failing:
                    break
                round_.tried.append(row.event_id)
                if await self._publish(row, round_):
                    confirmed.append(row)
            await repo.mark_all_announced(conn, [row.event_id for row in confirmed])
        for row in confirmed:
            announcements_relayed.inc()
            log.warning(
                "order.funded relayed: nobody had published it",
                extra={"transaction_id": row.transaction_id, "event_id": str(row.event_id)},
            )
        round_.published += len(confirmed)
        return len(rows) == RELAY_BATCH and not round_.broker_failing

    async def _publish(self, row: repo.StrandedRow, round_: _Round) -> bool:
        """True once the broker confirmed the row's event; False when it cannot be published (logged,
        counted, and left for the next round)."""
        try:
            event = OrderFunded.model_validate_json(row.payload)
        except ValidationError as exc:  # a payload no consumer could read either
            self._skip(row, round_, _without_input(exc))
            return False
        try:
            await self._publisher.publish(event)
        except Exception as exc:
            round_.publish_failures += 1
            self._skip(row, round_, exc)
            return False
        return True

    @staticmethod
    def _skip(row: repo.StrandedRow, round_: _Round, exc: Exception) -> None:
        round_.failed.add(row.event_id)
        announcement_relay_failures.inc()
        log.error(
            "order.funded not relayed; skipped until the next round",
            extra={
                "transaction_id": row.transaction_id,
                "event_id": str(row.event_id),
                "error": f"{type(exc).__name__}: {exc}"[:300],
            },
        )

    async def run_forever(self) -> None:
        """Relay until cancelled; a failed round (database away) is logged and the next one tries
        again."""
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.error("order.funded relay round failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(RELAY_INTERVAL_SECONDS)
