"""The top-up gateway client against httpx.MockTransport: contract shape, error classes, no card leaks."""

import json
from dataclasses import dataclass

import httpx
import pytest

from esim_common.providers.topup_gateway import (
    TopupDeclined,
    TopupGatewayClient,
    TopupGatewayError,
    TopupGatewayUnavailable,
)

URL = "https://gateway.test/v1/wallet/topup"
API_KEY = "topup_secret"
PAN = "4000009990001234"
CVC = "987"


@dataclass(frozen=True)
class Card:
    number: str = PAN
    exp_month: int = 12
    exp_year: int = 2031
    cvc: str = CVC


def gateway(handler) -> TopupGatewayClient:
    return TopupGatewayClient(url=URL, api_key=API_KEY, transport=httpx.MockTransport(handler))


def answering(status: int, body=None, content: bytes | None = None):
    def handler(request):
        if content is not None:
            return httpx.Response(status, content=content)
        return httpx.Response(status, json=body)

    return handler


def raising(exc: Exception):
    def handler(request):
        raise exc

    return handler


def assert_no_card_data(text: str) -> None:
    assert PAN not in text and PAN[-8:] not in text and CVC not in text


async def test_topup_posts_the_contract_body_with_bearer_auth():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(
            200, json={"topupId": "t_1", "status": "SUCCEEDED", "amount": 5000, "currency": "USD"}
        )

    async with gateway(handler) as client:
        result = await client.topup(amount=5000, currency="usd", card=Card(), reference="topup-42")
    assert result.topup_id == "t_1" and result.status == "SUCCEEDED"
    assert seen[0].method == "POST" and str(seen[0].url) == URL
    assert seen[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert json.loads(seen[0].content) == {
        "amount": 5000,
        "currency": "USD",
        "reference": "topup-42",
        "card": {"number": PAN, "exp_month": 12, "exp_year": 2031, "cvc": CVC},
    }


async def test_a_402_decline_is_permanent_with_the_reason_code():
    body = {"errorCode": "CARD_DECLINED", "message": "card_canceled"}
    async with gateway(answering(402, body)) as client:
        with pytest.raises(TopupDeclined) as caught:
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")
    assert caught.value.reason == "CARD_DECLINED"
    assert caught.value.status_code == 402
    assert "card_canceled" in str(caught.value)
    assert not isinstance(caught.value, TopupGatewayUnavailable)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_every_4xx_is_a_decline(status):
    async with gateway(answering(status, {"errorCode": "SOMETHING", "message": "no"})) as client:
        with pytest.raises(TopupDeclined):
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_5xx_and_429_are_transient(status):
    async with gateway(answering(status, {"errorCode": "SYSTEM_UNAVAILABLE"})) as client:
        with pytest.raises(TopupGatewayUnavailable):
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("hung up")]
)
async def test_network_failures_and_timeouts_are_transient(exc):
    async with gateway(raising(exc)) as client:
        with pytest.raises(TopupGatewayUnavailable) as caught:
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")
    # The chained httpx error would hold the request and with it the card: it is not kept.
    assert caught.value.__cause__ is None


async def test_an_unreadable_success_is_transient():
    async with gateway(answering(200, content=b"<html>ok</html>")) as client:
        with pytest.raises(TopupGatewayUnavailable):
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")


async def test_a_top_up_not_yet_succeeded_is_transient_so_it_is_asked_again_with_the_same_reference():
    body = {"topupId": "t_1", "status": "PENDING", "amount": 5000, "currency": "USD"}
    async with gateway(answering(200, body)) as client:
        with pytest.raises(TopupGatewayUnavailable, match="PENDING"):
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")


async def test_a_gateway_crediting_another_amount_is_an_unclassified_error():
    body = {"topupId": "t_1", "status": "SUCCEEDED", "amount": 500, "currency": "USD"}
    async with gateway(answering(200, body)) as client:
        with pytest.raises(TopupGatewayError) as caught:
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")
    assert type(caught.value) is TopupGatewayError


async def test_card_data_echoed_by_a_gateway_never_reaches_the_exception():
    body = {"errorCode": f"BAD {PAN}", "message": f"card {PAN} cvc {CVC} exp 12/2031 declined"}
    async with gateway(answering(402, body)) as client:
        with pytest.raises(TopupDeclined) as caught:
            await client.topup(amount=5000, currency="USD", card=Card(), reference="r1")
    assert_no_card_data(str(caught.value))
    assert_no_card_data(repr(caught.value))
    assert_no_card_data(caught.value.reason)


async def test_the_client_repr_holds_neither_key_nor_card():
    async with gateway(answering(200, {})) as client:
        assert API_KEY not in repr(client)


async def test_a_non_positive_amount_or_empty_reference_is_refused_before_sending():
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(200, json={})

    async with gateway(handler) as client:
        with pytest.raises(ValueError):
            await client.topup(amount=0, currency="USD", card=Card(), reference="r1")
        with pytest.raises(ValueError):
            await client.topup(amount=100, currency="USD", card=Card(), reference="")
    assert calls == []
