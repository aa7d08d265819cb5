"""Scheduled reconciliation's ledger checks against the real database and the Stripe and Zendit
emulators: each mismatch kind made on purpose, listed by the admin API and counted by the metric; a fixed
one resolved by the next run; a provider outage resolving nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from esim_common.providers.stripe import CaptureMethod, StripeGateway
from esim_common.providers.zendit import ZenditClient
from reconcile import mismatch_store
from reconcile.ledger_checks import ExtraCheck, run_ledger_checks, run_with_settings, scheduled_check
from reconcile.mismatches import Mismatch
from tests.fixtures.polling import eventually
from tests.fixtures.reconcile_app import reconcile_in_process

pytestmark = [pytest.mark.broker, pytest.mark.db]

TOKEN = "admin-token-for-ledger-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OFFER = "ESIM-GLOBAL-30D-5GB"  # costs 23.00 + 1.15 USD at the emulator
COST = 2415
PRICE = 3900


@pytest.fixture
async def admin(service_settings) -> AsyncIterator[httpx.AsyncClient]:
    async with reconcile_in_process(service_settings, token=TOKEN) as (client, _):
        yield client


async def run(admin: httpx.AsyncClient) -> dict[str, Any]:
    response = await admin.post("/api/admin/reconcile/run", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def listed(admin: httpx.AsyncClient, **query: Any) -> list[dict[str, Any]]:
    response = await admin.get("/api/admin/mismatches", params=query, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["mismatches"]


def gauge(kind: str) -> float | None:
    return REGISTRY.get_sample_value("esim_reconcile_mismatches", {"kind": kind})


def source_errors(source: str) -> float:
    return REGISTRY.get_sample_value("esim_reconcile_source_errors_total", {"source": source}) or 0.0


async def paid_order(
    db: asyncpg.Pool,
    stripe_gateway: StripeGateway,
    stripe_emulator: Any,
    *,
    status: str,
    zendit_status: str | None = None,
    zendit_cost: int = COST,
) -> tuple[str, str]:
    """An order paid through the Stripe emulator two hours ago (past the grace period): (txn, intent)."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    session = await stripe_gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE,
        currency="USD",
        product_name=OFFER,
        success_url="http://shop.test/ok",
        cancel_url="http://shop.test/cancel",
    )
    intent = (await asyncio.to_thread(stripe_emulator.pay, session.id))["payment_intent"]["id"]
    await db.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, zendit_cost,
                                       zendit_cost_currency, recipient_email, recipient_name, status,
                                       stripe_payment_intent_id, paid_at, zendit_transaction_id,
                                       zendit_status)
           VALUES ($1, $2, $3, 'USD', $4, 'USD', 'c@example.com', 'C', $5, $6, now() - interval '2 hours',
                   $1, $7)""",
        txn,
        OFFER,
        PRICE,
        zendit_cost,
        status,
        intent,
        zendit_status,
    )
    return txn, intent


async def bought(zendit_client: ZenditClient, transaction_id: str) -> None:
    """A purchase placed at the Zendit emulator, waited for until DONE."""
    await zendit_client.purchase(transaction_id=transaction_id, offer_id=OFFER)

    async def done() -> bool:
        return (await zendit_client.get_purchase(transaction_id)).status == "DONE"

    await eventually(done, within=10, what=f"purchase {transaction_id} DONE")


def subjects(mismatches: list[dict[str, Any]], kind: str) -> set[str]:
    return {m["subject"] for m in mismatches if m["kind"] == kind}


async def test_every_ledger_kind_made_on_purpose_is_listed_and_counted(
    admin, db, stripe_gateway, stripe_emulator, zendit_client, zendit_emulator
):
    await run(admin)  # the wallet anchor: the balance as the ledger explains it now
    # paid_not_purchased: paid two hours ago, no purchase at Zendit, nothing refunded.
    unbought, _ = await paid_order(db, stripe_gateway, stripe_emulator, status="funded")
    # purchased_unknown: a purchase made at Zendit under an id none of our orders has.
    foreign = f"foreign-{uuid.uuid4().hex[:10]}"
    await bought(zendit_client, foreign)
    # refunded_and_delivered: delivered (DONE at Zendit), then refunded in Stripe by hand.
    delivered, intent = await paid_order(
        db, stripe_gateway, stripe_emulator, status="delivered", zendit_status="DONE"
    )
    await bought(zendit_client, delivered)
    await stripe_gateway.create_refund(transaction_id=delivered, payment_intent_id=intent)
    # wallet_balance_drift (debit): Zendit took 24.15 for an order we recorded at 20.00.
    cheap, _ = await paid_order(
        db, stripe_gateway, stripe_emulator, status="delivered", zendit_status="DONE", zendit_cost=2000
    )
    await bought(zendit_client, cheap)
    # wallet_balance_drift (balance): money appears in the wallet without a ledger row.
    wallet = zendit_emulator.control("GET", "state")["wallet"]
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"] + 1234})

    result = await run(admin)

    assert result["sources_failed"] == {}
    assert result["open"] | {"card_charged_without_credit": 0, "card_still_active": 0} == {
        "paid_not_purchased": 1,
        "purchased_unknown": 1,
        "refunded_and_delivered": 1,
        "card_charged_without_credit": 0,
        "card_still_active": 0,
        "wallet_balance_drift": 2,
    }
    mismatches = await listed(admin)
    assert subjects(mismatches, "paid_not_purchased") == {unbought}
    assert subjects(mismatches, "purchased_unknown") == {foreign}
    assert subjects(mismatches, "refunded_and_delivered") == {delivered}
    assert subjects(mismatches, "wallet_balance_drift") == {"USD", cheap}
    drift = next(m for m in mismatches if m["subject"] == "USD")
    assert drift["detail"]["drift"] == 1234
    debit = next(m for m in mismatches if m["subject"] == cheap)
    assert (debit["detail"]["ledger_amount"], debit["detail"]["recorded_cost"]) == (COST, 2000)
    assert all(m["resolved_at"] is None for m in mismatches)
    for kind in ("paid_not_purchased", "purchased_unknown", "refunded_and_delivered"):
        assert gauge(kind) == 1
    assert gauge("wallet_balance_drift") == 2
    assert gauge("card_still_active") == 0  # every kind is present, 0 included

    only = await listed(admin, kind="purchased_unknown")
    assert [m["subject"] for m in only] == [foreign]
    seed = await admin.post("/api/admin/reconcile-zendit", json={"action": "reconcile"}, headers=AUTH)
    assert seed.json()["mismatches"]["paid_not_purchased"] == 1


async def test_a_fixed_mismatch_is_resolved_by_the_next_run(
    admin, db, stripe_gateway, stripe_emulator, zendit_emulator
):
    await run(admin)
    txn, intent = await paid_order(db, stripe_gateway, stripe_emulator, status="needs_attention")
    wallet = zendit_emulator.control("GET", "state")["wallet"]
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"] - 500})
    first = await run(admin)
    assert first["open"]["paid_not_purchased"] == 1
    assert first["open"]["wallet_balance_drift"] == 1
    assert first["opened"] == 2

    # The operator refunds the customer; Zendit puts the balance right.
    await stripe_gateway.create_refund(transaction_id=txn, payment_intent_id=intent)
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"]})
    second = await run(admin)

    assert second["resolved"] == 2
    assert second["open"]["paid_not_purchased"] == 0
    assert second["open"]["wallet_balance_drift"] == 0
    assert gauge("paid_not_purchased") == 0
    assert await listed(admin) == []
    history = await listed(admin, include_resolved="true")
    assert {m["subject"] for m in history} == {txn, "USD"}
    assert all(m["resolved_at"] is not None for m in history)


async def test_a_zendit_outage_resolves_nothing_and_is_counted(admin, db, zendit_client, zendit_emulator):
    foreign = f"foreign-{uuid.uuid4().hex[:10]}"
    await bought(zendit_client, foreign)
    await run(admin)
    wallet = zendit_emulator.control("GET", "state")["wallet"]
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"] + 1})
    assert (await run(admin))["open"]["wallet_balance_drift"] == 1
    before = source_errors("zendit_purchases"), source_errors("zendit_ledger")

    zendit_emulator.control("POST", "faults", {"endpoint": "list_purchases", "count": 100, "status": 503})
    zendit_emulator.control("POST", "faults", {"endpoint": "list_transactions", "count": 100, "status": 503})
    during = await run(admin)

    assert set(during["sources_failed"]) == {"zendit_purchases", "zendit_ledger"}
    assert "purchased_unknown" not in during["kinds_checked"]
    assert "wallet_balance_drift" not in during["kinds_checked"]
    assert during["resolved"] == 0
    assert during["open"]["purchased_unknown"] == 1
    assert during["open"]["wallet_balance_drift"] == 1
    assert subjects(await listed(admin), "purchased_unknown") == {foreign}
    assert (source_errors("zendit_purchases"), source_errors("zendit_ledger")) == (
        before[0] + 1,
        before[1] + 1,
    )
    runs = await db.fetch("SELECT sources_failed FROM reconcile_runs ORDER BY id")
    assert sorted(runs[-1]["sources_failed"]) == ["zendit_ledger", "zendit_purchases"]


async def test_refunds_are_listed_from_the_window_start_only(stripe_gateway, stripe_emulator):
    """The Stripe emulator honours `created[gte]` as Stripe does (reconciliation reads a bounded window)."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    session = await stripe_gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE,
        currency="USD",
        product_name=OFFER,
        success_url="http://shop.test/ok",
        cancel_url="http://shop.test/cancel",
    )
    intent = (await asyncio.to_thread(stripe_emulator.pay, session.id))["payment_intent"]["id"]
    made = await stripe_gateway.create_refund(transaction_id=txn, payment_intent_id=intent)
    created = stripe_emulator.state.get("refund", made.id)["created"]
    assert made.id in {r.id for r in await stripe_gateway.list_refunds(created_gte=created)}
    assert made.id not in {r.id for r in await stripe_gateway.list_refunds(created_gte=created + 1)}


