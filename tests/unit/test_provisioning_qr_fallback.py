"""Which QR code a customer gets, pure: ours when it reads back, Zendit's only when it reads as exactly
the same LPA string, otherwise nobody's (an operator). Also the client call that fetches Zendit's image,
the emulator's control that makes that image wrong, and the operator alerts' contents."""

from __future__ import annotations

import base64

import httpx
import PIL.Image
import pytest

from esim_common import outbox
from esim_common.errors import FailPermanently
from esim_common.lpa import lpa_string
from esim_common.order_repository import Order
from esim_common.order_states import OrderStatus
from esim_common.providers.zendit import (
    Purchase,
    ZenditClient,
    ZenditNotFound,
    ZenditTransientError,
)
from esim_sandbox.zendit_emulator.activation import new_confirmation, qr_png
from provisioning import qr, repository
from provisioning.domain import (
    QrCheck,
    QrSource,
    cross_check_alerts,
    qr_check,
    qr_to_deliver,
)
from provisioning.phases import Provisioner

LPA = lpa_string("smdp.sandbox.zendit.test", "0A1B2C3D4E5F60718293A4B5C6D7E8F9")
OTHER = lpa_string("smdp.sandbox.zendit.test", "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF")


# ------------------------------------------------------------------------------ reading an image
@pytest.mark.parametrize(
    ("decoded", "check"),
    [
        ([LPA], QrCheck.MATCH),
        ([OTHER], QrCheck.MISMATCH),
        ([LPA, LPA], QrCheck.MISMATCH),  # two codes: which one would the phone take?
        ([LPA, OTHER], QrCheck.MISMATCH),
        ([LPA.lower()], QrCheck.MISMATCH),  # exactly the string, not something like it
        ([], QrCheck.UNREADABLE),
    ],
)
def test_only_exactly_one_code_reading_exactly_the_lpa_string_matches(decoded, check):
    assert qr_check(decoded, LPA) == check


def test_an_image_that_is_not_an_image_holds_no_code_rather_than_an_error():
    assert qr.codes_in(b"\x89PNG\r\n\x1a\n but then nothing") == []
    assert qr.codes_in(b"") == []
    assert qr.codes_in(qr.render_png(LPA)) == [LPA]


def test_an_image_too_big_to_open_safely_holds_no_code_rather_than_an_error(monkeypatch):
    # PIL refuses to open an image of more than 2 * MAX_IMAGE_PIXELS with DecompressionBombError,
    # which is no OSError: shrink the limit so that an ordinary QR image counts as such a bomb.
    png = qr.render_png(LPA)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(PIL.Image.DecompressionBombError):
        qr.decode_png(png)

    assert qr.codes_in(png) == []


def test_without_a_decoder_nothing_is_verified_and_nothing_passes_silently(monkeypatch):
    monkeypatch.setattr(qr, "zxingcpp", None)  # an environment built without zxing-cpp
    png = qr.render_png(LPA)

    with pytest.raises(qr.QrDecoderMissing):
        qr.verify_png(png, LPA)
    with pytest.raises(qr.QrDecoderMissing):
        qr.lpa_qr_png(LPA)
    with pytest.raises(qr.QrDecoderMissing):  # not "no code in it": the decoder is ours to fix
        qr.codes_in(png)


@pytest.mark.parametrize(
    "confirmation",
    [
        None,
        {"iccid": "8944", "smdpAddress": "smdp.sandbox.zendit.test", "activationCode": ""},
        {"iccid": "8944", "smdpAddress": "", "activationCode": "0A1B2C3D4E5F"},
        {"iccid": "8944", "smdpAddress": "smdp.sandbox.zendit.test", "activationCode": "0A1B$2C3D"},
    ],
    ids=["none", "no-code", "no-smdp", "dollar-in-code"],
)
def test_a_done_purchase_without_usable_activation_data_goes_to_an_operator(confirmation):
    purchase = Purchase.model_validate(
        {"transactionId": "txn_abc", "status": "DONE", "confirmation": confirmation}
    )

    with pytest.raises(FailPermanently) as raised:
        Provisioner._lpa_of(purchase)

    # Not refundable (the order is still purchasing) and never echoing what Zendit sent.
    assert raised.value.reason == "confirmation_incomplete"
    assert "0A1B" not in str(raised.value)


# ------------------------------------------------------------------------------ whose image is sent
@pytest.mark.parametrize(
    ("ours_verified", "zendit", "source"),
    [
        (True, None, QrSource.OURS),  # the usual case: Zendit's image is not even fetched
        (True, QrCheck.MISMATCH, QrSource.OURS),  # ours holds the confirmation's data: it wins
        (False, QrCheck.MATCH, QrSource.ZENDIT),  # the fallback
        (False, QrCheck.MISMATCH, None),
        (False, QrCheck.UNREADABLE, None),
        (False, QrCheck.UNAVAILABLE, None),
        (False, None, None),  # no decoder: nothing can be vouched for
    ],
)
def test_a_qr_code_is_sent_only_when_it_was_read_back_as_the_lpa_string(ours_verified, zendit, source):
    assert qr_to_deliver(ours_verified, zendit) is source


@pytest.mark.parametrize(
    ("check", "alerts"),
    [
        (QrCheck.MATCH, False),
        (QrCheck.MISMATCH, True),
        (QrCheck.UNREADABLE, False),
        (QrCheck.UNAVAILABLE, False),
    ],
)
def test_the_cross_check_calls_an_operator_only_when_zendits_image_reads_as_another_string(check, alerts):
    assert cross_check_alerts(check) is alerts


