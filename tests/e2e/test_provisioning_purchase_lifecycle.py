"""End to end, the whole system as processes: a Zendit purchase that ends FAILED with INSUFFICIENT_FUNDS
sends the order back to funding, which funds it again; the next attempt has its own Zendit id
(`<txn>-r2`) and the customer gets one email with that purchase's eSIM. Nothing is refunded."""

from __future__ import annotations

import io
import uuid

import asyncpg
import PIL.Image
import pytest
import zxingcpp

from esim_common.lpa import lpa_string
from tests.e2e.test_paid_order_becomes_emailed_esim import (
    checkout,
    emails_to,
    pay,
    purchases_of,
    stripe_client,
    wait_for_final,
    zendit,
    zendit_control,
)

pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.timeout(180)]

# Two purchase attempts (2 s each in the sandbox), two funding rounds, polls and an email.
ORDER_TIMEOUT_SECONDS = 60


async def test_insufficient_funds_at_zendit_is_funded_again_and_delivered_under_a_new_id_with_one_email(
    stack,
):
    zendit_control(stack, "POST", "wallet", {"balance": 1_000_000})  # funding needs no top-up
    # Zendit fails the next purchase for lack of funds whatever the balance: another order's debit
    # landed between funding's balance check and the purchase.
    zendit_control(stack, "POST", "purchase_failures", {"code": "INSUFFICIENT_FUNDS", "count": 1})
    recipient = f"short-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    txn = session["transactionId"]
    paid = pay(stack, session["sessionId"])

    order = await wait_for_final(stack, txn, timeout=ORDER_TIMEOUT_SECONDS)

    assert order["status"] == "delivered", order["failure_reason"]
    attempts = {
        zendit_id: (purchase["status"], (purchase["error"] or {}).get("code"))
        for zendit_id, purchase in purchases_of(stack, txn).items()
    }
    assert attempts == {txn: ("FAILED", "INSUFFICIENT_FUNDS"), f"{txn}-r2": ("DONE", None)}
    assert order["zendit_transaction_id"] == f"{txn}-r2" and order["purchase_attempts"] == 2
    conn = await asyncpg.connect(stack.database_url)
    try:
        timeline = [
            r["to_status"]
            for r in await conn.fetch(
                "SELECT to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id", txn
            )
        ]
    finally:
        await conn.close()
    # purchasing → funding → funded → purchasing: the second round is funding's, as the first was.
    assert timeline.count("funded") == 2 and timeline.count("purchasing") == 2
    assert "purchase_failed" not in timeline and "refund_pending" not in timeline
    assert stripe_client(stack).v1.refunds.list({"payment_intent": paid["payment_intent"]["id"]}).data == []

    # One email (delivered means emailed), whose QR code is the second purchase's eSIM.
    [message] = emails_to(stack, recipient)
    confirmation = zendit(stack, f"esim/purchases/{txn}-r2").json()["confirmation"]
    images = [part for part in message.walk() if part.get_content_type() == "image/png"]
    decoded = {
        result.text
        for part in images
        for result in zxingcpp.read_barcodes(PIL.Image.open(io.BytesIO(part.get_content())))
    }
    assert decoded == {lpa_string(confirmation["smdpAddress"], confirmation["activationCode"])}