async def test_an_unknown_kind_is_refused_with_the_valid_ones_listed(admin):
    response = await admin.get("/api/admin/mismatches", params={"kind": "everything"}, headers=AUTH)
    assert response.status_code == 422
    assert "paid_not_purchased" in response.json()["detail"]
    assert (await admin.get("/api/admin/mismatches")).status_code == 401
    assert (await admin.post("/api/admin/reconcile/run")).status_code == 401


async def test_extra_producers_are_stored_with_the_ledger_kinds_and_a_failing_one_resolves_nothing(
    db, service_settings
):
    card = Mismatch(kind="card_still_active", subject="ic_123", detail={"topup_id": "tu_1"})

    async def finds_a_card() -> list[Mismatch]:
        return [card]

    async def stripe_down() -> list[Mismatch]:
        raise ConnectionError("Stripe Issuing unavailable")

    def issuing(produce) -> list[ExtraCheck]:
        return [ExtraCheck("stripe_issuing", ("card_charged_without_credit", "card_still_active"), produce)]

    sweep_check = scheduled_check(lambda: db, service_settings, extra=lambda: issuing(finds_a_card))
    first = await sweep_check()  # as the sweep runs it
    assert "card_still_active" in first.kinds_checked
    assert first.open["card_still_active"] == 1
    assert gauge("card_still_active") == 1
    errors = source_errors("stripe_issuing")

    down = await run_with_settings(db, service_settings, extra=issuing(stripe_down))

    assert down.sources_failed == {"stripe_issuing": "ConnectionError"}
    assert "card_still_active" not in down.kinds_checked
    assert "purchased_unknown" in down.kinds_checked  # the ledger kinds were still checked
    assert down.resolved == 0
    assert down.open["card_still_active"] == 1
    assert source_errors("stripe_issuing") == errors + 1

    async def finds_nothing() -> list[Mismatch]:
        return []

    cleared = await run_with_settings(db, service_settings, extra=issuing(finds_nothing))
    assert (cleared.resolved, cleared.open["card_still_active"]) == (1, 0)

    async def strays() -> list[Mismatch]:  # a kind it did not declare could never be resolved
        return [Mismatch(kind="purchased_unknown", subject="x")]

    stray = await run_with_settings(db, service_settings, extra=issuing(strays))
    assert stray.sources_failed == {"stripe_issuing": "ValueError"}
    assert stray.open["purchased_unknown"] == 0