# ------------------------------------------------------------------------------ the needs_attention alert
def test_the_needs_attention_alert_is_one_per_purchase_attempt_with_ids_and_statuses_only():
    order = Order.model_construct(  # only the fields the alert reads, and a secret it must not
        transaction_id="txn_abc",
        status=OrderStatus.PURCHASING,
        offer_id="ESIM-US-7D-1GB",
        price=999,
        currency="USD",
        zendit_transaction_id="txn_abc-r2",
        zendit_status="IN_PROGRESS",
        purchase_attempts=2,
        activation_code="SECRETCODE",
    )

    alert = repository.needs_attention_alert(order, "purchase_deadline_exceeded")
    again = repository.needs_attention_alert(order, "a later reason")
    first_attempt = repository.needs_attention_alert(
        order.model_copy(update={"zendit_transaction_id": "txn_abc", "purchase_attempts": 1}), "x"
    )

    assert alert.routing_key == "operator.alert" and alert.alert == "needs_attention"
    # Keyed by the attempt's Zendit id: an order re-driven by an operator that gets stuck again is
    # a new alert (notify emails once per key), a redelivery for the same attempt is not.
    assert alert.alert_key == "needs_attention:txn_abc-r2"
    assert alert.event_id == again.event_id == outbox.stable_event_id("needs_attention:txn_abc-r2")
    assert first_attempt.alert_key == "needs_attention:txn_abc"
    assert first_attempt.event_id != alert.event_id
    assert alert.reason == "purchase_deadline_exceeded"
    assert alert.facts == {
        "zendit_transaction_id": "txn_abc-r2",
        "purchase_attempts": "2",
        "zendit_status": "IN_PROGRESS",
        "offer_id": "ESIM-US-7D-1GB",
    }
    assert "SECRETCODE" not in alert.model_dump_json()


# ------------------------------------------------------------------------------ the client call
def zendit_answering(handler) -> ZenditClient:
    return ZenditClient(
        base_url="https://api.zendit.test/v1", api_key="sand_key", transport=httpx.MockTransport(handler)
    )


async def test_get_qrcode_asks_for_the_png_and_also_takes_the_json_shape():
    png = qr.render_png(LPA)
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["accept"]))
        if len(seen) == 1:
            return httpx.Response(200, content=png, headers={"content-type": "image/png"})
        return httpx.Response(200, json={"imageBase64": base64.b64encode(png).decode()})

    async with zendit_answering(handler) as zendit:
        assert await zendit.get_qrcode("txn_abc-r2") == png
        assert await zendit.get_qrcode("txn_abc-r2") == png

    assert seen == [("/v1/esim/purchases/txn_abc-r2/qrcode", "image/png")] * 2


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, content=b"<html>gateway</html>", headers={"content-type": "text/html"}),
        httpx.Response(200, json={"imageBase64": "not base64!"}),
        httpx.Response(200, json={"imageBase64": base64.b64encode(b"GIF89a").decode()}),
        httpx.Response(503, json={"errorCode": "SYSTEM_UNAVAILABLE", "message": "down"}),
    ],
    ids=["html", "bad-base64", "not-png", "503"],
)
async def test_get_qrcode_answers_that_are_not_a_png_are_transient(answer):
    async with zendit_answering(lambda request: answer) as zendit:
        with pytest.raises(ZenditTransientError):
            await zendit.get_qrcode("txn_abc")


async def test_get_qrcode_of_an_unknown_purchase_is_permanent():
    answer = httpx.Response(404, json={"errorCode": "NOT_FOUND", "message": "Transaction not found"})
    async with zendit_answering(lambda request: answer) as zendit:
        with pytest.raises(ZenditNotFound):
            await zendit.get_qrcode("txn_abc")


# ------------------------------------------------------------------------------ the emulator's images
def test_the_emulator_serves_the_real_a_wrong_or_a_blank_image_of_a_purchase():
    confirmation = new_confirmation()
    real = lpa_string(confirmation["smdpAddress"], confirmation["activationCode"])

    [wrong] = qr.codes_in(qr_png(confirmation, "wrong"))

    assert qr.codes_in(qr_png(confirmation)) == [real]
    assert wrong != real and wrong.startswith(f"LPA:1${confirmation['smdpAddress']}$WRONG")
    assert qr.codes_in(qr_png(confirmation, "blank")) == []


def test_a_cross_check_mismatch_is_its_own_alert_kind_and_key_so_it_never_hides_a_needs_attention_alert():
    order = Order.model_construct(
        transaction_id="txn_abc",
        status=OrderStatus.PROVISIONED,
        offer_id="ESIM-US-7D-1GB",
        zendit_transaction_id="txn_abc",
        zendit_status="DONE",
        purchase_attempts=1,
    )

    alert = repository.qr_mismatch_alert(order)

    # Its own kind (notify's operator_qr_mismatch email: the order was delivered), and a reason that
    # does not read `zendit_*`.
    assert (alert.alert, alert.alert_key, alert.reason) == (
        "qr_mismatch",
        "qr_mismatch:txn_abc",
        "qr_mismatch_zendit",
    )
    assert alert.event_id == outbox.stable_event_id("qr_mismatch:txn_abc")
    assert alert.event_id != repository.needs_attention_alert(order, "x").event_id
    assert alert.facts["zendit_status"] == "DONE"
