"""esimctl against the real reconcile service over HTTP (uvicorn on a free port, the real database,
broker and Zendit emulator): the CLI and the admin API agree on paths, parameters and answers."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import uvicorn
from pydantic import SecretStr

from esim_common.money import Money
from esim_common.order_repository import create_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from reconcile.cli import main
from reconcile.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

TOKEN = "admin-token-for-tests-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def reconcile_url(service_settings) -> AsyncIterator[str]:
    settings = service_settings.model_copy(update={"admin_api_token": SecretStr(TOKEN)})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "the reconcile service did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def esimctl(url: str, *argv: str) -> int:
    return await asyncio.to_thread(main, ["--url", url, *argv])


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("ADMIN_API_TOKEN", TOKEN)


async def stuck_order(db, *path: OrderStatus) -> str:
    txn = f"txn_{uuid.uuid4().hex[:24]}"
    async with db.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-US-7D-1GB",
            price=Money(1299, "USD"),
            zendit_cost=Money(450, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada",
        )
        for state in path:
            await transition(conn, txn, state, reason="test")
        await conn.execute(
            "UPDATE order_transitions SET at = now() - interval '2 hours' WHERE transaction_id = $1",
            txn,
        )
        await conn.execute(
            "UPDATE esim_purchases SET updated_at = now() - interval '2 hours' WHERE transaction_id = $1", txn
        )
    return txn


async def test_orders_stuck_and_show_find_an_order_left_in_funded(reconcile_url, db, capsys):
    S = OrderStatus
    txn = await stuck_order(db, S.PAID, S.FUNDING, S.FUNDED)
    fresh = await stuck_order(db, S.PAID, S.FUNDING, S.FUNDED)
    async with db.acquire() as conn:  # this one moved a moment ago: not stuck
        await conn.execute("UPDATE order_transitions SET at = now() WHERE transaction_id = $1", fresh)
        await conn.execute("UPDATE esim_purchases SET updated_at = now() WHERE transaction_id = $1", fresh)

    assert await esimctl(reconcile_url, "orders", "stuck", "--older-than", "60") == 0
    listed = json.dumps(json.loads(capsys.readouterr().out))
    assert txn in listed and fresh not in listed

    assert await esimctl(reconcile_url, "orders", "show", txn) == 0
    timeline = json.loads(capsys.readouterr().out)
    assert txn in json.dumps(timeline) and "funded" in json.dumps(timeline)


async def test_balance_and_dlq_list_answer_and_a_refusal_exits_1(reconcile_url, capsys):
    assert await esimctl(reconcile_url, "balance") == 0
    assert json.loads(capsys.readouterr().out)["balance"]["currency"]

    assert await esimctl(reconcile_url, "dlq", "list") == 0
    queues = json.loads(capsys.readouterr().out)
    assert any(q["queue"].endswith("funding.order-paid.dlq") for q in queues["queues"])

    assert await esimctl(reconcile_url, "orders", "redrive", "txn_" + "0" * 24) == 1
    assert "404" in capsys.readouterr().err


async def test_a_wrong_token_exits_1_with_a_401_and_never_prints_the_token(
    reconcile_url, monkeypatch, capsys
):
    monkeypatch.setenv("ADMIN_API_TOKEN", "not-the-token-0123456789")
    assert await esimctl(reconcile_url, "orders", "stuck") == 1
    captured = capsys.readouterr()
    assert "401" in captured.err and "not-the-token" not in captured.err + captured.out
