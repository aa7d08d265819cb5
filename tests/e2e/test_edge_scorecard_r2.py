"""Scorecard R2, end to end: Stripe's at-least-once, unordered delivery meets the five services.

The stack runs as real processes (`tests/e2e/conftest.py`). For these tests the sandbox's Stripe stops
delivering on its own and the test plays Stripe: it fetches the real events of a real payment from
the Stripe API and delivers them over HTTP to the webhook process: the same signed bytes five times at
once, the same event re-signed with other timestamps (a later retry attempt), and the two payment
events in either order. Whatever the mix, each order must come out with one order row moved to paid
once, one outbox `order.paid`, one single-use card and one wallet top-up (the wallet starts empty),
one Zendit purchase and one email, counted in the emulators' books and in the database.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from esim_sandbox.stack import Stack
from esim_sandbox.stripe_emulator.webhooks import sign
from tests.e2e.test_paid_order_becomes_emailed_esim import (
    checkout,
    emails_to,
    pay,
    purchases_of,
    wait_for_final,
    zendit_control,
)

pytestmark = [pytest.mark.broker, pytest.mark.db]

SECRET = "whsec_sandbox"  # the sandbox's and the stack's webhook secret
COMPLETED = "checkout.session.completed"
SUCCEEDED = "payment_intent.succeeded"
CONCURRENT_COPIES = 5
# Long enough for a duplicate order.paid / order.funded / order.provisioned to have been consumed and
# acted on (each hop takes milliseconds here); every count is re-checked throughout the window.
SETTLE_SECONDS = 3.0
HTTP_TIMEOUT_SECONDS = 30.0


@pytest.fixture
def stripe_delivers_nothing(stack: Stack) -> Iterator[None]:
    """The sandbox's Stripe keeps its events to itself during the test; the test delivers them."""
    endpoints = f"{stack.url('stripe')}/_sandbox/webhook_endpoints"
    httpx.post(endpoints, json={"url": None}, timeout=10).raise_for_status()
    try:
        yield
    finally:
        url = f"{stack.url('webhook')}/api/webhooks/stripe"
        httpx.post(endpoints, json={"url": url}, timeout=10).raise_for_status()


def raw_event(stack: Stack, event_id: str) -> bytes:
    """The event exactly as the Stripe API serves it (Stripe signs and sends the same JSON)."""
    response = httpx.get(
        f"{stack.url('stripe')}/v1/events/{event_id}",
        headers={"Authorization": "Bearer sk_test_e2e"},
        timeout=10,
    )
    response.raise_for_status()
    return response.content


@dataclass(frozen=True)
class Delivery:
    body: bytes
    signature: str


async def deliver_all(stack: Stack, deliveries: list[Delivery]) -> list[httpx.Response]:
    """POST every delivery at the same moment, each on its own connection, as Stripe's workers do."""

    async def post(delivery: Delivery) -> httpx.Response:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as client:
            return await client.post(
                f"{stack.url('webhook')}/api/webhooks/stripe",
                content=delivery.body,
                headers={"Stripe-Signature": delivery.signature, "Content-Type": "application/json"},
            )

    return list(await asyncio.gather(*(post(delivery) for delivery in deliveries)))


# ------------------------------------------------------------------------------------- counting effects


@dataclass(frozen=True)
class Effects:
    """Everything one order caused, in our database and in the providers' books."""

    orders: int  # rows for the recipient
    paid_transitions: int
    order_paid_outbox: int
    order_paid_unpublished: int
    topup_rows: int  # wallet_topups naming the order
    cards: int  # Stripe Issuing cards made for the order's top-ups
    gateway_topups: int  # the top-up gateway's records for the order's references
    wallet_credits: int  # CREDIT rows in Zendit's ledger from those top-ups
    purchases: int  # Zendit purchases for the order
    wallet_debits: int  # DEBIT rows in Zendit's ledger for the order
    emails: int


async def effects(stack: Stack, txn: str, recipient: str) -> Effects:
    conn = await asyncpg.connect(stack.database_url)
    try:
        orders = await conn.fetchval(
            "SELECT count(*) FROM esim_purchases WHERE recipient_email = $1", recipient
        )
        paid = await conn.fetchval(
            "SELECT count(*) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'paid'", txn
        )
        outbox = await conn.fetchrow(
            "SELECT count(*) AS total, count(*) FILTER (WHERE published_at IS NULL) AS unpublished"
            "  FROM outbox WHERE transaction_id = $1 AND routing_key = 'order.paid'",
            txn,
        )
        topup_rows = await conn.fetchval("SELECT count(*) FROM wallet_topups WHERE $1 = ANY(order_ids)", txn)
    finally:
        await conn.close()
    topup_prefix = f"tu_{txn}"  # funding's top-up ids (and gateway references) derive from the order
    cards = httpx.get(
        f"{stack.url('stripe')}/v1/issuing/cards",
        params={"limit": 100},
        headers={"Authorization": "Bearer sk_test_e2e"},
        timeout=10,
    ).json()["data"]
    state = zendit_control(stack, "GET", "state")
    gateway_topups = {ref: t for ref, t in state["topups"].items() if ref.startswith(topup_prefix)}
    ledger = httpx.get(
        f"{stack.url('zendit')}/v1/transactions",
        params={"_limit": 1024, "_offset": 0},
        headers={"Authorization": "Bearer sand_test_key"},
        timeout=10,
    ).json()["list"]
    credited = {t["topupId"] for t in gateway_topups.values()}
    return Effects(
        orders=orders,
        paid_transitions=paid,
        order_paid_outbox=outbox["total"],
        order_paid_unpublished=outbox["unpublished"],
        topup_rows=topup_rows,
        cards=sum(1 for card in cards if card["metadata"].get("topup_id", "").startswith(topup_prefix)),
        gateway_topups=len(gateway_topups),
        wallet_credits=sum(
            1 for row in ledger if row["type"] == "CREDIT" and row["transactionId"] in credited
        ),
        purchases=len(purchases_of(stack, txn)),
        wallet_debits=sum(
            1 for row in ledger if row["type"] == "DEBIT" and row["transactionId"].startswith(txn)
        ),
        emails=len(emails_to(stack, recipient)),
    )


