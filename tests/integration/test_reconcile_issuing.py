"""Issuing-card reconciliation against the real emulators and Postgres: each mismatch kind made on purpose
the way production could meet it, found by `issuing_mismatches`; a clean top-up finds nothing; an
outage of either source raises instead of reporting "no mismatches".

Top-ups run through funding's own phases (`funding.topups.TopupPhases`): the single-use card is made at
the Stripe emulator, handed to the Zendit emulator's gateway (which charges it through the card network
and writes the CREDIT), and cancelled — or not, when the Stripe emulator is told to fail the cancel.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from esim_common.errors import FailPermanently
from esim_common.money import Money
from esim_common.providers.stripe import StripeGateway, StripeTransientError
from esim_common.providers.topup_gateway import TopupGatewayClient
from esim_common.providers.zendit import ZenditClient
from esim_common.settings import Settings, load_settings
from funding import repository as funding_repo
from funding.cardholder import PlatformCardholder
from funding.repository import WalletTopup
from funding.topups import TopupPhases
from reconcile import mismatch_store
from reconcile.issuing_check import IssuingSourceUnavailable, issuing_mismatches
from reconcile.issuing_rules import ENDED_GRACE
from reconcile.ledger_checks import ExtraCheck, LedgerRunResult, run_ledger_checks
from tests.fixtures.reconcile_app import reconcile_in_process

pytestmark = pytest.mark.db

TOPUP = 5000  # USD cents, the default ZENDIT_MIN_TOPUP
CANCEL_FAULT = {"method": "POST", "status": 500, "count": 20}  # outlasts the SDK's network retries
CARD_KINDS = ("card_charged_without_credit", "card_still_active")
TOKEN = "admin-token-for-issuing-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def kinds(found) -> list[tuple[str, str]]:
    return [(m.kind, m.subject) for m in found]


def after_grace() -> datetime:
    return datetime.now(UTC) + ENDED_GRACE + timedelta(minutes=1)


@pytest.fixture
def settings(database_url, stripe_emulator, zendit_emulator) -> Settings:
    return load_settings(
        database_url=database_url,
        stripe_api_base=stripe_emulator.url,
        stripe_api_key=stripe_emulator.api_key,
        zendit_api_base=zendit_emulator.url,
        zendit_api_key=zendit_emulator.api_key,
        zendit_topup_url=zendit_emulator.topup_url,
        zendit_topup_api_key=zendit_emulator.topup_api_key,
    )


@pytest.fixture
async def topup(db, settings, stripe_gateway) -> AsyncIterator[Callable[[], Awaitable[WalletTopup]]]:
    """Runs one wallet top-up of TOPUP through funding's phases; returns its row as it ended."""
    async with TopupGatewayClient(
        url=settings.zendit_topup_url, api_key=settings.zendit_topup_api_key.get_secret_value(), timeout=10.0
    ) as gateway:
        phases = TopupPhases(
            pool=lambda: db,
            stripe=stripe_gateway,
            gateway=gateway,
            cardholder=PlatformCardholder(stripe=stripe_gateway, settings=settings),
        )

        async def run() -> WalletTopup:
            txn = f"txn-{uuid.uuid4().hex[:12]}"
            async with db.acquire() as conn:
                started = await funding_repo.start_topup(
                    conn, topup_id=f"tu_{txn}", amount=Money(TOPUP, "USD"), transaction_id=txn
                )
            try:
                await phases.finish(started.id, txn)
            except (FailPermanently, StripeTransientError):
                pass  # a decline, or a cancel that failed: what is left is what the test looks at
            return await funding_repo.get_topup(db, started.id)

        yield run


async def test_a_funded_topup_leaves_no_issuing_mismatch(db, settings, topup, stripe_emulator) -> None:
    funded = await topup()
    assert funded.status.value == "succeeded" and funded.gateway_topup_id is not None
    assert stripe_emulator.state.objects[funded.card_id]["status"] == "canceled"

    assert await issuing_mismatches(db, settings, now=after_grace()) == []


