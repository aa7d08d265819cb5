"""The Zendit client against httpx.MockTransport: request shape, models, and the error mapping."""

import json

import httpx
import pytest

from esim_common.money import InexactConversion, Money
from esim_common.providers.zendit import (
    TransactionStatus,
    TransactionType,
    ZenditClient,
    ZenditError,
    ZenditNotFound,
    ZenditPermanentError,
    ZenditTransientError,
    ZenditUnauthorized,
)

API_KEY = "sand_secret_key_do_not_leak"
BASE = "https://api.zendit.test/v1"

OFFER = {
    "offerId": "ESIM-US-7D-1GB",
    "enabled": True,
    "brand": "B",
    "brandName": "Brand",
    "country": "US",
    "regions": ["North America"],
    "dataGB": 1,
    "dataUnlimited": False,
    "dataSpeeds": ["4G"],
    "durationDays": 7,
    "subTypes": ["Data Only"],
    "priceType": "FIXED",
    "productType": "ESIM",
    "cost": {"currency": "USD", "currencyDivisor": 100, "fixed": 450, "fee": 23},
    "price": {"currency": "USD", "currencyDivisor": 100, "fixed": 900, "suggestedFixed": 999},
    "roaming": [{"country": "CA", "dataSpeeds": ["4G"]}],
    "notes": "",
    "shortNotes": "",
    "smsNumber": 0,
    "smsUnlimited": False,
    "voiceMinutes": 0,
    "voiceUnlimited": False,
    "createdAt": "2025-01-15T09:00:00Z",
    "updatedAt": "2025-01-15T09:00:00.123456789Z",
    "someFutureField": {"ignored": True},
}

PURCHASE_DONE = {
    "transactionId": "order-1",
    "offerId": "ESIM-US-7D-1GB",
    "status": "DONE",
    "cost": 473,
    "costCurrency": "USD",
    "costCurrencyDivisor": 100,
    "price": 900,
    "priceCurrency": "USD",
    "priceCurrencyDivisor": 100,
    "confirmation": {
        "iccid": "89012345678901234567",
        "smdpAddress": "smdp.test",
        "activationCode": "AC1",
        "externalReferenceId": "ext-1",
        "redemptionInstructions": "scan",
    },
    "log": [
        {"dateTime": "2025-01-15T09:00:00Z", "status": "ACCEPTED", "statusMessage": "accepted"},
        {"dateTime": "2025-01-15T09:00:02Z", "status": "DONE", "statusMessage": "done"},
    ],
    "createdAt": "2025-01-15T09:00:00Z",
    "updatedAt": "2025-01-15T09:00:02Z",
}


def client_answering(handler) -> ZenditClient:
    return ZenditClient(base_url=BASE, api_key=API_KEY, transport=httpx.MockTransport(handler))


def answering(status: int, body=None, **kwargs):
    def handler(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, **kwargs)
        return httpx.Response(status, json=body, **kwargs)

    return handler


def raising(exc: Exception):
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


async def test_every_call_carries_the_bearer_key_and_hits_the_v1_path():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={"availableBalance": 1, "currency": "USD", "currencyDivisor": 100})

    async with client_answering(handler) as zendit:
        await zendit.get_balance()
    assert seen[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert str(seen[0].url) == f"{BASE}/balance"


async def test_balance_is_exposed_as_money_in_minor_units():
    body = {"availableBalance": 123450, "currency": "USD", "currencyDivisor": 1000}
    async with client_answering(answering(200, body)) as zendit:
        balance = await zendit.get_balance()
    assert balance.available == Money(12345, "USD")
    assert balance.currency_divisor == 1000


async def test_offer_cost_money_is_fixed_plus_fee():
    async with client_answering(answering(200, OFFER)) as zendit:
        offer = await zendit.get_offer("ESIM-US-7D-1GB")
    assert offer.cost_money == Money(473, "USD")
    assert offer.suggested_price_money == Money(999, "USD")
    assert offer.data_gb == 1 and offer.roaming[0].country == "CA"


def test_offer_cost_money_without_a_fee_is_the_fixed_cost():
    from esim_common.providers.zendit import Offer

    offer = Offer.model_validate({**OFFER, "cost": {"currency": "GBP", "currencyDivisor": 100, "fixed": 700}})
    assert offer.cost_money == Money(700, "GBP")


def test_offer_cost_money_refuses_an_inexact_divisor_amount():
    from esim_common.providers.zendit import Offer

    cost = {"currency": "USD", "currencyDivisor": 1000, "fixed": 4255}
    with pytest.raises(InexactConversion):
        _ = Offer.model_validate({**OFFER, "cost": cost}).cost_money


async def test_list_offers_sends_zendit_paging_and_filter_names():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={"limit": 2, "offset": 4, "total": 5, "list": [OFFER]})

    async with client_answering(handler) as zendit:
        page = await zendit.list_offers(
            limit=2, offset=4, country="US", regions="North America", sub_type="Data Only"
        )
    assert dict(seen[0].url.params) == {
        "_limit": "2",
        "_offset": "4",
        "country": "US",
        "regions": "North America",
        "subType": "Data Only",
    }
    assert page.total == 5 and [o.offer_id for o in page.offers] == ["ESIM-US-7D-1GB"]


