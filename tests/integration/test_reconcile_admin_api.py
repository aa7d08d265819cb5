"""The admin API on the real database and the Zendit emulator: the bearer token first, then the seed's
actions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.fixtures.reconcile_app import reconcile_in_process

pytestmark = [pytest.mark.broker, pytest.mark.db]

TOKEN = "admin-token-for-tests-0123456789"
URL = "/api/admin/reconcile-zendit"


@pytest.fixture
async def admin(service_settings) -> AsyncIterator[httpx.AsyncClient]:
    async with reconcile_in_process(service_settings, token=TOKEN) as (client, _):
        yield client


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def insert_order(
    conn: asyncpg.Connection,
    status: str,
    *,
    price: int = 1000,
    currency: str = "USD",
    paid_minutes_ago: int | None = 1,
    refund_id: str | None = None,
    zendit_status: str | None = None,
    passed_through: tuple[str, ...] = (),
) -> str:
    """An order row in `status`, with the transitions it went through (for the lists that look at them)."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    await conn.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, recipient_email,
                                       recipient_name, status, paid_at, refund_id, zendit_status)
           VALUES ($1, 'ESIM-GLOBAL-30D-5GB', $2, $3, 'c@example.com', 'C', $4,
                   now() - make_interval(mins => $5::int), $6, $7)""",
        txn,
        price,
        currency,
        status,
        paid_minutes_ago,
        refund_id,
        zendit_status,
    )
    previous = "paid"
    for state in (*passed_through, status):
        if state != previous:
            await conn.execute(
                "INSERT INTO order_transitions (transaction_id, from_status, to_status) VALUES ($1, $2, $3)",
                txn,
                previous,
                state,
            )
            previous = state
    return txn


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "wrong", "other-scheme", "longer", "empty"],
)
async def test_without_the_right_bearer_token_the_admin_api_answers_401(admin, headers):
    response = await admin.post(URL, json={"action": "check_balance"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in response.text


async def test_an_unauthenticated_caller_learns_nothing_about_the_body(admin):
    response = await admin.post(URL, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401


async def test_check_balance_answers_the_emulators_wallet_balance_in_minor_units(admin, zendit_emulator):
    zendit_emulator.state.set_balance(12_345)
    response = await admin.post(URL, json={"action": "check_balance"}, headers=auth())
    assert response.status_code == 200
    assert response.json() == {
        "action": "check_balance",
        "balance": {"amount": 12_345, "currency": "USD", "zendit_value": 12_345, "zendit_divisor": 100},
    }


async def test_an_unknown_action_is_refused_with_the_valid_ones_listed(admin):
    response = await admin.post(URL, json={"action": "drop_tables"}, headers=auth())
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    for action in ("check_balance", "list_failed_topups", "list_failed_purchases", "reconcile"):
        assert action in message
    assert "drop_tables" not in response.text  # the input is not echoed


async def test_reconcile_counts_orders_by_status_and_totals_money_per_currency(admin, db):
    async with db.acquire() as conn:
        for _ in range(3):
            await insert_order(conn, "delivered", price=1000)
        await insert_order(conn, "delivered", price=500, currency="EUR")
        refunded = await insert_order(
            conn, "refunded", price=700, refund_id="re_1", passed_through=("topup_failed",)
        )
        stuck = await insert_order(conn, "purchasing", price=900, paid_minutes_ago=45)
        await insert_order(conn, "funding", price=900, paid_minutes_ago=5)  # in flight, not stuck yet
        await insert_order(conn, "pending_payment", price=300, paid_minutes_ago=None)

    response = await admin.post(URL, json={"action": "reconcile", "stuck_after_minutes": 30}, headers=auth())

    assert response.status_code == 200
    body = response.json()
    counts = body["orders_by_status"]
    assert (counts["delivered"], counts["refunded"], counts["purchasing"], counts["funding"]) == (4, 1, 1, 1)
    assert counts["pending_payment"] == 1 and counts["needs_attention"] == 0
    assert body["total_orders"] == 8
    assert body["stuck"]["count"] == 1 and [o["transaction_id"] for o in body["stuck"]["orders"]] == [stuck]
    assert body["paid"] == [
        {"currency": "EUR", "amount": 500},
        {"currency": "USD", "amount": 3000 + 700 + 1800},
    ]
    assert body["refunded"] == [{"currency": "USD", "amount": 700}]
    assert body["zendit_balance"]["amount"] == 100_00 and body["zendit_error"] is None
    assert refunded not in {o["transaction_id"] for o in body["stuck"]["orders"]}


async def test_reconcile_still_reports_our_figures_when_zendit_is_down(admin, db, zendit_emulator):
    zendit_emulator.control("POST", "faults", {"endpoint": "get_balance", "count": 5, "status": 503})
    response = await admin.post(URL, json={"action": "reconcile"}, headers=auth())
    assert response.status_code == 200
    assert response.json()["zendit_balance"] is None and "Zendit" in response.json()["zendit_error"]


async def test_check_balance_while_zendit_is_down_is_a_503_not_a_crash(admin, zendit_emulator):
    zendit_emulator.control("POST", "faults", {"endpoint": "get_balance", "count": 5, "status": 503})
    response = await admin.post(URL, json={"action": "check_balance"}, headers=auth())
    assert response.status_code == 503 and response.json() == {"detail": "Zendit is unavailable"}


async def test_failed_topups_lists_the_orders_funding_failed_for_and_the_failed_topups(admin, db):
    async with db.acquire() as conn:
        waiting = await insert_order(conn, "topup_failed")
        refunded = await insert_order(conn, "refunded", refund_id="re_2", passed_through=("topup_failed",))
        await insert_order(conn, "refunded", refund_id="re_3", passed_through=("purchase_failed",))
        await insert_order(conn, "delivered")
        await conn.execute(
            """INSERT INTO wallet_topups (id, amount, currency, status, failure_reason)
               VALUES ('top-declined', 5000, 'USD', 'declined', 'card_declined'),
                      ('top-ok', 5000, 'USD', 'succeeded', NULL),
                      ('top-failed', 7000, 'USD', 'failed', 'gateway_error')"""
        )

    response = await admin.post(URL, json={"action": "list_failed_topups"}, headers=auth())

    assert response.status_code == 200
    body = response.json()
    assert {o["transaction_id"] for o in body["orders"]} == {waiting, refunded}
    assert {(t["id"], t["status"], t["amount"]) for t in body["topups"]} == {
        ("top-declined", "declined", 5000),
        ("top-failed", "failed", 7000),
    }


async def test_failed_purchases_lists_orders_whose_zendit_purchase_failed(admin, db):
    async with db.acquire() as conn:
        failed = await insert_order(conn, "purchase_failed", zendit_status="FAILED")
        refunded = await insert_order(conn, "refunded", refund_id="re_4", passed_through=("purchase_failed",))
        given_up = await insert_order(conn, "needs_attention", passed_through=("purchasing",))
        await insert_order(conn, "refunded", refund_id="re_5", passed_through=("topup_failed",))

    response = await admin.post(URL, json={"action": "list_failed_purchases", "limit": 10}, headers=auth())

    assert response.status_code == 200
    assert {o["transaction_id"] for o in response.json()["orders"]} == {failed, refunded, given_up}


async def test_the_admin_api_is_documented_with_its_request_and_responses(admin):
    spec = (await admin.get("/openapi.json")).json()
    operation = spec["paths"][URL]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["action"]["enum"] == [
        "check_balance",
        "list_failed_topups",
        "list_failed_purchases",
        "reconcile",
    ]
    assert {"200", "401", "422", "502", "503"} <= set(operation["responses"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