async def test_a_card_left_active_after_a_declined_topup_is_reported_once_its_grace_is_over(
    db, settings, topup, stripe_emulator, declining_card_network
) -> None:
    stripe_emulator.inject_fault("/v1/issuing/cards/*", **CANCEL_FAULT)
    declined = await topup()
    stripe_emulator.clear_faults()
    assert declined.status.value == "declined" and declined.card_active is True

    assert await issuing_mismatches(db, settings, now=datetime.now(UTC)) == []  # funding may still cancel it
    [found] = await issuing_mismatches(db, settings, now=after_grace())

    assert (found.kind, found.subject) == ("card_still_active", declined.card_id)
    assert found.transaction_id == declined.order_ids[0]
    card = stripe_emulator.state.objects[declined.card_id]
    assert found.detail["topup_id"] == declined.id
    assert found.detail["stripe_status"] == "active"
    assert found.detail["card_last4"] == card["last4"]
    assert (found.detail["amount"], found.detail["currency"]) == (TOPUP, "USD")
    assert found.detail["age_seconds"] > ENDED_GRACE.total_seconds()
    # A card our books record is looked up by id when Stripe's list (here: another cardholder's) lacks it.
    elsewhere = settings.model_copy(update={"stripe_issuing_cardholder_id": "ich_someone_else"})
    assert kinds(await issuing_mismatches(db, elsewhere, now=after_grace())) == [
        ("card_still_active", declined.card_id)
    ]
    # Older than the look-back, it is still checked while our books call it active.
    much_later = datetime.now(UTC) + timedelta(hours=settings.reconcile_lookback_hours, days=1)
    assert kinds(await issuing_mismatches(db, settings, now=much_later)) == [
        ("card_still_active", declined.card_id)
    ]


async def test_a_card_charged_outside_the_wallet_gateway_is_reported(
    db, settings, topup, stripe_emulator, stripe_gateway, stripe_webhook_receiver, declining_card_network
) -> None:
    stripe_emulator.inject_fault("/v1/issuing/cards/*", **CANCEL_FAULT)
    declined = await topup()
    stripe_emulator.clear_faults()
    # The card stayed usable; a merchant other than the wallet gateway now charges it (its number got out).
    stripe_webhook_receiver.approve_authorizations = True
    card = await stripe_gateway.reveal_card(declined.card_id)
    charge = await asyncio.to_thread(
        stripe_emulator.charge_card,
        number=card.number,
        exp_month=card.exp_month,
        exp_year=card.exp_year,
        cvc=card.cvc,
        amount=TOPUP,
        currency="usd",
        merchant_name="Somewhere Else",
    )
    assert charge["approved"] is True

    [found] = await issuing_mismatches(db, settings, now=after_grace())

    # Paying once cancelled the single-use card: it is no longer "still active", it is charged.
    assert (found.kind, found.subject) == ("card_charged_without_credit", declined.card_id)
    assert found.detail["reason"] == "no_credit"
    assert (found.detail["charged"], found.detail["currency"]) == (TOPUP, "USD")
    assert found.detail["gateway_topup_id"] is None
    assert card.number not in str(found) and card.cvc not in str(found.detail)


@pytest.mark.parametrize("source", ["stripe", "zendit"])
async def test_an_unreadable_source_raises_instead_of_reporting_nothing(
    db, settings, topup, stripe_emulator, zendit_emulator, source
) -> None:
    await topup()
    if source == "stripe":
        stripe_emulator.inject_fault("/v1/issuing/*", method="GET", status=500, count=20)
    else:
        zendit_emulator.control(
            "POST", "faults", {"endpoint": "list_transactions", "count": 20, "status": 503}
        )

    with pytest.raises(IssuingSourceUnavailable) as raised:
        await issuing_mismatches(db, settings, now=after_grace())
    assert raised.value.source == source


async def test_issuing_lists_filter_by_card_and_creation_time_and_page_like_stripe(
    stripe_emulator, stripe_gateway: StripeGateway, stripe_client, stripe_webhook_receiver
) -> None:
    """The list endpoints the check reads, through the official SDK."""
    holder = await stripe_client.v1.issuing.cardholders.create_async(
        params={
            "type": "company",
            "name": "Lists Test",
            "billing": {
                "address": {"line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"}
            },
        }
    )
    cards = [
        await stripe_client.v1.issuing.cards.create_async(
            params={"cardholder": holder.id, "currency": "usd", "type": "virtual", "status": "active"}
        )
        for _ in range(2)
    ]
    for card in cards:
        for amount in (100, 200, 300):
            auth = await stripe_client.v1.test_helpers.issuing.authorizations.create_async(
                params={"card": card.id, "amount": amount}
            )
        await stripe_client.v1.test_helpers.issuing.authorizations.capture_async(auth.id)

    first = cards[0].id
    page = await stripe_client.v1.issuing.authorizations.list_async(params={"card": first, "limit": 2})
    rest = await stripe_client.v1.issuing.authorizations.list_async(
        params={"card": first, "limit": 2, "starting_after": page.data[-1].id}
    )
    assert [a.amount for a in page.data] == [0, 200] and page.has_more  # newest first; 300 was captured
    assert [a.amount for a in rest.data] == [100] and not rest.has_more
    pending = await stripe_client.v1.issuing.authorizations.list_async(
        params={"card": first, "status": "pending"}
    )
    assert len(pending.data) == 2

    later = cards[1].created + 1
    assert await stripe_gateway.list_issuing_authorizations(created_gte=later, card_id=first) == []
    mine = await stripe_gateway.list_issuing_transactions(created_gte=cards[0].created, card_id=first)
    assert [(t.card_id, t.type, t.amount, t.currency) for t in mine] == [(first, "capture", -300, "USD")]
    listed = await stripe_gateway.list_issuing_cards(created_gte=cards[0].created, cardholder_id=holder.id)
    assert {card.id for card in listed} == {card.id for card in cards}


