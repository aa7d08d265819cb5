"""Dead-letter rules without a broker: which queue, which headers a replayed copy carries, which
messages a request selects, what is shown and audited, and the order audit → publish → ack."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from esim_common.publisher import EVENT_TYPE_HEADER, SCHEMA_VERSION_HEADER
from esim_common.topology import (
    ATTEMPT_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    ORIGIN_QUEUE_HEADER,
    esim_topology,
)
from reconcile import dead_letters
from reconcile.dead_letters import (
    DISCARD_ACTION,
    REPLAY_ACTION,
    REPLAY_COUNT_HEADER,
    REPLAYED_AT_HEADER,
    AuditEntry,
    DeadLetter,
    audit_entry,
    body_preview,
    find_dead_letter_queue,
    json_safe,
    origin_queue,
    replay_headers,
    select,
    stored_body,
)
from reconcile.dlq_schemas import DeadLetterView, DiscardRequest, ReplayRequest

TOPOLOGY = esim_topology(prefix="t1.")
WORK = TOPOLOGY.queue("funding.order-paid")
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
PAN = "4242424242424242"


def letter(
    message_id: str | None = "m1", *, headers: dict[str, Any] | None = None, body: bytes | None = None
):
    return DeadLetter(
        message_id=message_id,
        correlation_id="txn-corr",
        routing_key=WORK.dlq,
        redelivered=False,
        headers=headers or {},
        body=body if body is not None else json.dumps({"transaction_id": f"txn-{message_id}"}).encode(),
    )


def test_a_dlq_is_found_by_its_full_or_unprefixed_name_and_a_work_queue_is_not_a_dlq():
    assert find_dead_letter_queue(TOPOLOGY, "t1.funding.order-paid.dlq") == WORK
    assert find_dead_letter_queue(TOPOLOGY, "funding.order-paid.dlq") == WORK
    assert find_dead_letter_queue(TOPOLOGY, "funding.order-paid") is None
    assert find_dead_letter_queue(TOPOLOGY, "t1.funding.order-paid") is None
    assert find_dead_letter_queue(TOPOLOGY, "t1.funding.order-paid.retry.1s") is None
    assert find_dead_letter_queue(TOPOLOGY, "nope.dlq") is None


def test_replay_goes_to_the_dlqs_own_work_queue_whatever_the_origin_header_says(caplog):
    caplog.set_level(logging.WARNING, logger="esim.reconcile.dlq")
    assert origin_queue(WORK, {ORIGIN_QUEUE_HEADER: WORK.name}) == WORK.name
    assert origin_queue(WORK, {ORIGIN_QUEUE_HEADER: WORK.name.encode()}) == WORK.name
    assert origin_queue(WORK, {}) == WORK.name  # dead-lettered by the broker: no header
    assert not caplog.records

    other = TOPOLOGY.queue("notify.order-failed").name  # another work queue of the same topology
    for named in (other, "amq.somewhere-else", WORK.dlq):
        caplog.clear()
        assert origin_queue(WORK, {ORIGIN_QUEUE_HEADER: named}) == WORK.name
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert caplog.records[0].origin_header == named


def test_a_replayed_copy_starts_again_at_attempt_one_without_failure_or_broker_headers():
    headers = {
        ATTEMPT_HEADER: 4,
        LAST_ERROR_HEADER: "RetryLater: zendit 503",
        ORIGIN_QUEUE_HEADER: WORK.name,
        FAILED_AT_HEADER: "2026-11-30T11:00:00+00:00",
        "x-death": [{"count": 1, "queue": WORK.name}],
        "x-first-death-queue": WORK.name,
        "x-last-death-reason": "rejected",
        "x-delivery-count": 3,
        SCHEMA_VERSION_HEADER: 1,
        EVENT_TYPE_HEADER: "OrderPaid",
    }
    assert replay_headers(headers, replayed_at=NOW) == {
        SCHEMA_VERSION_HEADER: 1,
        EVENT_TYPE_HEADER: "OrderPaid",
        REPLAYED_AT_HEADER: NOW.isoformat(),
        REPLAY_COUNT_HEADER: 1,
    }


def test_replays_are_counted_across_replays():
    again = replay_headers({REPLAY_COUNT_HEADER: 2, ATTEMPT_HEADER: 4}, replayed_at=NOW)
    assert again[REPLAY_COUNT_HEADER] == 3 and ATTEMPT_HEADER not in again
    assert replay_headers({REPLAY_COUNT_HEADER: "garbage"}, replayed_at=NOW)[REPLAY_COUNT_HEADER] == 1


def test_selecting_by_ids_takes_every_copy_and_reports_the_missing_ones_once_in_request_order():
    held = [letter("a"), letter("b"), letter("a"), letter(None), letter("c")]
    chosen = select(held, message_ids=["z", "a", "c", "z", "y"], limit=1)
    assert chosen.chosen == (0, 2, 4)  # both copies of "a", whatever the limit
    assert chosen.not_found == ("z", "y")


def test_selecting_all_takes_the_oldest_up_to_the_limit():
    held = [letter("a"), letter("b"), letter("c")]
    assert select(held, message_ids=None, limit=2).chosen == (0, 1)
    assert select(held, message_ids=None, limit=10).chosen == (0, 1, 2)
    assert select([], message_ids=None, limit=10).chosen == ()


def test_the_order_is_read_from_the_body_else_from_the_correlation_id():
    assert letter("a").transaction_id == "txn-a"
    assert letter("a", body=b"not json at all").transaction_id == "txn-corr"
    assert letter("a", body=b'["a list"]').transaction_id == "txn-corr"


def test_a_preview_is_redacted_before_it_is_cut_so_no_card_number_survives_half_cut():
    body = ("x" * 490 + PAN + "y" * 100).encode()
    preview = body_preview(body)
    assert PAN[:10] not in preview and preview.endswith("…")
    assert body_preview(b'{"transaction_id": "t"}') == '{"transaction_id": "t"}'


def test_header_values_become_json_with_strings_redacted():
    headers = {
        "x-death": [{"time": NOW, "count": 1, "reason": b"rejected"}],
        LAST_ERROR_HEADER: f"card {PAN} declined",
    }
    safe = json_safe(headers)
    json.dumps(safe)
    assert safe["x-death"] == [{"time": NOW.isoformat(), "count": 1, "reason": "rejected"}]
    assert PAN not in safe[LAST_ERROR_HEADER]


def test_a_discard_is_audited_with_the_whole_body_and_a_replay_with_its_destination():
    big = json.dumps({"transaction_id": "txn-1", "pad": "p" * 5000}).encode()
    discarded = audit_entry(DISCARD_ACTION, WORK.dlq, letter("m", body=big), note="duplicate order")
    assert discarded.transaction_id == "txn-1" and discarded.note == "duplicate order"
    assert discarded.detail["body"] == big.decode() and discarded.detail["body_encoding"] == "utf-8"
    assert discarded.detail["queue"] == WORK.dlq and discarded.detail["message_id"] == "m"
    assert discarded.detail["body_redacted"] is False

    replayed = audit_entry(REPLAY_ACTION, WORK.dlq, letter("m"), note=None, origin=WORK.name)
    assert replayed.detail["origin_queue"] == WORK.name and "body" not in replayed.detail
    assert replayed.detail["status"] == "attempted"  # written before the publish
    json.dumps(discarded.detail), json.dumps(replayed.detail)


def test_a_card_number_never_reaches_the_audit_whatever_the_bodys_encoding():
    with_card = stored_body(f'{{"card": "{PAN}"}}'.encode())
    assert PAN not in with_card.text and with_card.redacted and with_card.encoding == "utf-8"

    latin1 = f"card={PAN}".encode() + b"\xe9 caf\xe9"  # not UTF-8: no redaction could see into base64
    kept = stored_body(latin1)
    assert kept.encoding == "latin-1" and kept.redacted
    assert PAN not in kept.text and kept.text.endswith("é café")
    assert kept.sha256 == hashlib.sha256(latin1).hexdigest()
    entry = audit_entry(DISCARD_ACTION, WORK.dlq, letter("m", body=latin1), note="poison")
    stored = json.dumps(entry.detail)
    assert PAN not in stored and entry.detail["body_sha256"] == kept.sha256


def test_a_nul_byte_never_reaches_jsonb_which_refuses_it():
    kept = stored_body(b"\xff\xfe\x00poison")
    assert "\x00" not in kept.text and kept.redacted and kept.text.endswith("poison")
    assert json_safe({"x-odd": "a\x00b"}) == {"x-odd": "a\ufffdb"}


def test_a_replay_request_names_ids_or_asks_for_all_but_not_both_nor_neither():
    assert ReplayRequest.model_validate({"message_ids": ["a"]}).message_ids == ["a"]
    assert ReplayRequest.model_validate({"all": True, "limit": 5}).limit == 5
    for body in ({}, {"message_ids": ["a"], "all": True}, {"all": False}, {"message_ids": []}):
        with pytest.raises(ValidationError):
            ReplayRequest.model_validate(body)


def test_a_discard_needs_ids_and_a_note():
    with pytest.raises(ValidationError):
        DiscardRequest.model_validate({"message_ids": ["a"]})
    with pytest.raises(ValidationError):
        DiscardRequest.model_validate({"message_ids": ["a"], "note": "   "})
    assert DiscardRequest.model_validate({"message_ids": [" a "], "note": "dup"}).message_ids == ["a"]


# --- the order of side effects, with fakes for the broker, the publisher and the audit table


class FakeHold:
    """A DLQ in memory: holding moves messages out; what is not acked comes back when the hold ends."""

    def __init__(self, letters: list[DeadLetter]) -> None:
        self.queue = list(letters)
        self.steps: list[str] = []

    @asynccontextmanager
    async def __call__(self, name: str, at_most: int) -> AsyncIterator[Any]:
        taken, self.queue = self.queue[:at_most], self.queue[at_most:]
        fake = self

        class Held:
            depth = len(taken) + len(fake.queue)
            letters = taken

            def __init__(self) -> None:
                self.acked: set[int] = set()

            async def ack(self, indexes: Sequence[int]) -> None:
                fake.steps.append(f"ack {[taken[i].message_id for i in indexes]}")
                self.acked.update(indexes)

        held = Held()
        try:
            yield held
        finally:
            self.queue = [m for i, m in enumerate(taken) if i not in held.acked] + self.queue


def test_a_peeked_message_shows_the_brokers_delivery_count():
    returned = DeadLetterView.of(letter("m", headers={"x-delivery-count": 19}), WORK.name)
    assert returned.delivery_count == 19
    assert DeadLetterView.of(letter("m"), WORK.name).delivery_count is None


async def test_replay_audits_then_publishes_then_acks():
    hold = FakeHold([letter("a", headers={ATTEMPT_HEADER: 4}), letter("b")])
    published: list[tuple[str | None, str, dict[str, Any]]] = []

    async def publish(dead: DeadLetter, queue: str, headers: dict[str, Any]) -> None:
        hold.steps.append(f"publish {dead.message_id}")
        published.append((dead.message_id, queue, headers))

    async def record(entries: Sequence[AuditEntry]) -> None:
        hold.steps.append(f"record {[e.detail['message_id'] for e in entries]}")

    settled = await dead_letters.replay(
        hold, WORK, message_ids=["a"], limit=10, note=None, now=NOW, publish=publish, record=record
    )

    assert hold.steps == ["record ['a']", "publish a", "ack ['a']"]
    assert [m.message_id for m in hold.queue] == ["b"]
    assert published[0][1] == WORK.name and ATTEMPT_HEADER not in published[0][2]
    assert [m.message_id for m in settled.letters] == ["a"] and settled.origins == (WORK.name,)


@pytest.mark.parametrize("failing", ["publish", "record"])
async def test_a_failed_publish_or_audit_leaves_the_dlq_as_it_was(failing):
    hold = FakeHold([letter("a"), letter("b"), letter("c")])
    published: list[str | None] = []

    async def publish(dead: DeadLetter, queue: str, headers: dict[str, Any]) -> None:
        published.append(dead.message_id)
        if failing == "publish" and dead.message_id == "b":
            raise RuntimeError("not confirmed")

    async def record(entries: Sequence[AuditEntry]) -> None:
        if failing == "record":
            raise RuntimeError("database away")

    with pytest.raises(RuntimeError):
        await dead_letters.replay(
            hold,
            WORK,
            message_ids=None,
            limit=3,
            note=None,
            now=NOW,
            publish=publish,
            record=record,
        )
    assert [m.message_id for m in hold.queue] == ["a", "b", "c"]
    assert not [s for s in hold.steps if s.startswith("ack")]
    # An audit that cannot be written stops the replay before any copy reaches a work queue.
    assert published == (["a", "b"] if failing == "publish" else [])


async def test_discard_audits_before_it_acks_and_a_failed_audit_removes_nothing():
    hold = FakeHold([letter("a"), letter("b")])
    recorded: list[AuditEntry] = []

    async def record(entries: Sequence[AuditEntry]) -> None:
        hold.steps.append("record")
        recorded.extend(entries)

    settled = await dead_letters.discard(hold, WORK, message_ids=["b", "x"], note="known bad", record=record)
    assert hold.steps == ["record", "ack ['b']"]
    assert settled.not_found == ("x",) and [m.message_id for m in hold.queue] == ["a"]
    assert recorded[0].action == DISCARD_ACTION and recorded[0].note == "known bad"

    async def broken(entries: Sequence[AuditEntry]) -> None:
        raise RuntimeError("database away")

    with pytest.raises(RuntimeError):
        await dead_letters.discard(hold, WORK, message_ids=["a"], note="n", record=broken)
    assert [m.message_id for m in hold.queue] == ["a"]
