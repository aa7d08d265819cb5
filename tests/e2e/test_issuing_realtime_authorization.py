"""End to end: with the Stripe emulator asking the webhook service's real-time authorisation endpoint before
every Issuing charge (as `make run` and this stack configure it), the wallet top-up still goes through,
and it is our endpoint that approved it."""

from __future__ import annotations

import uuid

import httpx
import pytest

from esim_sandbox.stack import ISSUING_AUTHORIZATION_PATH, Stack
from tests.e2e.test_paid_order_becomes_emailed_esim import checkout, pay, wait_for_final, zendit_control

pytestmark = [pytest.mark.broker, pytest.mark.db]


def sandbox_events(stack: Stack, event_type: str) -> list[dict]:
    response = httpx.get(f"{stack.url('stripe')}/_sandbox/events", params={"type": event_type}, timeout=10)
    response.raise_for_status()
    return list(response.json()["data"])


async def test_the_topup_card_charge_is_approved_by_our_real_time_endpoint(stack: Stack):
    zendit_control(stack, "POST", "wallet", {"balance": 0})  # short: the order needs a card top-up
    session = checkout(stack, f"rt-{uuid.uuid4().hex[:6]}@example.com")
    pay(stack, session["sessionId"])
    order = await wait_for_final(stack, session["transactionId"])

    assert order["status"] == "delivered", order["failure_reason"]
    [asked] = sandbox_events(stack, "issuing_authorization.request")
    assert asked["delivery"]["url"] == f"{stack.url('webhook')}{ISSUING_AUTHORIZATION_PATH}"
    assert [a["status_code"] for a in asked["delivery"]["attempts"]] == [200]
    [created] = sandbox_events(stack, "issuing_authorization.created")
    authorization = created["event"]["data"]["object"]
    assert authorization["approved"] is True
    assert authorization["request_history"][-1]["reason"] == "webhook_approved"
    metrics = httpx.get(f"{stack.url('webhook')}/metrics", timeout=10).text
    assert 'esim_issuing_authorizations_total{decision="approved",reason="topup_match"} 1.0' in metrics