async def test_list_calls_refuse_a_page_size_zendit_would_reject():
    async with client_answering(answering(200, {})) as zendit:
        with pytest.raises(ValueError):
            await zendit.list_offers(limit=0, offset=0)
        with pytest.raises(ValueError):
            await zendit.list_transactions(limit=1025, offset=0)
        with pytest.raises(ValueError):
            await zendit.list_purchases(limit=10, offset=-1)


async def test_iter_offers_walks_every_page_until_the_total():
    offsets = []

    def handler(request):
        offset = int(request.url.params["_offset"])
        offsets.append(offset)
        items = [{**OFFER, "offerId": f"ESIM-{i}"} for i in range(offset, min(offset + 2, 5))]
        return httpx.Response(200, json={"limit": 2, "offset": offset, "total": 5, "list": items})

    async with client_answering(handler) as zendit:
        ids = [offer.offer_id async for offer in zendit.iter_offers(page_size=2)]
    assert ids == [f"ESIM-{i}" for i in range(5)]
    assert offsets == [0, 2, 4]


async def test_purchase_posts_transaction_and_offer_ids():
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"transactionId": "order-1", "status": "ACCEPTED"})

    async with client_answering(handler) as zendit:
        accepted = await zendit.purchase(transaction_id="order-1", offer_id="ESIM-US-7D-1GB")
    assert seen == [{"transactionId": "order-1", "offerId": "ESIM-US-7D-1GB"}]
    assert accepted.status is TransactionStatus.ACCEPTED


async def test_purchase_refuses_a_transaction_id_zendit_does_not_document():
    async with client_answering(answering(200, {})) as zendit:
        with pytest.raises(ValueError):
            await zendit.purchase(transaction_id="order 1/x", offer_id="ESIM-US-7D-1GB")


async def test_a_done_purchase_parses_confirmation_cost_and_log():
    async with client_answering(answering(200, PURCHASE_DONE)) as zendit:
        purchase = await zendit.get_purchase("order-1")
    assert purchase.status is TransactionStatus.DONE and purchase.status.is_final
    assert purchase.confirmation is not None
    assert purchase.confirmation.lpa == "LPA:1$smdp.test$AC1"
    assert purchase.cost_money == Money(473, "USD")
    assert [item.status for item in purchase.log] == [TransactionStatus.ACCEPTED, TransactionStatus.DONE]
    assert purchase.error_code is None


async def test_insufficient_funds_is_a_failed_purchase_not_an_exception():
    body = {
        **PURCHASE_DONE,
        "status": "FAILED",
        "confirmation": None,
        "error": {"code": "INSUFFICIENT_FUNDS", "message": "Insufficient funds", "description": "x"},
    }
    async with client_answering(answering(200, body)) as zendit:
        purchase = await zendit.get_purchase("order-1")
    assert purchase.status is TransactionStatus.FAILED
    assert purchase.error_code == "INSUFFICIENT_FUNDS"


async def test_transactions_parse_without_a_divisor_and_take_the_wallets():
    row = {
        "transactionId": "topup_1",
        "type": "CREDIT",
        "productType": "WALLET_RECHARGE",
        "status": "DONE",
        "amount": 5000,
        "currency": "USD",
        "log": [],
        "createdAt": "2025-01-15T09:00:00Z",
        "updatedAt": "2025-01-15T09:00:00Z",
    }
    async with client_answering(answering(200, {"limit": 10, "offset": 0, "total": 1, "list": [row]})) as z:
        page = await z.list_transactions(limit=10, offset=0, type=TransactionType.CREDIT)
    assert page.transactions[0].type is TransactionType.CREDIT
    assert page.transactions[0].money(divisor=100) == Money(5000, "USD")
    with pytest.raises(ValueError):
        page.transactions[0].money()