async def test_an_operator_accepts_the_wallet_balance_and_the_drift_is_resolved(admin, db, zendit_emulator):
    await run(admin)
    wallet = zendit_emulator.control("GET", "state")["wallet"]
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"] + 700})
    assert (await run(admin))["open"]["wallet_balance_drift"] == 1
    assert (await run(admin))["open"]["wallet_balance_drift"] == 1  # it stays until someone acts

    refused = await admin.post("/api/admin/reconcile/wallet/accept", json={}, headers=AUTH)
    assert refused.status_code == 422
    accepted = await admin.post(
        "/api/admin/reconcile/wallet/accept", json={"note": "Zendit credited a goodwill 7.00"}, headers=AUTH
    )
    assert accepted.json() == {"accepted": True, "currency": "USD"}
    after = await run(admin)

    assert after["open"]["wallet_balance_drift"] == 0
    assert after["resolved"] == 1
    action = await db.fetchrow("SELECT action, note, detail FROM operator_actions")
    assert (action["action"], action["note"]) == ("accept_wallet_balance", "Zendit credited a goodwill 7.00")


async def test_a_mismatch_older_than_the_window_stays_open_until_an_operator_acknowledges_it(
    admin, db, zendit_client, stripe_gateway
):
    foreign = f"foreign-{uuid.uuid4().hex[:10]}"
    await bought(zendit_client, foreign)
    await run(admin)

    # Three days later the purchase has left the window: no run can see it, so none may resolve it.
    later = datetime.now(UTC) + timedelta(hours=73)
    aged = await run_ledger_checks(
        db,
        zendit=zendit_client,
        stripe=stripe_gateway,
        lookback=timedelta(hours=72),
        grace=timedelta(minutes=30),
        now=lambda: later,
    )
    assert "purchased_unknown" in aged.kinds_checked
    assert (aged.resolved, aged.open["purchased_unknown"]) == (0, 1)

    [open_one] = await listed(admin, kind="purchased_unknown")
    url = f"/api/admin/mismatches/{open_one['id']}/acknowledge"
    assert (await admin.post(url, json={}, headers=AUTH)).status_code == 422
    done = await admin.post(url, json={"note": "a test purchase from the console"}, headers=AUTH)
    assert done.status_code == 200, done.text
    assert (await admin.post(url, json={"note": "again"}, headers=AUTH)).status_code == 409
    unknown = "/api/admin/mismatches/999999/acknowledge"
    assert (await admin.post(unknown, json={"note": "x"}, headers=AUTH)).status_code == 404

    assert await listed(admin) == []
    [closed] = await listed(admin, include_resolved="true", kind="purchased_unknown")
    assert closed["resolution_note"] == "a test purchase from the console"
    action = await db.fetchrow("SELECT action, detail::text AS detail FROM operator_actions")
    assert action["action"] == "acknowledge_mismatch"
    assert foreign in action["detail"]

    # Acknowledged for good: a run that still sees the purchase inside its window opens no new row.
    assert (await run(admin))["open"]["purchased_unknown"] == 0
    assert len(await listed(admin, include_resolved="true", kind="purchased_unknown")) == 1