ONE_OF_EACH = Effects(
    orders=1,
    paid_transitions=1,
    order_paid_outbox=1,
    order_paid_unpublished=0,
    topup_rows=1,
    cards=1,
    gateway_topups=1,
    wallet_credits=1,
    purchases=1,
    wallet_debits=1,
    emails=1,
)


async def stays(read: Callable[[], Awaitable[Effects]], expected: Effects, seconds: float) -> None:
    """`read()` equals `expected` at every look during `seconds`: late duplicates would show up here."""
    deadline = time.monotonic() + seconds
    while True:
        assert await read() == expected
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.25)


def paid_order_events(stack: Stack) -> tuple[str, str, dict[str, bytes]]:
    """An order (wallet empty, so it needs a card top-up) paid in the emulator: its transaction id, its
    recipient, and the raw bytes of each event the payment made, by type (none delivered yet)."""
    zendit_control(stack, "POST", "wallet", {"balance": 0})
    recipient = f"r2-{uuid.uuid4().hex[:8]}@example.com"
    session = checkout(stack, recipient)
    paid = pay(stack, session["sessionId"])
    bodies = {}
    for event_id in paid["event_ids"]:
        body = raw_event(stack, event_id)
        bodies[json.loads(body)["type"]] = body
    return session["transactionId"], recipient, bodies


async def inbox(stack: Stack, txn: str, types: list[str]) -> list[tuple[str, str]]:
    """(type, outcome) of the order's recorded Stripe events of `types`, sorted."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT type, outcome FROM stripe_events WHERE transaction_id = $1 AND type = ANY($2::text[])",
            txn,
            types,
        )
    finally:
        await conn.close()
    return sorted((row["type"], row["outcome"]) for row in rows)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "first,second",
    [(COMPLETED, SUCCEEDED), (SUCCEEDED, COMPLETED)],
    ids=["session-completed-first", "payment-intent-first"],
)
async def test_five_concurrent_copies_resigned_retries_and_either_order_make_one_of_everything(
    stack: Stack, stripe_delivers_nothing: None, first: str, second: str
):
    txn, recipient, bodies = paid_order_events(stack)
    assert {first, second} <= set(bodies), f"the payment made {sorted(bodies)}"

    # Stripe's delivery of `first` fanned out five times at once: identical bytes, identical header.
    header = sign(bodies[first], SECRET)
    burst = await deliver_all(stack, [Delivery(bodies[first], header)] * CONCURRENT_COPIES)
    # Then its retry attempts (re-signed, as every Stripe attempt is) racing five copies of `second`.
    now = int(time.time())
    retries = [Delivery(bodies[first], sign(bodies[first], SECRET, timestamp=now - k)) for k in (1, 2)]
    seconds = [Delivery(bodies[second], sign(bodies[second], SECRET))] * CONCURRENT_COPIES
    seconds.append(Delivery(bodies[second], sign(bodies[second], SECRET, timestamp=now - 3)))
    mixed = await deliver_all(stack, [*retries, *seconds])

    assert [r.status_code for r in burst + mixed] == [200] * len(burst + mixed), [
        r.text for r in burst + mixed
    ]
    order = await wait_for_final(stack, txn)
    assert order["status"] == "delivered", order["failure_reason"]
    await stays(lambda: effects(stack, txn, recipient), ONE_OF_EACH, SETTLE_SECONDS)
    # Each event is recorded once; whichever came first paid the order, the other found it paid.
    assert await inbox(stack, txn, [first, second]) == sorted(
        [(first, "order_paid"), (second, "already_paid")]
    )


async def test_both_payment_events_five_times_each_in_one_burst_make_one_of_everything(
    stack: Stack, stripe_delivers_nothing: None
):
    """checkout.session.completed and payment_intent.succeeded racing each other, not one after the
    other: ten concurrent deliveries, two events, one order paid once."""
    txn, recipient, bodies = paid_order_events(stack)
    both = [
        Delivery(bodies[kind], sign(bodies[kind], SECRET))
        for _ in range(CONCURRENT_COPIES)
        for kind in (COMPLETED, SUCCEEDED)
    ]

    answers = await deliver_all(stack, both)

    assert [r.status_code for r in answers] == [200] * len(both), [r.text for r in answers]
    order = await wait_for_final(stack, txn)
    assert order["status"] == "delivered", order["failure_reason"]
    await stays(lambda: effects(stack, txn, recipient), ONE_OF_EACH, SETTLE_SECONDS)
    recorded = await inbox(stack, txn, [COMPLETED, SUCCEEDED])
    assert sorted(outcome for _type, outcome in recorded) == ["already_paid", "order_paid"]