# ------------------------------------------------------------------------- stored, as the sweep stores them


async def leaked_and_extra_cards(
    topup, stripe_emulator, stripe_gateway, stripe_client, stripe_webhook_receiver
) -> tuple[str, str]:
    """Two cards an operator must look at, one of each kind: (charged card, extra active card).

    - a declined top-up's card left active (cancel fault), then charged by another merchant: charged
      without credit; our books still call it active, so only its charge ages out of a run's window;
    - a card Stripe made for a funded top-up that our books lack (e.g. a retried create), left active:
      a run sees it only while its top-up is in the window."""
    stripe_emulator.inject_fault("/v1/issuing/cards/*", **CANCEL_FAULT)
    declined = await topup()
    stripe_emulator.clear_faults()
    assert declined.status.value == "declined" and declined.card_active is True
    stripe_webhook_receiver.approve_authorizations = True
    funded = await topup()
    assert funded.status.value == "succeeded"
    extra = await stripe_client.v1.issuing.cards.create_async(
        params={
            "cardholder": stripe_emulator.state.objects[funded.card_id]["cardholder"],
            "currency": "usd",
            "type": "virtual",
            "status": "active",
            "metadata": {"topup_id": funded.id},
        }
    )
    card = await stripe_gateway.reveal_card(declined.card_id)
    charge = await asyncio.to_thread(
        stripe_emulator.charge_card,
        number=card.number,
        exp_month=card.exp_month,
        exp_year=card.exp_year,
        cvc=card.cvc,
        amount=TOPUP,
        currency="usd",
        merchant_name="Somewhere Else",
    )
    assert charge["approved"] is True
    return declined.card_id, extra.id


@pytest.fixture
def stored_run(db, settings, stripe_gateway, zendit_client: ZenditClient):
    """One reconciliation run at `at`, the Issuing checks stored with the ledger checks as main.py wires
    them (the same moment for both, so the store's window is the checks' window)."""

    async def run(at: datetime) -> LedgerRunResult:
        issuing = ExtraCheck("stripe_issuing", CARD_KINDS, lambda: issuing_mismatches(db, settings, now=at))
        return await run_ledger_checks(
            db,
            zendit=zendit_client,
            stripe=stripe_gateway,
            lookback=timedelta(hours=settings.reconcile_lookback_hours),
            grace=timedelta(minutes=30),
            extra=[issuing],
            now=lambda: at,
        )

    return run


async def test_issuing_mismatches_older_than_the_window_stay_open_until_an_operator_acknowledges_them(
    db,
    settings,
    topup,
    stored_run,
    stripe_emulator,
    stripe_gateway,
    stripe_client,
    stripe_webhook_receiver,
    declining_card_network,
) -> None:
    charged, extra = await leaked_and_extra_cards(
        topup, stripe_emulator, stripe_gateway, stripe_client, stripe_webhook_receiver
    )
    first = await stored_run(after_grace())
    assert (first.open["card_charged_without_credit"], first.open["card_still_active"]) == (1, 1)

    # Past the window no run lists the charge or reads the funded top-up: finding nothing proves nothing.
    later = datetime.now(UTC) + timedelta(hours=settings.reconcile_lookback_hours, days=1)
    aged = await stored_run(later)

    assert set(CARD_KINDS) <= set(aged.kinds_checked) and aged.found["card_still_active"] == 0
    assert aged.resolved == 0
    assert (aged.open["card_charged_without_credit"], aged.open["card_still_active"]) == (1, 1)
    still_open = await mismatch_store.list_mismatches(db, kind=None, include_resolved=False, limit=10)
    assert {(m.kind, m.subject) for m in still_open} == {
        ("card_charged_without_credit", charged),
        ("card_still_active", extra),
    }


