"""The email templates: every one renders, values are escaped in HTML, and the MIME shape is right."""

from __future__ import annotations

import string
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from esim_common.events import OperatorAlert, OrderFailed
from esim_common.money import Money
from esim_common.order_repository import Order
from esim_common.order_states import OrderStatus
from esim_common.settings import load_settings
from notify import domain, emails, rendering
from notify.compose import Draft, InlineImage, build_message
from notify.rendering import RenderedEmail

SETTINGS = load_settings(_env_file=None)


async def sent(draft: Draft) -> EmailMessage:
    """The email as the mailer gets it: built, as sent_emails does once it has claimed it."""
    return await draft.build()


def order(status: OrderStatus = OrderStatus.PROVISIONED, **changes: object) -> Order:
    now = datetime.now(UTC)
    fields = {
        "id": 1, "transaction_id": "txn-1", "user_id": None, "offer_id": "ESIM-GLOBAL-30D-5GB",
        "price": 1299, "currency": "USD", "zendit_cost": 900, "zendit_cost_currency": "USD",
        "stripe_payment_intent_id": "pi_1", "stripe_issuing_card_id": None, "zendit_transaction_id": "z-1",
        "zendit_status": "DONE", "qr_code_url": None, "status": status, "recipient_email": "ada@example.com",
        "recipient_name": "Ada Lovelace", "stripe_checkout_session_id": None, "capture_method": "automatic",
        "refund_id": None, "refund_status": None, "failure_reason": None, "funding_attempts": 1,
        "purchase_attempts": 1, "created_at": now, "updated_at": now, "paid_at": now, "funded_at": None,
        "purchased_at": None, "qr_stored_at": None, "emailed_at": None, "failed_at": None,
        "refunded_at": None, "iccid": None, "smdp_address": "smdp.example.com", "activation_code": "CODE-1",
    }  # fmt: skip
    return Order.model_validate({**fields, **changes})


@pytest.mark.parametrize("name", domain.TEMPLATES)
def test_every_placeholder_of_a_template_is_one_its_email_fills(name):
    """A typo in a template would otherwise only show up as a KeyError in production."""
    used: set[str] = set()
    for suffix in (".subject.txt", ".txt", ".html"):
        path = rendering.TEMPLATES_DIR / f"{name}{suffix}"
        if path.exists():
            for match in string.Template.pattern.finditer(path.read_text()):
                assert match.group("invalid") is None, f"stray $ in {path.name}"
                used.add(match.group("named") or match.group("braced") or "")
    used.discard("")
    rendering.render(name, dict.fromkeys(used, "x"))  # renders with exactly these values


def test_html_gets_escaped_values_and_text_gets_them_as_typed():
    rendered = rendering.render(
        "order_failed",
        {
            "name": "<b>Bob</b> & Co",
            "offer_id": "O",
            "transaction_id": "T",
            "what_happened": "W",
            "refund_status": "R",
        },
    )
    assert "&lt;b&gt;Bob&lt;/b&gt; &amp; Co" in rendered.html and "<b>Bob" not in rendered.html
    assert "<b>Bob</b> & Co" in rendered.text


def test_a_subject_stays_one_line_whatever_the_values():
    rendered = rendering.render("order_failed", dict.fromkeys(
        ["name", "offer_id", "transaction_id", "what_happened", "refund_status"], "a\r\nBcc: x@example.com"
    ))  # fmt: skip
    assert "\n" not in rendered.subject and "\r" not in rendered.subject


async def test_the_esim_email_has_text_html_with_inline_qr_and_the_qr_attached(tmp_path):
    settings = SETTINGS.model_copy(update={"qr_storage_dir": str(tmp_path)})
    message = await sent(emails.esim_delivery_email(order(iccid=None), settings))
    types = [part.get_content_type() for part in message.walk()]
    assert types == [
        "multipart/mixed", "multipart/alternative", "text/plain", "multipart/related", "text/html",
        "image/png", "image/png",
    ]  # fmt: skip
    text = message.get_body(preferencelist=("plain",)).get_content()
    assert "ICCID: shown in your phone's settings" in text  # the phrase for a missing ICCID
    assert "Activation code: CODE-1" in text and "SM-DP+ address: smdp.example.com" in text


