"""The eSIM email: sent once per order over real SMTP, with a QR code that scans to the LPA string.

The notify service runs in-process against the real broker (a private topology prefix), this test's
own database and an SMTP server on loopback; events go in through the real exchange and the events it
publishes are read back from the reconcile queues, which nobody consumes here.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import uuid
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import qrcode
import zxingcpp
from aiosmtpd.controller import Controller
from PIL import Image
from prometheus_client import REGISTRY

from esim_common.events import OrderProvisioned
from esim_common.money import Money
from esim_common.order_repository import create_order, get_order
from esim_common.order_states import OrderStatus
from esim_common.service import ServiceContext
from esim_sandbox.smtp_capture import SmtpCapture
from notify import emails
from notify.compose import Draft
from notify.sent_emails import send_once
from tests.fixtures.notify import running_notify

pytestmark = [pytest.mark.broker, pytest.mark.db]

SMDP = "smdp.example.com"
ACTIVATION_CODE = "K2-1YT3J6-P4Z2KH"
LPA = f"LPA:1${SMDP}${ACTIVATION_CODE}"
ICCID = "8944500102198304826"
WAIT_SECONDS = 20.0


# --------------------------------------------------------------------------- helpers


async def wait_until(condition: Callable[[], Awaitable[bool]], *, seconds: float = WAIT_SECONDS) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def queue_depth(ctx: ServiceContext, queue: str) -> int:
    connection = await aio_pika.connect(ctx.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def published(ctx: ServiceContext, queue_name: str) -> list[dict]:
    """Take every message waiting in one of the topology's queues (by its unprefixed name)."""
    bodies = []
    connection = await aio_pika.connect(ctx.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(ctx.topology.queue(queue_name).name)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(json.loads(message.body))
    return bodies


async def provisioned_order(
    pool: asyncpg.Pool,
    qr_dir: Path | None,
    *,
    name: str = "Ada Lovelace",
    email: str = "ada@example.com",
) -> str:
    """An order as provisioning leaves it: activation data recorded and (optionally) its QR file stored."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    async with pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-GLOBAL-30D-5GB",
            price=Money(1299, "USD"),
            zendit_cost=Money(900, "USD"),
            recipient_email=email,
            recipient_name=name,
            offer_data_mb=5_000,
            offer_data_unlimited=False,
            offer_duration_days=30,
        )
        await conn.execute(
            """UPDATE esim_purchases
                  SET status = 'provisioned', paid_at = now() - interval '2 minutes', qr_stored_at = now(),
                      stripe_payment_intent_id = $2, zendit_transaction_id = $3, zendit_status = 'DONE',
                      iccid = $4, smdp_address = $5, activation_code = $6, qr_code_url = $7
                WHERE transaction_id = $1""",
            txn,
            f"pi_{txn}",
            f"zendit-{txn}",
            ICCID,
            SMDP,
            ACTIVATION_CODE,
            f"http://127.0.0.1:8082/qrcodes/{txn}.png",
        )
    if qr_dir is not None:
        # Written the way any QR library would, not with notify's own renderer.
        await asyncio.to_thread(write_qr_file, qr_dir / f"{txn}.png")
    return txn


def write_qr_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    qrcode.make(LPA).save(path)


def provisioned_event(txn: str) -> OrderProvisioned:
    return OrderProvisioned(
        transaction_id=txn,
        zendit_transaction_id=f"zendit-{txn}",
        qr_code_url=f"http://127.0.0.1:8082/qrcodes/{txn}.png",
    )


async def order_status(pool: asyncpg.Pool, txn: str) -> OrderStatus:
    order = await get_order(pool, txn)
    assert order is not None
    return order.status


def inline_qr(message: EmailMessage) -> tuple[str, bytes]:
    """The Content-ID (without brackets) and bytes of the inline image inside multipart/related."""
    for part in message.walk():
        if part.get_content_type() == "multipart/related":
            for child in part.iter_parts():
                if child.get_content_type() == "image/png":
                    return str(child["Content-ID"]).strip("<>"), child.get_content()
    raise AssertionError("no inline PNG inside a multipart/related part")


def decoded(png: bytes) -> list[str]:
    return [barcode.text for barcode in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))]


class SelectiveSmtp:
    """An SMTP server that answers 550 to the listed recipients and keeps every other message."""

    def __init__(self, rejected: set[str]) -> None:
        self.rejected = rejected
        self.accepted: list[EmailMessage] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rejected:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        from email import message_from_bytes

        self.accepted.append(message_from_bytes(envelope.original_content, policy=default_policy))
        return "250 OK"


# --------------------------------------------------------------------------- tests


async def test_a_provisioned_order_gets_one_email_whose_qr_code_scans_to_the_lpa(
    service_settings, db, smtp_capture
):
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: _announced(ctx, 1))
        delivered = await published(ctx, "reconcile.order-delivered")

    assert len(smtp_capture.messages) == 1
    message = smtp_capture.messages[0]
    assert message["To"].addresses[0].addr_spec == "ada@example.com"
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    cid, png = inline_qr(message)
    assert decoded(png) == [LPA]
    assert f'src="cid:{cid}"' in html
    assert ACTIVATION_CODE in text and SMDP in text and "ESIM-GLOBAL-30D-5GB" in text
    assert "Plan: 5 GB · 30 days (ESIM-GLOBAL-30D-5GB)" in text and "5 GB · 30 days" in html
    assert "https://esimsetup.apple.com/esim_qrcode_provisioning?carddata=LPA:1$" in text
    attached = [part for part in message.iter_attachments() if part.get_content_type() == "image/png"]
    assert [part.get_filename() for part in attached] == ["esim-qr-code.png"]
    assert decoded(attached[0].get_content()) == [LPA]
    # Exactly the PNG provisioning stored (local storage), not one rendered again.
    stored = (Path(service_settings.qr_storage_dir) / f"{txn}.png").read_bytes()
    assert png == stored and attached[0].get_content() == stored
    assert await order_status(db, txn) is OrderStatus.DELIVERED
    order = await get_order(db, txn)
    assert order.emailed_at is not None
    assert [event["transaction_id"] for event in delivered] == [txn]
    row = await db.fetchrow("SELECT * FROM sent_emails WHERE transaction_id = $1", txn)
    assert (row["template"], row["status"], row["recipient"]) == ("esim_delivery", "sent", "ada@example.com")
    assert row["message_id"] == message["Message-ID"] == f"<esim_delivery.{txn}@example.com>"


async def test_the_same_order_provisioned_five_times_at_once_sends_one_email(
    service_settings, db, smtp_capture
):
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    async with running_notify(service_settings) as ctx:
        event = provisioned_event(txn)
        await asyncio.gather(*(ctx.publisher.publish(event) for _ in range(5)))
        # Every redelivery re-announces the delivery: five announcements means all five were handled.
        await wait_until(lambda: _announced(ctx, 5))

    assert len(smtp_capture.messages) == 1
    assert await order_status(db, txn) is OrderStatus.DELIVERED


async def test_without_a_stored_qr_file_the_code_is_rendered_from_the_order(
    service_settings, db, smtp_capture
):
    txn = await provisioned_order(db, qr_dir=None)
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await smtp_capture.wait_for(1)

    _, png = inline_qr(smtp_capture.messages[0])
    assert decoded(png) == [LPA]


async def test_what_the_customer_typed_is_escaped_in_the_html(service_settings, db, smtp_capture):
    txn = await provisioned_order(
        db, Path(service_settings.qr_storage_dir), name='<script>alert("x")</script>'
    )
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await smtp_capture.wait_for(1)

    html = smtp_capture.messages[0].get_body(preferencelist=("html",)).get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


async def test_an_email_claimed_but_never_confirmed_is_sent_again(service_settings, db, smtp_capture):
    """A crash between the claim and `sent`: the redelivery sends (at-least-once, same Message-ID)."""
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    await db.execute(
        "INSERT INTO sent_emails (transaction_id, template, recipient) VALUES ($1, 'esim_delivery', $2)",
        txn,
        "ada@example.com",
    )
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await smtp_capture.wait_for(1)
        await wait_until(lambda: _is(db, txn, OrderStatus.DELIVERED))

    assert len(smtp_capture.messages) == 1
    assert smtp_capture.messages[0]["Message-ID"] == f"<esim_delivery.{txn}@example.com>"


async def test_an_email_already_sent_is_not_sent_again_but_the_delivery_is_completed(
    service_settings, db, smtp_capture
):
    """A crash after `sent` and before the order moved: the redelivery only finishes the job."""
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    await db.execute(
        """INSERT INTO sent_emails (transaction_id, template, recipient, status, message_id, sent_at)
           VALUES ($1, 'esim_delivery', 'ada@example.com', 'sent', '<earlier@example.com>', now())""",
        txn,
    )
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: _announced(ctx, 1))

    assert smtp_capture.messages == []
    assert await order_status(db, txn) is OrderStatus.DELIVERED


async def test_an_email_already_sent_is_not_even_built_again(service_settings, db, smtp_capture, monkeypatch):
    """A redelivery after `sent` reads no QR code and writes no MIME: the build waits for sent_emails."""
    built: list[str] = []

    async def qr_png(directory, transaction_id, lpa):
        built.append(transaction_id)
        return await original_qr_png(directory, transaction_id, lpa)

    original_qr_png = emails.qr_png
    monkeypatch.setattr(emails, "qr_png", qr_png)
    sent_before = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    await db.execute(
        """INSERT INTO sent_emails (transaction_id, template, recipient, status, message_id, sent_at)
           VALUES ($1, 'esim_delivery', 'ada@example.com', 'sent', '<earlier@example.com>', now())""",
        sent_before,
    )
    fresh = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(sent_before))
        await ctx.publisher.publish(provisioned_event(fresh))
        await wait_until(lambda: _announced(ctx, 2))

    assert built == [fresh]  # the fresh order shows the spy works; the sent one was never built
    assert [message["Message-ID"] for message in smtp_capture.messages] == [
        f"<esim_delivery.{fresh}@example.com>"
    ]


async def test_an_email_that_cannot_be_built_is_recorded_failed_and_nothing_is_sent(db):
    """A build error counts as a failed attempt: the row is claimable again, never stuck in `sending`."""
    sent: list[EmailMessage] = []

    async def send(message: EmailMessage) -> None:
        sent.append(message)

    async def broken() -> EmailMessage:
        raise RuntimeError("the template is broken")

    txn = f"txn-{uuid.uuid4().hex[:16]}"
    with pytest.raises(RuntimeError, match="template is broken"):
        await send_once(
            db,
            send,
            Draft(recipient="ada@example.com", build=broken),
            transaction_id=txn,
            template="esim_delivery",
        )

    row = await db.fetchrow("SELECT status, recipient FROM sent_emails WHERE transaction_id = $1", txn)
    assert (row["status"], row["recipient"]) == ("failed", "ada@example.com")
    assert sent == []


async def test_while_smtp_is_down_the_email_is_retried_and_sent_once_it_is_back(
    service_settings, db, tmp_path
):
    port = free_port()  # nothing listens here yet: connections are refused
    settings = service_settings.model_copy(update={"smtp_port": port, "smtp_timeout_seconds": 2.0})
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        # The first attempt failed and was recorded; the message now waits in a retry tier.
        await wait_until(
            lambda: _email_status(db, txn, "esim_delivery", "failed"),
        )
        assert await order_status(db, txn) is OrderStatus.PROVISIONED
        with SmtpCapture(tmp_path / "late-mail", port=port) as capture:
            await capture.wait_for(1, seconds=WAIT_SECONDS)
            await wait_until(lambda: _is(db, txn, OrderStatus.DELIVERED))
            queue = ctx.topology.queue("notify.order-provisioned")
            dead = await queue_depth(ctx, queue.dlq)
            waited = REGISTRY.get_sample_value(
                "esim_messages_processed_total", {"queue": queue.name, "outcome": "deferred"}
            )

    assert len(capture.messages) == 1
    assert dead == 0
    assert waited >= 1  # it waited in a delay tier, not a tight loop or the DLQ


async def test_a_rejected_esim_email_puts_the_order_in_front_of_an_operator(service_settings, db):
    server = SelectiveSmtp(rejected={"ada@example.com"})
    controller = Controller(server, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        settings = service_settings.model_copy(update={"smtp_port": controller.port})
        txn = await provisioned_order(db, Path(settings.qr_storage_dir))
        async with running_notify(settings) as ctx:
            await ctx.publisher.publish(provisioned_event(txn))
            await wait_until(lambda: _is(db, txn, OrderStatus.NEEDS_ATTENTION))
            await wait_until(lambda: _count(server.accepted, 1))
            failed = await published(ctx, "reconcile.order-failed")
    finally:
        controller.stop()

    order = await get_order(db, txn)
    assert order.failure_reason.startswith("email_failed: email_rejected_550")
    assert [(event["step"], event["transaction_id"]) for event in failed] == [("delivery", txn)]
    alert = server.accepted[0]
    assert alert["To"] == service_settings.service_owner_email
    assert txn in alert["Subject"] and "delivery" in alert.get_body(preferencelist=("plain",)).get_content()
    assert (
        await db.fetchval(
            "SELECT status FROM sent_emails WHERE transaction_id = $1 AND template = 'esim_delivery'", txn
        )
        == "failed"
    )


async def _announced(ctx: ServiceContext, n: int) -> bool:
    """`n` order.delivered events wait in the (unconsumed) reconcile queue."""
    return await queue_depth(ctx, ctx.topology.queue("reconcile.order-delivered").name) == n


async def _is(db: asyncpg.Pool, txn: str, status: OrderStatus) -> bool:
    return await order_status(db, txn) is status


async def _email_status(db: asyncpg.Pool, txn: str, template: str, status: str) -> bool:
    found = await db.fetchval(
        "SELECT status FROM sent_emails WHERE transaction_id = $1 AND template = $2", txn, template
    )
    return found == status


async def _count(items: list, n: int) -> bool:
    return len(items) >= n