async def test_a_card_cancelled_at_stripe_within_the_window_resolves_its_mismatch(
    db, topup, stored_run, stripe_emulator, stripe_client, declining_card_network
) -> None:
    stripe_emulator.inject_fault("/v1/issuing/cards/*", **CANCEL_FAULT)
    declined = await topup()
    stripe_emulator.clear_faults()
    assert declined.card_active is True
    extra = await stripe_client.v1.issuing.cards.create_async(  # one more for it, not in our books
        params={
            "cardholder": stripe_emulator.state.objects[declined.card_id]["cardholder"],
            "currency": "usd",
            "type": "virtual",
            "status": "active",
            "metadata": {"topup_id": declined.id},
        }
    )
    first = await stored_run(after_grace())
    assert first.open["card_still_active"] == 2

    # The operator cancels both in the Dashboard; our books still call the declined top-up's card active.
    for card_id in (declined.card_id, extra.id):
        await stripe_client.v1.issuing.cards.update_async(card_id, params={"status": "canceled"})
    fixed = await stored_run(after_grace())

    assert (fixed.resolved, fixed.open["card_still_active"]) == (2, 0)


async def test_the_issuing_window_is_reconcile_lookback_hours(
    db,
    settings,
    topup,
    stripe_emulator,
    stripe_gateway,
    stripe_client,
    stripe_webhook_receiver,
    declining_card_network,
) -> None:
    await leaked_and_extra_cards(
        topup, stripe_emulator, stripe_gateway, stripe_client, stripe_webhook_receiver
    )
    a_day_later = datetime.now(UTC) + timedelta(hours=26)

    assert len(await issuing_mismatches(db, settings, now=a_day_later)) == 2  # the default: 72 h
    short = settings.model_copy(update={"reconcile_lookback_hours": 25})
    assert await issuing_mismatches(db, short, now=a_day_later) == []


# ------------------------------------------------------------------------ through the reconcile service


@pytest.fixture
async def admin(service_settings) -> AsyncIterator[httpx.AsyncClient]:
    """The reconcile service as `python -m reconcile` builds it (create_app), in-process."""
    async with reconcile_in_process(service_settings, token=TOKEN) as (client, _):
        yield client


@pytest.mark.broker
async def test_the_reconcile_service_reports_a_card_left_active_through_its_admin_api(
    admin, db, topup, stripe_emulator, declining_card_network
) -> None:
    stripe_emulator.inject_fault("/v1/issuing/cards/*", **CANCEL_FAULT)
    declined = await topup()
    stripe_emulator.clear_faults()
    assert declined.card_active is True
    # The top-up ended longer ago than the grace in which funding may still cancel its card.
    await db.execute(
        "UPDATE wallet_topups SET created_at = created_at - $2::interval,"
        " updated_at = updated_at - $2::interval WHERE id = $1",
        declined.id,
        ENDED_GRACE + timedelta(minutes=1),
    )

    response = await admin.post("/api/admin/reconcile/run", headers=AUTH)

    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert "stripe_issuing" not in result["sources_failed"]
    assert result["open"]["card_still_active"] == 1
    listed = await admin.get("/api/admin/mismatches", params={"kind": "card_still_active"}, headers=AUTH)
    [found] = listed.json()["mismatches"]
    assert (found["subject"], found["transaction_id"]) == (declined.card_id, declined.order_ids[0])
    assert found["detail"]["topup_id"] == declined.id
    gauge = REGISTRY.get_sample_value("esim_reconcile_mismatches", {"kind": "card_still_active"})
    assert gauge == 1


async def test_a_card_in_our_books_that_stripe_does_not_have_is_skipped_not_a_source_failure(
    db, settings, topup, stripe_emulator, declining_card_network, caplog
) -> None:
    # Our books can name a card this Stripe account never had: a sandbox database kept across emulator
    # restarts, or a key of another account or mode. Every other card must still be checked.
    stripe_emulator.inject_fault("/v1/issuing/cards/*", **CANCEL_FAULT)
    declined = await topup()
    stripe_emulator.clear_faults()
    ghost = await topup()
    await db.execute(
        "UPDATE issuing_cards SET card_id = 'ic_not_at_this_account', active = true WHERE topup_id = $1",
        ghost.id,
    )
    await db.execute("UPDATE wallet_topups SET card_id = 'ic_not_at_this_account' WHERE id = $1", ghost.id)
    before = REGISTRY.get_sample_value("esim_reconcile_cards_unknown_to_stripe_total") or 0.0

    found = await issuing_mismatches(db, settings, now=after_grace())

    assert kinds(found) == [("card_still_active", declined.card_id)]
    assert REGISTRY.get_sample_value("esim_reconcile_cards_unknown_to_stripe_total") == before + 1
    assert any("unknown to Stripe" in r.getMessage() for r in caplog.records)
