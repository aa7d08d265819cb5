"""Our Zendit and top-up gateway clients against the Zendit emulator over real HTTP on loopback.

Top-ups are paid with single-use Stripe Issuing virtual cards created in the Stripe emulator through the
official `stripe` SDK (the `stripe_client` fixture), exactly as the funding service does it.
"""

import asyncio
import base64
import io
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
import stripe
import zxingcpp
from PIL import Image

from esim_common.lpa import lpa_string
from esim_common.money import Money
from esim_common.providers.topup_gateway import TopupDeclined, TopupGatewayClient
from esim_common.providers.zendit import (
    Purchase,
    TransactionStatus,
    TransactionType,
    ZenditClient,
    ZenditNotFound,
    ZenditPermanentError,
    ZenditTransientError,
    ZenditUnauthorized,
)

# The emulator's purchases take 0.2 s; a purchase still not final after this is a bug, not slowness.
FINAL_STATUS_DEADLINE_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.02


async def wait_until_final(zendit: ZenditClient, transaction_id: str) -> tuple[Purchase, list[str]]:
    """Poll like the provisioning service does; returns the final purchase and every status seen."""
    seen: list[str] = []
    deadline = time.monotonic() + FINAL_STATUS_DEADLINE_SECONDS
    while True:
        purchase = await zendit.get_purchase(transaction_id)
        if not seen or seen[-1] != purchase.status:
            seen.append(purchase.status)
        if purchase.status.is_final:
            return purchase, seen
        assert time.monotonic() < deadline, f"{transaction_id} stuck in {purchase.status}"
        await asyncio.sleep(POLL_INTERVAL_SECONDS)


def new_transaction_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def debits_and_credits(zendit: ZenditClient) -> list[tuple[str, str, str, str, int]]:
    page = await zendit.list_transactions(limit=100, offset=0)
    return [(t.transaction_id, t.type, t.product_type, t.status, t.amount) for t in page.transactions]


# -- purchases -------------------------------------------------------------------------------------------
async def test_a_purchase_reaches_done_with_activation_data_and_debits_the_wallet(zendit_client):
    offer = await zendit_client.get_offer("ESIM-GLOBAL-30D-5GB")
    before = (await zendit_client.get_balance()).available
    transaction_id = new_transaction_id()

    accepted = await zendit_client.purchase(transaction_id=transaction_id, offer_id=offer.offer_id)
    purchase, seen = await wait_until_final(zendit_client, transaction_id)

    assert accepted.status is TransactionStatus.ACCEPTED
    assert purchase.status is TransactionStatus.DONE
    assert seen[-1] == "DONE"
    confirmation = purchase.confirmation
    assert confirmation is not None
    assert confirmation.iccid.isdigit() and confirmation.iccid.startswith("89")
    assert 19 <= len(confirmation.iccid) <= 20
    assert confirmation.smdp_address and confirmation.activation_code and confirmation.external_reference_id
    lifecycle = ["ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS", "DONE"]
    assert [item.status for item in purchase.log] == lifecycle
    assert purchase.cost_money == offer.cost_money == Money(2415, "USD")
    assert (await zendit_client.get_balance()).available == before - offer.cost_money
    assert (transaction_id, "DEBIT", "ESIM", "DONE", 2415) in await debits_and_credits(zendit_client)


async def test_a_purchase_the_wallet_cannot_cover_fails_insufficient_funds_and_leaves_the_balance(
    zendit_client, zendit_emulator
):
    zendit_emulator.control("POST", "wallet", {"balance": 1000})
    transaction_id = new_transaction_id()

    accepted = await zendit_client.purchase(transaction_id=transaction_id, offer_id="ESIM-GLOBAL-30D-5GB")
    purchase, _ = await wait_until_final(zendit_client, transaction_id)

    assert accepted.status is TransactionStatus.ACCEPTED  # not an HTTP error
    assert purchase.status is TransactionStatus.FAILED
    assert purchase.error_code == "INSUFFICIENT_FUNDS"
    assert purchase.confirmation is None
    assert (await zendit_client.get_balance()).available_balance == 1000
    done_debits = await zendit_client.list_transactions(limit=10, offset=0, type="DEBIT", status="DONE")
    assert done_debits.total == 0