async def test_an_order_without_activation_data_fails_permanently():
    from esim_common.errors import FailPermanently

    with pytest.raises(FailPermanently) as failure:
        emails.esim_delivery_email(order(activation_code=None), SETTINGS)  # before anything is built
    assert failure.value.reason == "activation_data_missing"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (OrderStatus.REFUNDED, "You have been refunded 12.99 USD"),
        (OrderStatus.NEEDS_ATTENTION, "We are looking into it"),
        (OrderStatus.PAYMENT_FAILED, "You have not been charged"),
    ],
)
async def test_the_failure_email_tells_the_customer_about_their_money(status, expected):
    event = OrderFailed(transaction_id="txn-1", step="purchase", reason="purchase_failed")
    message = await sent(emails.order_failed_email(order(status), event, SETTINGS))
    assert expected in message.get_body(preferencelist=("plain",)).get_content()


async def test_a_released_hold_is_told_as_not_charged_never_as_a_refund():
    event = OrderFailed(transaction_id="txn-1", step="funding", reason="topup_declined")
    released = order(OrderStatus.REFUNDED, capture_method="manual", refund_status="canceled")
    message = await sent(emails.order_failed_email(released, event, SETTINGS))
    text = message.get_body(preferencelist=("plain",)).get_content()
    assert "You have not been charged" in text and "hold of 12.99 USD" in text
    assert "refunded" not in text and "business days" not in text


def decoded_text(message) -> str:
    """Every text part decoded (base64 or quoted-printable bodies hide a string from `as_string()`)."""
    parts = [part.get_content() for part in message.walk() if part.get_content_maintype() == "text"]
    assert parts, "no text part"
    return "\n".join(parts)


async def test_the_operator_alert_goes_to_the_service_owner_with_what_to_do():
    event = OrderFailed(transaction_id="txn-1", step="refund", reason="refund_failed: card_declined")
    message = await sent(emails.operator_alert_email(order(OrderStatus.NEEDS_ATTENTION), event, SETTINGS))
    body = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert message["To"] == SETTINGS.service_owner_email
    assert "Reason: refund_failed: card_declined" in body and "Refund the payment by hand" in body
    assert "refund_failed: card_declined" in html and "Refund the payment by hand" in html
    assert "CODE-1" not in decoded_text(message)  # never the activation code


def test_a_message_without_html_is_plain_text():
    message = build_message(
        RenderedEmail("s", "t", None), sender="a@example.com", to_address="b@example.com", message_id="<m@x>",
        qr=InlineImage(b"png", "cid"),
    )  # fmt: skip
    assert message.get_content_type() == "text/plain"


def test_every_template_has_a_text_and_an_html_part():
    for name in domain.TEMPLATES:
        for suffix in (".subject.txt", ".txt", ".html"):
            assert (rendering.TEMPLATES_DIR / f"{name}{suffix}").exists(), f"{name}{suffix}"


async def test_the_esim_email_says_what_the_plan_gives_in_text_and_html(tmp_path):
    settings = SETTINGS.model_copy(update={"qr_storage_dir": str(tmp_path)})
    bought = order(offer_data_mb=1_500, offer_data_unlimited=False, offer_duration_days=7)
    message = await sent(emails.esim_delivery_email(bought, settings))
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert "Plan: 1.5 GB · 7 days (ESIM-GLOBAL-30D-5GB)" in text
    assert "<strong>1.5 GB · 7 days (ESIM-GLOBAL-30D-5GB)</strong>" in html


async def test_an_older_order_without_offer_facts_shows_only_the_plan_id(tmp_path):
    settings = SETTINGS.model_copy(update={"qr_storage_dir": str(tmp_path)})
    message = await sent(emails.esim_delivery_email(order(), settings))
    assert "Plan: ESIM-GLOBAL-30D-5GB\n" in message.get_body(preferencelist=("plain",)).get_content()


def wallet_short(**changes: object) -> OperatorAlert:
    fields = {
        "transaction_id": "txn-1",
        "alert": "wallet_short",
        "alert_key": "wallet_short:txn-1",
        "reason": "wallet_short",
        "amount_to_add": Money(1_415, "USD"),
        "facts": {"orders_waiting": "3", "wallet_available": "10.00 USD"},
    }
    return OperatorAlert.model_validate({**fields, **changes})


