"""Scorecard R4 for the funding service, end to end: the funding process dies at a named crash point in the
middle of a card top-up, is started again, and the order is still delivered with exactly one of each.

The three points (`esim_common.crash_points`) are the moments where a crash is most expensive:

- `funding.after_card_created`: the single-use Issuing card exists at Stripe, our row does not know it
  (the transaction that would have recorded it rolls back);
- `funding.after_gateway_accepted`: the gateway charged the card and credited the Zendit wallet, our row
  still says `submitted`;
- `funding.before_ack`: order.funded is published, the order.paid message is not acknowledged.

For each, with the wallet one unit short of the order's cost (a top-up is needed), the test pays one order
through the webhook service, waits for funding to die there (exit status 137, "crash point <point>" in
its log), checks that the crash left what the point claims, starts funding without crash points and waits
for `delivered`. Then it counts, in the emulators' books and in our database, what this order caused:
one top-up row, one card (cancelled at Stripe and inactive with us), one approved authorisation on it,
one gateway top-up and one wallet CREDIT, one purchase, one email, and a wallet that moved by exactly the
top-up minus the cost. The order's top-up is found through `wallet_topups.order_ids`, never through the
format of its id (top-ups may cover several orders).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from esim_common.crash_points import CRASH_EXIT_STATUS
from esim_common.money import Money, from_zendit, to_zendit
from esim_sandbox.stack import Stack
from tests.e2e.test_paid_order_becomes_emailed_esim import (
    OFFER,
    checkout,
    emails_to,
    pay,
    purchases_of,
    stripe_client,
    wait_for_final,
    zendit,
    zendit_control,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.timeout(240)]

CARD_CREATED = "funding.after_card_created"
GATEWAY_ACCEPTED = "funding.after_gateway_accepted"
BEFORE_ACK = "funding.before_ack"

# The order reaches the crash point within a couple of seconds of the payment; 30 s means it never will.
CRASH_WITHIN_SECONDS = 30.0
# After delivery, every count is re-read for this long: a late duplicate (a second charge by a
# redelivered message, a second order.funded acted on) would show up here. Each hop takes milliseconds.
SETTLE_SECONDS = 3.0
LOG_TAIL_LINES = 25


# ------------------------------------------------------------------------------------ reading the books


@dataclass(frozen=True)
class Outside:
    """What the emulators hold, by id: Stripe cards (→ metadata topup_id), authorisations
    (→ card, approved), the gateway's top-ups (reference → record), Zendit CREDIT rows (id → amount)."""

    cards: dict[str, dict[str, Any]]
    authorizations: dict[str, dict[str, Any]]
    gateway_topups: dict[str, dict[str, Any]]
    credits: dict[str, int]

    def since(self, before: Outside) -> Outside:
        """Only what appeared after `before` was read."""
        return Outside(
            cards={k: v for k, v in self.cards.items() if k not in before.cards},
            authorizations={k: v for k, v in self.authorizations.items() if k not in before.authorizations},
            gateway_topups={k: v for k, v in self.gateway_topups.items() if k not in before.gateway_topups},
            credits={k: v for k, v in self.credits.items() if k not in before.credits},
        )


def read_outside(stack: Stack) -> Outside:
    client = stripe_client(stack)
    cards = {
        card.id: {"status": card.status, "topup_id": card.metadata.to_dict().get("topup_id")}
        for card in client.v1.issuing.cards.list({"limit": 100}).auto_paging_iter()
    }
    # Stripe has no list of authorisations in our emulator; every one of them is announced by an
    # `issuing_authorization.created` event (approved or declined), and the API says how it stands now.
    created = httpx.get(
        f"{stack.url('stripe')}/_sandbox/events",
        params={"type": "issuing_authorization.created"},
        timeout=10,
    )
    created.raise_for_status()
    authorizations = {}
    for record in created.json()["data"]:
        # The amount as authorised (a capture moves it to a transaction: the authorisation then says 0).
        asked = record["event"]["data"]["object"]
        current = client.v1.issuing.authorizations.retrieve(asked["id"])
        card = current.card if isinstance(current.card, str) else current.card.id
        authorizations[current.id] = {"card": card, "approved": current.approved, "amount": asked["amount"]}
    state = zendit_control(stack, "GET", "state")
    ledger = zendit(stack, "transactions", params={"_limit": 1024, "_offset": 0, "type": "CREDIT"})
    ledger.raise_for_status()
    return Outside(
        cards=cards,
        authorizations=authorizations,
        gateway_topups=state["topups"],
        credits={row["transactionId"]: row["amount"] for row in ledger.json()["list"]},
    )