async def test_the_qr_png_decodes_to_the_lpa_string_of_the_confirmation(zendit_client):
    transaction_id = new_transaction_id()
    await zendit_client.purchase(transaction_id=transaction_id, offer_id="ESIM-US-7D-1GB")
    purchase, _ = await wait_until_final(zendit_client, transaction_id)
    assert purchase.confirmation is not None

    png = await zendit_client.get_qrcode_png(transaction_id)

    decoded = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    expected = lpa_string(purchase.confirmation.smdp_address, purchase.confirmation.activation_code)
    assert [barcode.text for barcode in decoded] == [expected]
    assert expected.startswith("LPA:1$smdp.sandbox.zendit.test$")


async def test_the_qr_json_variant_decodes_to_the_same_lpa_string(zendit_client):
    transaction_id = new_transaction_id()
    await zendit_client.purchase(transaction_id=transaction_id, offer_id="ESIM-AFRICA-30D-10GB")
    purchase, _ = await wait_until_final(zendit_client, transaction_id)
    assert purchase.confirmation is not None

    image_base64 = await zendit_client.get_qrcode_base64(transaction_id)

    decoded = zxingcpp.read_barcodes(Image.open(io.BytesIO(base64.b64decode(image_base64))))
    assert [barcode.text for barcode in decoded] == [purchase.confirmation.lpa]


async def test_the_qr_code_is_refused_before_the_purchase_is_done(zendit_client, zendit_emulator):
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})
    transaction_id = new_transaction_id()
    await zendit_client.purchase(transaction_id=transaction_id, offer_id="ESIM-US-7D-1GB")
    with pytest.raises(ZenditNotFound):
        await zendit_client.get_qrcode_png("never-bought")
    with pytest.raises(ZenditPermanentError) as caught:
        await zendit_client.get_qrcode_png(transaction_id)
    assert caught.value.status_code == 400 and caught.value.error_code == "INVALID_REQUEST"


# -- top-ups through the gateway with a Stripe Issuing card ---------------------------------------------
@dataclass(frozen=True)
class CardForTopup:
    number: str
    exp_month: int
    exp_year: int
    cvc: str

    def __repr__(self) -> str:
        return f"CardForTopup(last4={self.number[-4:]})"


@pytest.fixture
async def cardholder_id(stripe_client) -> str:
    holder = await stripe_client.v1.issuing.cardholders.create_async(
        params={
            "type": "company",
            "name": "Esim Shop",
            "email": "ops@esim-shop.test",
            "billing": {
                "address": {
                    "line1": "1 Main St",
                    "city": "San Francisco",
                    "state": "CA",
                    "postal_code": "94111",
                    "country": "US",
                }
            },
            "status": "active",
        }
    )
    return holder.id


async def issue_single_use_card(
    stripe_client: stripe.StripeClient, cardholder_id: str, amount: int, *, single_use: bool = True
) -> tuple[str, CardForTopup]:
    """A virtual card as the funding service makes it: limits = the top-up amount, one payment."""
    params: dict = {
        "cardholder": cardholder_id,
        "currency": "usd",
        "type": "virtual",
        "status": "active",
        "spending_controls": {
            "spending_limits": [
                {"amount": amount, "interval": "per_authorization"},
                {"amount": amount * (1 if single_use else 10), "interval": "all_time"},
            ]
        },
        "metadata": {"topup_id": uuid.uuid4().hex},
    }
    if single_use:
        params["lifecycle_controls"] = {"cancel_after": {"payment_count": 1}}
    created = await stripe_client.v1.issuing.cards.create_async(
        params=params, options={"idempotency_key": f"issuing-card:{uuid.uuid4().hex}"}
    )
    full = await stripe_client.v1.issuing.cards.retrieve_async(
        created.id, params={"expand": ["number", "cvc"]}
    )
    return created.id, CardForTopup(
        number=full.number, exp_month=full.exp_month, exp_year=full.exp_year, cvc=full.cvc
    )