async def test_the_low_balance_alert_says_how_much_to_add_where_and_what_happens_otherwise():
    settings = SETTINGS.model_copy(update={"awaiting_funds_max_age": 21_600})
    message = await sent(emails.operator_alert_event_email(wallet_short(), None, settings))
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert message["To"] == SETTINGS.service_owner_email
    assert message["Subject"] == "[eSIM operator alert] Zendit wallet short: add at least 14.15 USD"
    assert "Add at least: 14.15 USD" in text and "Zendit console" in text
    assert "Orders waiting: 3" in text and "10.00 USD" in text
    assert "refunded, and its customer told, 6 h after its" in text and "AWAITING_FUNDS_MAX_AGE" in text
    assert "<strong>14.15 USD</strong>" in html and "6 h after its" in html
    again = await sent(emails.operator_alert_event_email(wallet_short(), None, settings))
    assert message["Message-ID"] == again["Message-ID"]


async def test_a_low_balance_alert_without_facts_says_what_is_not_known():
    message = await sent(
        emails.operator_alert_event_email(wallet_short(facts={}, amount_to_add=None), None, SETTINGS)
    )
    text = message.get_body(preferencelist=("plain",)).get_content()
    assert "Orders waiting: not known" in text and "Add at least: not known" in text


def needs_attention(**changes: object) -> OperatorAlert:
    fields = {
        "transaction_id": "txn-1",
        "alert": "needs_attention",
        "alert_key": "needs_attention:txn-1",
        "reason": "purchase_deadline_exceeded",
        "facts": {
            "zendit_status": "IN_PROGRESS",
            "activation_code": "CODE-1",
            "card_number": "4242424242424242",
        },
    }
    return OperatorAlert.model_validate({**fields, **changes})


async def test_the_needs_attention_alert_names_the_order_and_says_it_is_not_refunded():
    stuck = order(OrderStatus.NEEDS_ATTENTION, zendit_transaction_id="txn-1-1")
    message = await sent(emails.operator_alert_event_email(needs_attention(), stuck, SETTINGS))
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert (
        message["Subject"] == "[eSIM operator alert] order txn-1 needs attention (purchase_deadline_exceeded)"
    )
    assert "Zendit transaction id: txn-1-1" in text and "Status now: needs_attention" in text
    assert "zendit_status: IN_PROGRESS" in text and "PURCHASE_DEADLINE_SECONDS" in text
    assert "NOT refunded automatically" in text and "NOT refunded automatically" in html
    assert "txn-1-1" in html
    everything = decoded_text(message)
    assert "CODE-1" not in everything and "4242424242424242" not in everything
    assert "smdp.example.com" not in everything


async def test_a_delivered_and_paid_esim_is_not_called_unrefunded_pending_zendit():
    """qr_unverified: Zendit delivered and we paid; "refund once Zendit says FAILED" would be wrong."""
    stuck = order(OrderStatus.NEEDS_ATTENTION)
    message = await sent(
        emails.operator_alert_event_email(needs_attention(reason="qr_unverified"), stuck, SETTINGS)
    )
    text = decoded_text(message)
    assert "do not refund: the eSIM is paid for" in text
    assert "NOT refunded automatically" not in text and "FAILED" not in text


async def test_a_needs_attention_alert_for_an_order_we_do_not_have_is_still_told():
    alert = needs_attention(reason="something_new", facts={"zendit_transaction_id": "z-9"})
    message = await sent(emails.operator_alert_event_email(alert, None, SETTINGS))
    text = message.get_body(preferencelist=("plain",)).get_content()
    assert "Status now: not known" in text and "Zendit transaction id: z-9" in text
    assert "Details:\nnone" in text and "finish or refund it by hand" in text  # the default advice


async def test_an_unknown_reason_for_a_purchase_zendit_delivered_never_invites_a_refund():
    """e.g. the QR storage refused our key after Zendit said DONE: the generic advice would say "refund"."""
    alert = needs_attention(reason="qr_storage_unauthorized", facts={"zendit_status": "DONE"})
    text = decoded_text(
        await sent(emails.operator_alert_event_email(alert, order(OrderStatus.NEEDS_ATTENTION), SETTINGS))
    )
    assert "Do not refund" in text
    assert "finish or refund it by hand" not in text
