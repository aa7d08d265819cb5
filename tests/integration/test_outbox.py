"""esim_common.outbox on the real database: queued with the change, published once, healed after a failure."""

from __future__ import annotations

import asyncio

import pytest

from esim_common import outbox
from esim_common.events import Event, OperatorAlert


class RecordingPublisher:
    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.published: list[Event] = []
        self.fail = fail
        self.delay = delay

    async def publish(self, event: Event) -> None:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("broker unavailable")
        self.published.append(event)


def alert(reason: str = "purchase_deadline_exceeded") -> OperatorAlert:
    key = "needs_attention:txn_outbox_1"
    return OperatorAlert(
        event_id=outbox.stable_event_id(key),
        transaction_id="txn_outbox_1",
        alert="needs_attention",
        alert_key=key,
        reason=reason,
    )


async def test_an_event_is_published_once_however_many_callers_try(db):
    event = alert()
    async with db.acquire() as conn, conn.transaction():
        assert await outbox.add(conn, event) is True
        assert await outbox.add(conn, alert(reason="a later version")) is False  # first version wins

    publisher = RecordingPublisher(delay=0.05)
    results = await asyncio.gather(*(outbox.publish_pending(db, publisher, event) for _ in range(5)))

    assert sorted(results) == [False, False, False, False, True]
    assert [e.reason for e in publisher.published] == ["purchase_deadline_exceeded"]
    stamped = "SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1"
    assert await db.fetchval(stamped, event.event_id)


async def test_a_failed_publish_leaves_the_event_for_the_next_caller(db):
    event = alert()
    async with db.acquire() as conn, conn.transaction():
        await outbox.add(conn, event)

    with pytest.raises(ConnectionError):
        await outbox.publish_pending(db, RecordingPublisher(fail=True), event)
    assert await db.fetchval("SELECT published_at FROM outbox WHERE event_id = $1", event.event_id) is None

    healer = RecordingPublisher()
    assert await outbox.publish_pending(db, healer, event) is True
    assert [e.event_id for e in healer.published] == [event.event_id]


async def test_an_event_rolled_back_with_its_change_is_never_published(db):
    event = alert()
    with pytest.raises(RuntimeError):
        async with db.acquire() as conn, conn.transaction():
            await outbox.add(conn, event)
            raise RuntimeError("the state change failed")

    publisher = RecordingPublisher()
    assert await outbox.publish_pending(db, publisher, event) is False
    assert publisher.published == []