async def test_a_topup_with_a_single_use_issuing_card_raises_the_balance_and_is_a_credit(
    zendit_client, topup_gateway_client, stripe_client, cardholder_id
):
    _, card = await issue_single_use_card(stripe_client, cardholder_id, 5000)
    before = (await zendit_client.get_balance()).available

    result = await topup_gateway_client.topup(amount=5000, currency="USD", card=card, reference="topup-1")

    assert result.status == "SUCCEEDED" and (result.amount, result.currency) == (5000, "USD")
    assert (await zendit_client.get_balance()).available == before + Money(5000, "USD")
    credits = await zendit_client.list_transactions(limit=10, offset=0, type=TransactionType.CREDIT)
    assert [(t.transaction_id, t.product_type, t.status, t.amount) for t in credits.transactions] == [
        (result.topup_id, "WALLET_RECHARGE", "DONE", 5000)
    ]


async def issuing_float_usd(stripe_client: stripe.StripeClient) -> int:
    balance = await stripe_client.v1.balance.retrieve_async()
    return sum(entry.amount for entry in balance.issuing.available if entry.currency == "usd")


async def test_the_same_topup_reference_does_not_charge_twice(
    zendit_client, topup_gateway_client, stripe_client, cardholder_id, stripe_emulator
):
    # A card that *could* pay twice, so that only the gateway's idempotency can stop a second charge.
    card_id, card = await issue_single_use_card(stripe_client, cardholder_id, 5000, single_use=False)
    wallet_before = (await zendit_client.get_balance()).available_balance
    float_before = await issuing_float_usd(stripe_client)

    first = await topup_gateway_client.topup(amount=5000, currency="USD", card=card, reference="topup-2")
    second = await topup_gateway_client.topup(amount=5000, currency="USD", card=card, reference="topup-2")

    assert second == first
    assert (await zendit_client.get_balance()).available_balance == wallet_before + 5000
    assert await issuing_float_usd(stripe_client) == float_before - 5000
    assert (await zendit_client.list_transactions(limit=10, offset=0, type="CREDIT")).total == 1
    assert len(stripe_emulator.state.find("issuing.authorization", card=card_id)) == 1


async def test_a_topup_with_a_cancelled_card_is_declined_and_the_balance_is_unchanged(
    zendit_client, topup_gateway_client, stripe_client, cardholder_id
):
    card_id, card = await issue_single_use_card(stripe_client, cardholder_id, 5000)
    await stripe_client.v1.issuing.cards.update_async(card_id, params={"status": "canceled"})
    before = (await zendit_client.get_balance()).available_balance

    with pytest.raises(TopupDeclined) as caught:
        await topup_gateway_client.topup(amount=5000, currency="USD", card=card, reference="topup-3")

    assert caught.value.status_code == 402 and caught.value.reason == "CARD_DECLINED"
    assert card.number not in str(caught.value) and card.cvc not in repr(caught.value)
    assert (await zendit_client.get_balance()).available_balance == before
    assert (await zendit_client.list_transactions(limit=10, offset=0, type="CREDIT")).total == 0


async def test_a_topup_above_the_cards_spending_limit_is_declined(
    zendit_client, topup_gateway_client, stripe_client, cardholder_id
):
    _, card = await issue_single_use_card(stripe_client, cardholder_id, 5000)
    with pytest.raises(TopupDeclined):
        await topup_gateway_client.topup(amount=5001, currency="USD", card=card, reference="topup-4")
    assert (await zendit_client.list_transactions(limit=10, offset=0, type="CREDIT")).total == 0