async def test_the_balance_drift_is_settled_by_accepting_the_balance_not_by_acknowledging(
    admin, zendit_emulator
):
    await run(admin)
    wallet = zendit_emulator.control("GET", "state")["wallet"]
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"] + 700})
    await run(admin)
    [drift] = await listed(admin, kind="wallet_balance_drift")

    refused = await admin.post(
        f"/api/admin/mismatches/{drift['id']}/acknowledge", json={"note": "looks fine"}, headers=AUTH
    )

    assert refused.status_code == 409
    assert "wallet/accept" in refused.json()["detail"]
    assert [m["id"] for m in await listed(admin, kind="wallet_balance_drift")] == [drift["id"]]


async def test_an_accepted_balance_is_not_undone_by_a_run_that_read_the_old_anchor(
    admin, db, zendit_emulator, monkeypatch
):
    await run(admin)  # sets the anchor
    wallet = zendit_emulator.control("GET", "state")["wallet"]
    zendit_emulator.control("POST", "wallet", {"balance": wallet["balance"] + 700})
    assert (await run(admin))["open"]["wallet_balance_drift"] == 1
    read, go = asyncio.Event(), asyncio.Event()
    real_anchor = mismatch_store.wallet_anchor

    async def anchor_then_wait(pool: asyncpg.Pool) -> Any:
        anchor = await real_anchor(pool)
        read.set()
        await go.wait()
        return anchor

    monkeypatch.setattr(mismatch_store, "wallet_anchor", anchor_then_wait)
    during = asyncio.create_task(run(admin))
    await read.wait()
    accepted = await admin.post("/api/admin/reconcile/wallet/accept", json={"note": "settled"}, headers=AUTH)
    assert accepted.json()["accepted"] is True
    go.set()
    await during
    monkeypatch.setattr(mismatch_store, "wallet_anchor", real_anchor)

    await run(admin)  # sets a fresh anchor from today's balance: no drift any more
    assert (await run(admin))["open"]["wallet_balance_drift"] == 0