async def topups_of(stack: Stack, txn: str) -> list[asyncpg.Record]:
    """The order's top-ups: every wallet_topups row whose order_ids name it."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT * FROM wallet_topups WHERE $1 = ANY(order_ids) ORDER BY created_at, id", txn
            )
        )
    finally:
        await conn.close()


async def query(stack: Stack, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@dataclass(frozen=True)
class Effects:
    """What one order caused, counted; every field must be 1 once it is delivered."""

    topup_rows: int  # wallet_topups naming the order
    cards: int  # Stripe cards of those top-ups (any status)
    card_rows: int  # our issuing_cards rows of those top-ups
    approved_authorizations: int  # on those cards
    gateway_topups: int  # the gateway's records under those top-ups' references
    wallet_credits: int  # Zendit CREDIT rows for those gateway top-ups
    funded_transitions: int
    purchases: int  # Zendit purchases for the order
    emails: int


ONE_OF_EACH = Effects(1, 1, 1, 1, 1, 1, 1, 1, 1)


async def effects(stack: Stack, txn: str, recipient: str) -> Effects:
    topups = await topups_of(stack, txn)
    ids = [t["id"] for t in topups]
    references = {t["gateway_reference"] for t in topups}
    outside = read_outside(stack)
    card_ids = {card_id for card_id, card in outside.cards.items() if card["topup_id"] in ids}
    gateway_ids = {t["topupId"] for ref, t in outside.gateway_topups.items() if ref in references}
    card_rows, funded = await asyncio.gather(
        query(stack, "SELECT card_id FROM issuing_cards WHERE topup_id = ANY($1::text[])", ids),
        query(
            stack,
            "SELECT id FROM order_transitions WHERE transaction_id = $1 AND to_status = 'funded'",
            txn,
        ),
    )
    return Effects(
        topup_rows=len(topups),
        cards=len(card_ids),
        card_rows=len(card_rows),
        approved_authorizations=sum(
            1 for a in outside.authorizations.values() if a["card"] in card_ids and a["approved"]
        ),
        gateway_topups=len(gateway_ids),
        wallet_credits=sum(1 for credit_id in outside.credits if credit_id in gateway_ids),
        funded_transitions=len(funded),
        purchases=len(purchases_of(stack, txn)),
        emails=len(emails_to(stack, recipient)),
    )


async def stays(
    read: Callable[[], Awaitable[Effects]], expected: Effects, seconds: float, why: Callable[[], str]
) -> None:
    """`read()` equals `expected` at every look during `seconds`; `why()` explains a difference."""
    deadline = time.monotonic() + seconds
    while True:
        seen = await read()
        assert seen == expected, why()
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.25)


# ------------------------------------------------------------------------------------ the process


def log_tails(stack: Stack, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(
        f"--- {name} log (last {lines} lines)\n{p.log_tail(lines)}" for name, p in stack.processes.items()
    )


def explain(stack: Stack, what: str) -> str:
    return f"{what}\n{log_tails(stack)}"


def funding_log_since(stack: Stack, offset: int) -> str:
    with stack.processes["funding"].log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def arm(stack: Stack, point: str) -> int:
    """Restart funding with `point` armed; returns where its log stood, to read this run's lines only."""
    funding = stack.processes["funding"]
    funding.env["CRASH_POINTS"] = point
    offset = funding.log_path.stat().st_size if funding.log_path.exists() else 0
    stack.restart("funding")
    return offset


def disarm(stack: Stack) -> None:
    """Funding running again without crash points, whether it crashed or not."""
    funding = stack.processes["funding"]
    funding.env.pop("CRASH_POINTS", None)
    if funding.running:
        stack.restart("funding")
    else:
        funding.start()
        stack.wait_healthy("funding")


async def crashed_at(stack: Stack, point: str, log_offset: int) -> None:
    funding = stack.processes["funding"]
    try:
        await eventually(
            lambda: not funding.running, within=CRASH_WITHIN_SECONDS, what=f"funding dies at {point}"
        )
    except AssertionError as exc:
        raise AssertionError(explain(stack, str(exc))) from None
    assert funding.popen is not None
    log = funding_log_since(stack, log_offset)
    assert funding.popen.returncode == CRASH_EXIT_STATUS, explain(
        stack, f"funding exited with {funding.popen.returncode}, not by the crash point"
    )
    assert f"crash point {point}" in log, explain(stack, f"funding died, but not at {point}")


# ------------------------------------------------------------------------------------ money


def offer_cost(stack: Stack) -> Money:
    cost = zendit(stack, f"esim/offers/{OFFER}").json()["cost"]
    return from_zendit(cost["fixed"] + cost.get("fee", 0), cost["currency"], cost["currencyDivisor"])


def wallet(stack: Stack) -> dict[str, Any]:
    found: dict[str, Any] = zendit_control(stack, "GET", "state")["wallet"]
    return found


def in_wallet_units(stack: Stack, money: Money) -> int:
    """`money` as the Zendit wallet counts it (its own currencyDivisor)."""
    state = wallet(stack)
    assert money.currency == state["currency"], f"the wallet is in {state['currency']}, not {money.currency}"
    return to_zendit(money, state["currencyDivisor"])


# ------------------------------------------------------------------------------------ what a crash leaves