async def test_the_gateway_refuses_a_wrong_key(zendit_emulator, stripe_client, cardholder_id):
    _, card = await issue_single_use_card(stripe_client, cardholder_id, 5000)
    async with TopupGatewayClient(url=zendit_emulator.topup_url, api_key=zendit_emulator.api_key) as wrong:
        with pytest.raises(TopupDeclined) as caught:
            await wrong.topup(amount=5000, currency="USD", card=card, reference="topup-5")
    assert caught.value.status_code == 401


# -- errors ----------------------------------------------------------------------------------------------
async def test_a_500_is_transient_and_the_retry_works(zendit_client, zendit_emulator):
    zendit_emulator.control("POST", "faults", {"endpoint": "get_balance", "status": 500, "count": 1})
    with pytest.raises(ZenditTransientError) as caught:
        await zendit_client.get_balance()
    assert caught.value.status_code == 500
    assert (await zendit_client.get_balance()).currency == "USD"


async def test_a_slow_answer_times_out_as_transient(zendit_emulator, zendit_client):
    zendit_emulator.control(
        "POST", "faults", {"endpoint": "get_offer", "status": None, "sleepSeconds": 0.5, "count": 1}
    )
    async with ZenditClient(
        base_url=zendit_emulator.url, api_key=zendit_emulator.api_key, timeout=httpx.Timeout(0.1)
    ) as impatient:
        with pytest.raises(ZenditTransientError):
            await impatient.get_offer("ESIM-US-7D-1GB")
    # The retry goes through a client with an ordinary timeout, so a busy machine cannot fail it.
    assert (await zendit_client.get_offer("ESIM-US-7D-1GB")).offer_id == "ESIM-US-7D-1GB"


async def test_an_unknown_purchase_is_not_found(zendit_client):
    with pytest.raises(ZenditNotFound) as caught:
        await zendit_client.get_purchase("never-bought")
    assert caught.value.error_code == "NOT_FOUND"


async def test_a_bad_key_is_unauthorized_and_not_echoed(zendit_emulator):
    async with ZenditClient(base_url=zendit_emulator.url, api_key="sand_wrong_key") as wrong:
        with pytest.raises(ZenditUnauthorized) as caught:
            await wrong.get_balance()
    assert caught.value.error_code == "NOT_AUTHORIZED"
    assert "sand_wrong_key" not in str(caught.value)


async def test_a_connection_refused_is_transient():
    async with ZenditClient(base_url="http://127.0.0.1:9/v1", api_key="k", timeout=1.0) as nowhere:
        with pytest.raises(ZenditTransientError):
            await nowhere.get_balance()


# -- catalogue -------------------------------------------------------------------------------------------
async def test_offers_page_with_limit_and_offset_and_a_disabled_offer_is_not_found(zendit_client):
    first = await zendit_client.list_offers(limit=5, offset=0)
    second = await zendit_client.list_offers(limit=5, offset=5)
    everything = [offer async for offer in zendit_client.iter_offers(page_size=4)]

    assert (first.limit, first.offset, len(first.offers)) == (5, 0, 5)
    assert second.offset == 5 and first.total == second.total == len(everything) >= 12
    ids = [o.offer_id for o in everything]
    assert ids[:10] == [o.offer_id for o in first.offers + second.offers]
    assert len(set(ids)) == len(ids)
    expected = {"ESIM-US-7D-1GB", "ESIM-AFRICA-30D-10GB", "ESIM-AD-10D-ULE-NOROAM", "ESIM-GLOBAL-30D-5GB"}
    assert expected <= set(ids)
    disabled = [o for o in everything if not o.enabled]
    assert len(disabled) == 1
    with pytest.raises(ZenditNotFound):
        await zendit_client.get_offer(disabled[0].offer_id)


async def test_the_catalogue_exercises_currencies_and_divisors(zendit_client):
    offers = [offer async for offer in zendit_client.iter_offers()]
    assert {o.cost.currency for o in offers} >= {"USD", "GBP"}
    odd_divisor = [o for o in offers if o.cost.currency_divisor != 100]
    assert odd_divisor and all(o.cost_money.currency == "USD" for o in odd_divisor)
    assert (await zendit_client.get_balance()).currency_divisor == 100