async def test_qrcode_png_is_returned_as_bytes_and_json_variant_as_base64():
    png = b"\x89PNG\r\n\x1a\n" + b"rest"
    seen_accept = []

    def handler(request):
        seen_accept.append(request.headers["accept"])
        if request.headers["accept"] == "application/json":
            return httpx.Response(200, json={"imageBase64": "aGVsbG8="})
        return httpx.Response(200, content=png, headers={"content-type": "image/png"})

    async with client_answering(handler) as zendit:
        assert await zendit.get_qrcode_png("order-1") == png
        assert await zendit.get_qrcode_base64("order-1") == "aGVsbG8="
    assert seen_accept == ["image/png", "application/json"]


async def test_a_non_png_qrcode_answer_is_transient():
    html = answering(200, content=b"<html>", headers={"content-type": "text/html"})
    async with client_answering(html) as zendit:
        with pytest.raises(ZenditTransientError):
            await zendit.get_qrcode_png("order-1")


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, ZenditPermanentError),
        (401, ZenditUnauthorized),
        (403, ZenditUnauthorized),
        (404, ZenditNotFound),
        (409, ZenditPermanentError),
        (429, ZenditTransientError),
        (500, ZenditTransientError),
        (502, ZenditTransientError),
        (503, ZenditTransientError),
    ],
)
async def test_http_statuses_map_to_the_error_tree(status, error_class):
    body = {"errorCode": "SOME_CODE", "message": "it went wrong", "fields": {"offerId": "bad"}}
    async with client_answering(answering(status, body)) as zendit:
        with pytest.raises(error_class) as caught:
            await zendit.get_offer("ESIM-X")
    assert caught.value.status_code == status
    assert caught.value.error_code == "SOME_CODE"
    assert caught.value.fields == {"offerId": "bad"}
    assert "it went wrong" in str(caught.value)
    if error_class is not ZenditTransientError:
        assert not isinstance(caught.value, ZenditTransientError)


async def test_a_not_found_is_permanent_and_an_unauthorized_is_permanent():
    assert issubclass(ZenditNotFound, ZenditPermanentError)
    assert issubclass(ZenditUnauthorized, ZenditPermanentError)
    assert not issubclass(ZenditPermanentError, ZenditTransientError)


async def test_an_error_body_that_is_not_json_still_maps_by_status():
    async with client_answering(answering(502, content=b"<html>Bad gateway</html>")) as zendit:
        with pytest.raises(ZenditTransientError) as caught:
            await zendit.get_balance()
    assert caught.value.error_code is None


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.PoolTimeout("pool timed out"),
        httpx.ReadError("connection reset"),
        httpx.RemoteProtocolError("server hung up"),
        httpx.ProxyError("proxy failed"),
    ],
)
async def test_network_failures_are_transient(exc):
    async with client_answering(raising(exc)) as zendit:
        with pytest.raises(ZenditTransientError) as caught:
            await zendit.get_balance()
    assert caught.value.__cause__ is exc


async def test_no_httpx_exception_escapes_unmapped():
    # Every concrete httpx exception a transport can raise must come out as a ZenditError.
    def concrete(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from concrete(sub)

    for cls in set(concrete(httpx.HTTPError)):
        if issubclass(cls, httpx.HTTPStatusError):
            continue  # only raised by raise_for_status(), which the client never calls
        try:
            exc = cls("boom")
        except TypeError:
            continue
        async with client_answering(raising(exc)) as zendit:
            with pytest.raises(ZenditError):
                await zendit.get_balance()


async def test_an_unreadable_success_body_is_transient():
    async with client_answering(answering(200, {"unexpected": True})) as zendit:
        with pytest.raises(ZenditTransientError) as caught:
            await zendit.get_purchase("order-1")
    assert caught.value.error_code == "INVALID_RESPONSE"


async def test_error_messages_and_repr_never_contain_the_api_key():
    echoing = {"errorCode": "NOT_AUTHORIZED", "message": f"bad token Bearer {API_KEY}", "fields": {}}
    async with client_answering(answering(401, echoing)) as zendit:
        assert API_KEY not in repr(zendit)
        with pytest.raises(ZenditUnauthorized) as caught:
            await zendit.get_balance()
    assert API_KEY not in str(caught.value)
    async with client_answering(raising(httpx.ConnectError(f"failed with {API_KEY}"))) as zendit:
        with pytest.raises(ZenditTransientError) as caught_transient:
            await zendit.get_balance()
    assert API_KEY not in str(caught_transient.value)


async def test_path_parameters_are_escaped():
    seen = []

    def handler(request):
        seen.append(request.url.raw_path)
        return httpx.Response(404, json={"errorCode": "NOT_FOUND", "message": "no", "fields": {}})

    async with client_answering(handler) as zendit:
        with pytest.raises(ZenditNotFound):
            await zendit.get_offer("../balance")
    assert seen == [b"/v1/esim/offers/..%2Fbalance"]