async def assert_left_as_the_point_claims(stack: Stack, point: str, txn: str, before: Outside) -> None:
    """While funding is dead: the books show the crash happened exactly where the point says."""
    topups = await topups_of(stack, txn)
    assert len(topups) == 1, explain(stack, f"top-up rows naming {txn} at the crash: {topups}")
    [topup] = topups
    new = read_outside(stack).since(before)
    cards_of_topup = [c for c in new.cards.values() if c["topup_id"] == topup["id"]]
    card_rows = await query(stack, "SELECT * FROM issuing_cards WHERE topup_id = $1", topup["id"])
    [order] = await query(
        stack, "SELECT status, funded_at FROM esim_purchases WHERE transaction_id = $1", txn
    )
    # (top-up status, card recorded on it, our card rows, Stripe cards for it, gateway top-ups made)
    left = (
        topup["status"],
        topup["card_id"] is not None,
        len(card_rows),
        len(cards_of_topup),
        len(new.gateway_topups),
    )
    if point == CARD_CREATED:
        # A card at Stripe that our books do not know: the row is still pending, no issuing_cards row.
        assert left == ("pending", False, 0, 1, 0), explain(stack, f"{point} left {left}: {dict(topup)}")
    elif point == GATEWAY_ACCEPTED:
        # The gateway credited the wallet under our reference; our row still says submitted.
        assert left == ("submitted", True, 1, 1, 1), explain(stack, f"{point} left {left}: {dict(topup)}")
        credited = new.gateway_topups.get(topup["gateway_reference"])
        assert credited is not None and credited["status"] == "SUCCEEDED", explain(
            stack, f"{point}: the gateway has no successful top-up under our reference: {new.gateway_topups}"
        )
    else:
        # Funded and announced, the top-up finished; only the acknowledgement of order.paid is missing.
        assert topup["status"] == "succeeded" and order["funded_at"] is not None, explain(
            stack, f"{point} left the top-up {topup['status']}, the order {order['status']}"
        )


# ------------------------------------------------------------------------------------ the test


@pytest.mark.parametrize("point", [CARD_CREATED, GATEWAY_ACCEPTED, BEFORE_ACK])
async def test_funding_killed_at_a_crash_point_recovers_with_one_card_one_charge_one_topup(
    stack: Stack, point: str
) -> None:
    recipient = f"crash-{point.split('.')[-1]}-{uuid.uuid4().hex[:6]}@example.com"
    cost = offer_cost(stack)
    start = in_wallet_units(stack, cost) - 1  # one unit short: this order needs a top-up
    before = read_outside(stack)
    log_offset = arm(stack, point)
    try:
        zendit_control(stack, "POST", "wallet", {"balance": start})
        session = checkout(stack, recipient)
        pay(stack, session["sessionId"])
        txn = session["transactionId"]
        await crashed_at(stack, point, log_offset)
        await assert_left_as_the_point_claims(stack, point, txn, before)
    finally:
        disarm(stack)

    order = await wait_for_final(stack, txn, timeout=60)
    assert order["status"] == "delivered", explain(stack, f"order {txn}: {dict(order)}")
    await stays(
        lambda: effects(stack, txn, recipient),
        ONE_OF_EACH,
        SETTLE_SECONDS,
        lambda: explain(stack, f"after recovering from {point}, order {txn} did not cause one of each"),
    )

    # The details behind the counts.
    [topup] = await topups_of(stack, txn)
    new = read_outside(stack).since(before)
    assert topup["status"] == "succeeded", explain(stack, f"top-up: {dict(topup)}")
    assert {card_id: card["topup_id"] for card_id, card in new.cards.items()} == {
        topup["card_id"]: topup["id"]
    }, explain(stack, f"cards created during this test: {new.cards}; our top-up: {dict(topup)}")
    assert new.cards[topup["card_id"]]["status"] == "canceled"
    [card_row] = await query(stack, "SELECT * FROM issuing_cards WHERE topup_id = $1", topup["id"])
    assert (card_row["card_id"], card_row["active"]) == (topup["card_id"], False), dict(card_row)
    # Every authorisation attempted during the test: one, on our card, approved, for the top-up amount.
    assert list(new.authorizations.values()) == [
        {"card": topup["card_id"], "approved": True, "amount": topup["amount"]}
    ], explain(stack, f"authorisations during this test: {new.authorizations}")
    assert {ref: (t["status"], t["amount"], t["topupId"]) for ref, t in new.gateway_topups.items()} == {
        topup["gateway_reference"]: ("SUCCEEDED", topup["amount"], topup["gateway_topup_id"])
    }, explain(stack, f"gateway top-ups during this test: {new.gateway_topups}; ours: {dict(topup)}")
    topup_in_wallet = in_wallet_units(stack, Money(topup["amount"], topup["currency"].strip()))
    assert new.credits == {topup["gateway_topup_id"]: topup_in_wallet}, new.credits

    timeline = [
        r["to_status"]
        for r in await query(
            stack, "SELECT to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id", txn
        )
    ]
    assert len(timeline) == len(set(timeline)), f"a step of order {txn} happened twice: {timeline}"
    assert order["zendit_cost"] == cost.amount
    expected_balance = start + topup_in_wallet - in_wallet_units(stack, cost)
    now = wallet(stack)
    assert (now["balance"], now["available"]) == (expected_balance, expected_balance), (
        f"wallet {now}: started at {start}, topped up {topup_in_wallet}, order cost {cost}"
    )
