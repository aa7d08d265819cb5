"""End to end with QR codes in Supabase Storage: the five services and the sandbox as processes, the
provisioning service configured with SUPABASE_URL and the sandbox's service-role key, the bucket
private, `qr_code_url` a signed URL.

The PNG attached to the email is not the stored object: notify renders its own QR code from the LPA
it builds from the order's SM-DP+ address and activation code. So the test proves that the two images,
made apart from each other, decode to the same LPA (the one Zendit's purchase confirmation gives), not
that the email carries the stored bytes.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import httpx
import PIL.Image
import pytest
import zxingcpp

from esim_common.lpa import lpa_string
from esim_sandbox.stack import Stack
from tests.e2e.test_paid_order_becomes_emailed_esim import checkout, emails_to, pay, wait_for_final, zendit

pytestmark = [pytest.mark.broker, pytest.mark.db]


@pytest.fixture(scope="module")
def supabase_stack(e2e_database_url: str, amqp_url: str, tmp_path_factory) -> Iterator[Stack]:
    running = Stack(
        database_url=e2e_database_url,
        amqp_url=amqp_url,
        workdir=tmp_path_factory.mktemp("supabase-stack"),
        topology_prefix=f"e2e-{uuid.uuid4().hex[:8]}.",
        storage="supabase",
    )
    try:
        running.start()
        yield running
    finally:
        running.stop(delete_topology=True)


def decode(png: bytes) -> set[str]:
    return {r.text for r in zxingcpp.read_barcodes(PIL.Image.open(io.BytesIO(png)))}


async def test_a_delivered_order_has_its_qr_code_in_the_bucket_and_in_the_email_both_reading_as_the_lpa(
    supabase_stack,
):
    stack = supabase_stack
    recipient = f"supa-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    pay(stack, session["sessionId"])
    order = await wait_for_final(stack, session["transactionId"])

    assert order["status"] == "delivered", order["failure_reason"]
    txn = session["transactionId"]
    purchase = zendit(stack, f"esim/purchases/{order['zendit_transaction_id']}").json()
    lpa = lpa_string(purchase["confirmation"]["smdpAddress"], purchase["confirmation"]["activationCode"])

    storage = httpx.get(f"{stack.url('storage')}/_sandbox/state", timeout=10).json()
    assert [(o["bucket"], o["name"], o["mimetype"]) for o in storage["objects"]] == [
        ("esim-qrcodes", f"{txn}.png", "image/png")
    ]
    assert storage["buckets"][0]["public"] is False
    assert order["qr_code_url"].startswith(
        f"{stack.url('storage')}/storage/v1/object/sign/esim-qrcodes/{txn}.png?token="
    )
    stored = httpx.get(order["qr_code_url"], timeout=10)  # the signed URL, without any key
    assert stored.status_code == 200 and decode(stored.content) == {lpa}
    assert not (stack.qr_dir / f"{txn}.png").exists()

    [message] = emails_to(stack, recipient)
    emailed = [part.get_content() for part in message.walk() if part.get_content_type() == "image/png"]
    assert emailed and all(decode(png) == {lpa} for png in emailed)