def conflicts(stripe_status: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "esim_reconcile_payment_state_conflicts_total", {"stripe_status": stripe_status}
        )
        or 0.0
    )


async def checkout(gateway: StripeGateway, txn: str, *, capture: CaptureMethod = "automatic") -> str:
    session = await gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE,
        currency="USD",
        product_name=OFFER,
        success_url="http://shop.test/ok",
        cancel_url="http://shop.test/cancel",
        capture_method=capture,
    )
    return session.id


async def pending_order(db: asyncpg.Pool, txn: str, session_id: str) -> None:
    """The order as create-checkout-session leaves it: pending_payment, no PaymentIntent yet."""
    await db.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, zendit_cost,
                                       zendit_cost_currency, recipient_email, recipient_name, status,
                                       stripe_checkout_session_id)
           VALUES ($1, $2, $3, 'USD', $4, 'USD', 'c@example.com', 'C', 'pending_payment', $5)""",
        txn,
        OFFER,
        PRICE,
        COST,
        session_id,
    )


async def test_a_payment_whose_webhook_never_came_is_reported_after_the_grace_and_resolved_once_recorded(
    admin, db, make_stripe_emulator, stripe_webhook_receiver, zendit_client
):
    stripe_emulator = make_stripe_emulator()  # its own: the list holds only this test's payments
    stripe_emulator.set_webhook(stripe_webhook_receiver.url)
    stripe_emulator.set_delivery(hold=True)  # Stripe keeps the events: our webhook never hears of them
    async with StripeGateway(api_key=stripe_emulator.api_key, api_base=stripe_emulator.url) as stripe:
        txn = f"txn-{uuid.uuid4().hex[:16]}"
        session_id = await checkout(stripe, txn)
        await pending_order(db, txn, session_id)
        paid = await asyncio.to_thread(stripe_emulator.pay, session_id)
        intent = paid["payment_intent"]["id"]
        # Money for a transaction id none of our orders has, and another integration's payment.
        lost_session = await checkout(stripe, f"txn-lost-{uuid.uuid4().hex[:8]}")
        lost = (await asyncio.to_thread(stripe_emulator.pay, lost_session))["payment_intent"]["id"]
        async with stripe_emulator.sdk() as sdk:
            other = await sdk.v1.checkout.sessions.create_async(
                params={
                    "mode": "payment",
                    "line_items": [
                        {
                            "price_data": {
                                "currency": "usd",
                                "unit_amount": 500,
                                "product_data": {"name": "T-shirt"},
                            },
                            "quantity": 1,
                        }
                    ],
                    "success_url": "http://other.test/ok",
                }
            )
        foreign = (await asyncio.to_thread(stripe_emulator.pay, other.id))["payment_intent"]["id"]
        assert stripe_webhook_receiver.received == []
        assert await db.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn) == (
            "pending_payment"
        )

        async def reconcile(at: datetime) -> Any:
            return await run_ledger_checks(
                db,
                zendit=zendit_client,
                stripe=stripe,
                lookback=timedelta(hours=72),
                grace=timedelta(minutes=30),
                now=lambda: at,
            )

        within_grace = await reconcile(datetime.now(UTC))  # the webhook may still be on its way
        assert "paid_not_purchased" in within_grace.kinds_checked
        assert within_grace.open["paid_not_purchased"] == 0

        later = datetime.now(UTC) + timedelta(minutes=31)
        first = await reconcile(later)
        assert first.sources_failed == {}
        assert (first.found["paid_not_purchased"], first.open["paid_not_purchased"]) == (2, 2)
        assert gauge("paid_not_purchased") == 2
        mismatches = await listed(admin, kind="paid_not_purchased")
        assert {m["subject"] for m in mismatches} == {txn, lost}  # not `foreign`: not ours
        ours = next(m for m in mismatches if m["subject"] == txn)
        assert ours["transaction_id"] == txn
        assert {
            k: ours["detail"][k] for k in ("reason", "status", "payment_intent", "amount", "currency")
        } == {
            "reason": "payment_not_recorded",
            "status": "pending_payment",
            "payment_intent": intent,
            "amount": PRICE,
            "currency": "USD",
        }
        assert ours["detail"]["payment_intent_status"] == "succeeded"
        assert foreign not in str(mismatches)

        # The payment is recorded after all (say an operator replayed the events and the order was
        # fulfilled); the stray payment is refunded. While Stripe cannot be read, nothing is resolved.
        await db.execute(
            """UPDATE esim_purchases SET status = 'delivered', paid_at = now(), stripe_payment_intent_id = $2,
                                         zendit_transaction_id = $1, zendit_status = 'DONE'
                WHERE transaction_id = $1""",
            txn,
            intent,
        )
        await bought(zendit_client, txn)
        await stripe.create_refund(transaction_id="lost", payment_intent_id=lost)
        errors = source_errors("stripe_payment_intents")
        stripe_emulator.inject_fault("/v1/payment_intents", method="GET", status=503, count=100)
        during = await reconcile(later + timedelta(seconds=1))
        assert during.sources_failed == {"stripe_payment_intents": "StripeTransientError"}
        assert "paid_not_purchased" not in during.kinds_checked
        assert (during.resolved, during.open["paid_not_purchased"]) == (0, 2)
        assert source_errors("stripe_payment_intents") == errors + 1

        stripe_emulator.clear_faults()
        fixed = await reconcile(later + timedelta(seconds=2))

    assert "paid_not_purchased" in fixed.kinds_checked
    assert (fixed.resolved, fixed.open["paid_not_purchased"]) == (2, 0)
    assert gauge("paid_not_purchased") == 0
    assert await listed(admin, kind="paid_not_purchased") == []


async def test_a_paid_order_whose_payment_intent_took_nothing_is_warned_about_and_counted(
    db, make_stripe_emulator, zendit_client, caplog
):
    stripe_emulator = make_stripe_emulator()
    async with StripeGateway(api_key=stripe_emulator.api_key, api_base=stripe_emulator.url) as stripe:
        txn = f"txn-{uuid.uuid4().hex[:16]}"
        session_id = await checkout(stripe, txn, capture="manual")
        await pending_order(db, txn, session_id)
        intent = (await asyncio.to_thread(stripe_emulator.pay, session_id))["payment_intent"]["id"]
        await db.execute(
            """UPDATE esim_purchases SET status = 'paid', paid_at = now(), stripe_payment_intent_id = $2,
                                         capture_method = 'manual'
                WHERE transaction_id = $1""",
            txn,
            intent,
        )
        held = await run_ledger_checks(
            db,
            zendit=zendit_client,
            stripe=stripe,
            lookback=timedelta(hours=72),
            grace=timedelta(minutes=30),
        )
        assert held.open["paid_not_purchased"] == 0  # authorised and recorded: fine
        before = conflicts("canceled")

        # Someone cancels the authorisation in the Stripe dashboard: no money will come for this order.
        await stripe.cancel_payment_intent(transaction_id=txn, payment_intent_id=intent)
        caplog.set_level("WARNING", logger="esim.reconcile.ledger")
        await run_ledger_checks(
            db,
            zendit=zendit_client,
            stripe=stripe,
            lookback=timedelta(hours=72),
            grace=timedelta(minutes=30),
        )

    assert conflicts("canceled") == before + 1
    [warning] = [r for r in caplog.records if r.getMessage().startswith("order is paid in our records")]
    assert (warning.levelname, warning.transaction_id, warning.payment_intent) == ("WARNING", txn, intent)
