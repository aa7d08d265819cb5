"""The Zendit emulator in process (ASGI transport, fake clock): lifecycle, wallet, controls, top-ups."""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from esim_common.providers.topup_gateway import TopupDeclined, TopupGatewayClient, TopupGatewayUnavailable
from esim_common.providers.zendit import (
    TransactionStatus,
    TransactionType,
    ZenditClient,
    ZenditNotFound,
    ZenditPermanentError,
    ZenditTransientError,
    ZenditUnauthorized,
)
from esim_sandbox.zendit_emulator import card_network, create_app
from esim_sandbox.zendit_emulator.activation import new_iccid

DELAY = 4.0  # steps at 1 s, 2 s, 3 s, 4 s


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def app(clock):
    return create_app(wallet_balance=10_000, purchase_delay_seconds=DELAY, now=clock)


@pytest.fixture
async def zendit(app):
    async with ZenditClient(
        base_url="http://zendit.test/v1", api_key="sand_test_key", transport=httpx.ASGITransport(app=app)
    ) as client:
        yield client


@pytest.fixture
async def control(app):
    async with httpx.AsyncClient(
        base_url="http://zendit.test/_sandbox", transport=httpx.ASGITransport(app=app)
    ) as client:
        yield client


async def test_a_purchase_walks_through_every_status_on_the_clock(zendit, clock):
    await zendit.purchase(transaction_id="order-1", offer_id="ESIM-US-7D-1GB")
    seen = [(await zendit.get_purchase("order-1")).status]
    for _ in range(4):
        clock.tick(1.0)
        seen.append((await zendit.get_purchase("order-1")).status)
    assert seen == ["ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS", "DONE"]
    done = await zendit.get_purchase("order-1")
    assert [item.status for item in done.log] == seen


async def test_the_cost_is_held_at_authorized_and_debited_at_done(zendit, clock):
    await zendit.purchase(transaction_id="order-1", offer_id="ESIM-US-30D-10GB")  # 1800 + 90
    clock.tick(2.0)
    assert (await zendit.get_purchase("order-1")).status is TransactionStatus.AUTHORIZED
    assert (await zendit.get_balance()).available_balance == 10_000 - 1890
    clock.tick(2.0)
    assert (await zendit.get_purchase("order-1")).status is TransactionStatus.DONE
    assert (await zendit.get_balance()).available_balance == 10_000 - 1890


async def test_a_done_purchase_has_fresh_activation_data(zendit, clock):
    for tid in ("order-1", "order-2"):
        await zendit.purchase(transaction_id=tid, offer_id="ESIM-US-7D-1GB")
    clock.tick(DELAY)
    first, second = [await zendit.get_purchase(t) for t in ("order-1", "order-2")]
    assert first.confirmation and second.confirmation
    assert first.confirmation.iccid != second.confirmation.iccid
    assert first.confirmation.activation_code != second.confirmation.activation_code
    assert first.confirmation.smdp_address == "smdp.sandbox.zendit.test"


def test_iccids_are_20_digits_starting_89_with_a_valid_luhn_digit():
    for _ in range(50):
        iccid = new_iccid()
        assert len(iccid) == 20 and iccid.isdigit() and iccid.startswith("89")
        digits = [int(d) for d in iccid]
        total = sum(
            d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits))
        )
        assert total % 10 == 0


async def test_competing_purchases_fail_insufficient_funds_in_time_order(zendit, app, clock):
    app.state.zendit.set_balance(3000)
    await zendit.purchase(transaction_id="first", offer_id="ESIM-US-30D-10GB")  # 1890
    clock.tick(0.5)
    await zendit.purchase(transaction_id="second", offer_id="ESIM-US-30D-10GB")  # 1890 > 1110 left
    clock.tick(DELAY)
    first, second = await zendit.get_purchase("first"), await zendit.get_purchase("second")
    assert first.status is TransactionStatus.DONE
    assert second.status is TransactionStatus.FAILED and second.error_code == "INSUFFICIENT_FUNDS"
    assert (await zendit.get_balance()).available_balance == 3000 - 1890


async def test_an_offer_costed_in_another_currency_fails_without_touching_the_wallet(zendit, clock):
    await zendit.purchase(transaction_id="gbp", offer_id="ESIM-GB-30D-3GB-GBP")
    clock.tick(DELAY)
    purchase = await zendit.get_purchase("gbp")
    assert purchase.error_code == "CURRENCY_MISMATCH"
    assert (await zendit.get_balance()).available_balance == 10_000


async def test_a_divisor_1000_offer_debits_the_exact_cents(zendit, clock):
    offer = await zendit.get_offer("ESIM-MX-7D-2GB")
    assert offer.cost.currency_divisor == 1000
    await zendit.purchase(transaction_id="mx", offer_id=offer.offer_id)
    clock.tick(DELAY)
    purchase = await zendit.get_purchase("mx")
    assert purchase.cost_money == offer.cost_money
    assert (await zendit.get_balance()).available_balance == 10_000 - offer.cost_money.amount


async def test_injected_failures_release_the_hold(zendit, control, clock):
    await control.post("/purchase_failures", json={"code": "PRODUCT_UNAVAILABLE", "count": 1})
    await zendit.purchase(transaction_id="doomed", offer_id="ESIM-US-7D-1GB")
    await zendit.purchase(transaction_id="fine", offer_id="ESIM-US-7D-1GB")
    clock.tick(3.0)
    assert (await zendit.get_balance()).available_balance == 10_000 - 2 * 450  # both held
    clock.tick(1.0)
    doomed, fine = await zendit.get_purchase("doomed"), await zendit.get_purchase("fine")
    assert doomed.status is TransactionStatus.FAILED and doomed.error_code == "PRODUCT_UNAVAILABLE"
    assert doomed.confirmation is None
    assert fine.status is TransactionStatus.DONE
    assert (await zendit.get_balance()).available_balance == 10_000 - 450


async def test_failures_can_target_one_offer(zendit, control, clock):
    await control.post(
        "/purchase_failures", json={"code": "INSUFFICIENT_FUNDS", "count": 5, "offerId": "ESIM-FR-10D-3GB"}
    )
    await zendit.purchase(transaction_id="us", offer_id="ESIM-US-7D-1GB")
    await zendit.purchase(transaction_id="fr", offer_id="ESIM-FR-10D-3GB")
    clock.tick(DELAY)
    assert (await zendit.get_purchase("us")).status is TransactionStatus.DONE
    assert (await zendit.get_purchase("fr")).error_code == "INSUFFICIENT_FUNDS"


async def test_a_stalled_purchase_stays_in_progress_until_resolved(zendit, control, clock):
    await control.post("/purchase_stalls", json={"count": 1})
    await zendit.purchase(transaction_id="stuck", offer_id="ESIM-US-7D-1GB")
    clock.tick(3600)
    assert (await zendit.get_purchase("stuck")).status is TransactionStatus.IN_PROGRESS
    resolved = await control.post("/purchases/stuck/resolve", json={"status": "DONE"})
    assert resolved.json()["status"] == "DONE"
    assert (await zendit.get_purchase("stuck")).confirmation is not None


async def test_a_duplicate_transaction_id_is_refused(zendit):
    await zendit.purchase(transaction_id="once", offer_id="ESIM-US-7D-1GB")
    with pytest.raises(ZenditPermanentError) as caught:
        await zendit.purchase(transaction_id="once", offer_id="ESIM-US-7D-1GB")
    assert caught.value.status_code == 400 and caught.value.error_code == "INVALID_REQUEST"


async def test_buying_a_disabled_or_unknown_offer_is_not_found(zendit):
    for offer_id in ("ESIM-TH-8D-5GB", "ESIM-NOPE"):
        with pytest.raises(ZenditNotFound):
            await zendit.purchase(transaction_id=f"x-{offer_id}", offer_id=offer_id)


async def test_offer_filters_match_country_region_and_subtype(zendit):
    us = await zendit.list_offers(limit=50, offset=0, country="US")
    assert {o.offer_id for o in us.offers} == {"ESIM-US-7D-1GB", "ESIM-US-30D-10GB"}
    africa = await zendit.list_offers(limit=50, offset=0, regions="Africa")
    assert [o.offer_id for o in africa.offers] == ["ESIM-AFRICA-30D-10GB"]
    assert (await zendit.list_offers(limit=50, offset=0, sub_type="Nothing")).total == 0


async def test_list_endpoints_require_zendit_paging(app):
    async with httpx.AsyncClient(
        base_url="http://zendit.test/v1",
        transport=httpx.ASGITransport(app=app),
        headers={"Authorization": "Bearer sand_test_key"},
    ) as raw:
        for path in (
            "/esim/offers",
            "/esim/offers?_limit=0&_offset=0",
            "/esim/offers?_limit=1025&_offset=0",
            "/esim/purchases?_limit=10",
            "/transactions?_offset=0",
        ):
            response = await raw.get(path)
            assert response.status_code == 400, path
            assert response.json()["errorCode"] == "INVALID_REQUEST"
            assert response.json()["fields"]


async def test_a_wrong_key_gets_not_authorized_in_zendit_shape(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as raw:
        response = await raw.get("http://zendit.test/v1/balance", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json() == {
        "errorCode": "NOT_AUTHORIZED",
        "message": response.json()["message"],
        "fields": {},
    }


async def test_an_unknown_path_answers_a_zendit_shaped_404(zendit):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=zendit._http._transport.app)) as raw:
        response = await raw.get("http://zendit.test/v1/wallet/deposit")
    assert response.status_code == 404 and response.json()["errorCode"] == "NOT_FOUND"


async def test_injected_faults_answer_errors_for_the_next_calls_only(zendit, control):
    await control.post("/faults", json={"endpoint": "get_balance", "status": 503, "count": 2})
    for _ in range(2):
        with pytest.raises(ZenditTransientError) as caught:
            await zendit.get_balance()
        assert caught.value.error_code == "SYSTEM_UNAVAILABLE"
    assert (await zendit.get_balance()).available_balance == 10_000


async def test_a_fault_after_the_effect_lands_the_purchase_but_fails_the_answer(zendit, control):
    await control.post("/faults", json={"endpoint": "create_purchase", "status": 500, "when": "after"})
    with pytest.raises(ZenditTransientError):
        await zendit.purchase(transaction_id="landed", offer_id="ESIM-US-7D-1GB")
    assert (await zendit.get_purchase("landed")).status is TransactionStatus.ACCEPTED


async def test_the_ledger_lists_purchases_as_debits_with_their_status(zendit, app, clock):
    await zendit.purchase(transaction_id="done", offer_id="ESIM-US-7D-1GB")
    clock.tick(DELAY)
    app.state.zendit.set_balance(0)
    await zendit.purchase(transaction_id="broke", offer_id="ESIM-US-7D-1GB")
    clock.tick(DELAY)
    page = await zendit.list_transactions(limit=10, offset=0, type="DEBIT")
    statuses = {row.transaction_id: row.status for row in page.transactions}
    assert statuses == {"done": "DONE", "broke": "FAILED"}
    done_only = await zendit.list_transactions(limit=10, offset=0, status="DONE")
    assert [row.transaction_id for row in done_only.transactions] == ["done"]
    assert done_only.transactions[0].money(divisor=100).amount == 450


async def test_purchases_list_filters_by_status_and_created_at(zendit, clock):
    await zendit.purchase(transaction_id="old", offer_id="ESIM-US-7D-1GB")
    clock.tick(3600)
    await zendit.purchase(transaction_id="new", offer_id="ESIM-US-7D-1GB")
    since = (clock.now - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = await zendit.list_purchases(limit=10, offset=0, created_at=f"gte{since}")
    assert [p.transaction_id for p in recent.purchases] == ["new"]
    done = await zendit.list_purchases(limit=10, offset=0, status=TransactionStatus.DONE)
    assert [p.transaction_id for p in done.purchases] == ["old"]


async def test_reset_restores_the_configured_world(zendit, control, app):
    await zendit.purchase(transaction_id="x", offer_id="ESIM-US-7D-1GB")
    await control.post("/wallet", json={"balance": 1})
    await control.post("/offers/ESIM-US-7D-1GB", json={"enabled": False})
    await control.post("/reset")
    assert (await zendit.get_balance()).available_balance == 10_000
    assert (await zendit.get_offer("ESIM-US-7D-1GB")).enabled
    with pytest.raises(ZenditNotFound):
        await zendit.get_purchase("x")


async def test_a_step_happens_exactly_at_its_due_time_whatever_the_clocks_microseconds(
    zendit, control, clock
):
    # Due means "due_at(step) <= time since creation": 0.15 s here, although created_ts + 0.15 rounds
    # past (created + 0.15 s).timestamp() when the creation time has these microseconds.
    await control.post("/purchase_delay", json={"seconds": 0.6})
    clock.now += timedelta(microseconds=3)
    await zendit.purchase(transaction_id="edge", offer_id="ESIM-US-7D-1GB")
    clock.tick(0.15)
    assert (await zendit.get_purchase("edge")).status is TransactionStatus.PENDING


class NoWalking(dict[str, Any]):
    """A purchases dict that fails any walk over all purchases (lookups by id are fine)."""

    def _walk(self, *args, **kwargs):
        raise AssertionError("walked every purchase")

    __iter__ = values = items = keys = _walk


async def test_hot_calls_never_walk_every_purchase(zendit, control, app, clock):
    await control.post("/purchase_stalls", json={"count": 1})
    for n in range(10):
        await zendit.purchase(transaction_id=f"old-{n}", offer_id="ESIM-US-7D-1GB")
    clock.tick(DELAY)
    await zendit.get_purchase("old-0")  # all but the stalled one finish here
    state = app.state.zendit
    state.watch_statuses()
    state.purchases = NoWalking(state.purchases)

    await zendit.purchase(transaction_id="new", offer_id="ESIM-US-7D-1GB")
    clock.tick(DELAY / 2)
    assert (await zendit.get_purchase("new")).status is TransactionStatus.AUTHORIZED
    assert (await zendit.get_balance()).available_balance == 10_000 - 11 * 450  # 9 debited, 2 held
    clock.tick(DELAY / 2)
    assert state.status_changes() == [("new", "DONE")]
    assert (await zendit.get_purchase("old-0")).status is TransactionStatus.IN_PROGRESS  # the stall


# -- webhooks: what a tick sends, with the receiver replaced by a recorder --------------------------
class Hook:
    """The emulator's webhook pointed at a recorder; `tick()` runs one tick and returns what it POSTed
    as (transactionId, status) pairs."""

    def __init__(self, app: Any, control: httpx.AsyncClient) -> None:
        self.sender, self.control = app.state.zendit_webhooks, control
        self.received: list[tuple[str, str]] = []
        self.sender._client = httpx.AsyncClient(transport=httpx.MockTransport(self._receive))

    def _receive(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = json.loads(request.content)
            self.received.append((body["transactionId"], body["status"]))
        return httpx.Response(200)

    async def configure(self, intermediate: bool = False) -> None:
        body = {"url": "http://hook.test/", "header": "X-Hook", "secret": "s", "intermediate": intermediate}
        (await self.control.post("/webhook", json=body)).raise_for_status()

    async def tick(self) -> list[tuple[str, str]]:
        self.sender.tick()
        await asyncio.gather(*self.sender._tasks)
        sent, self.received = self.received, []
        return sent


@pytest.fixture
async def hook(app, control):
    hook = Hook(app, control)
    await hook.configure()  # finals only
    yield hook
    await hook.sender.aclose()


async def test_a_webhook_is_sent_once_per_final_status(zendit, hook, clock):
    await zendit.purchase(transaction_id="a", offer_id="ESIM-US-7D-1GB")
    clock.tick(1.0)
    await zendit.purchase(transaction_id="b", offer_id="ESIM-GB-30D-3GB-GBP")  # fails at AUTHORIZED
    assert await hook.tick() == []
    clock.tick(DELAY)
    assert await hook.tick() == [("a", "DONE"), ("b", "FAILED")]  # in purchase order
    clock.tick(DELAY)
    assert await hook.tick() == []


async def test_intermediate_webhooks_send_each_status_seen_by_a_tick(zendit, hook, clock):
    await hook.configure(intermediate=True)
    await zendit.purchase(transaction_id="a", offer_id="ESIM-US-7D-1GB")
    assert await hook.tick() == [("a", "ACCEPTED")]
    clock.tick(1.0)
    assert await hook.tick() == [("a", "PENDING")]
    clock.tick(3.0)  # AUTHORIZED and IN_PROGRESS happened between two ticks: only the latest is seen
    assert await hook.tick() == [("a", "DONE")]
    assert await hook.tick() == []


async def test_webhooks_after_a_reset_compare_a_reused_id_with_what_was_seen(zendit, hook, control, clock):
    await hook.configure(intermediate=True)
    await zendit.purchase(transaction_id="a", offer_id="ESIM-US-7D-1GB")
    await zendit.purchase(transaction_id="b", offer_id="ESIM-US-7D-1GB")
    assert await hook.tick() == [("a", "ACCEPTED"), ("b", "ACCEPTED")]
    await control.post("/reset")
    await zendit.purchase(transaction_id="a", offer_id="ESIM-US-7D-1GB")  # ACCEPTED again: no change
    assert await hook.tick() == []
    await control.post("/reset")
    assert await hook.tick() == []  # "a" is forgotten now
    await zendit.purchase(transaction_id="a", offer_id="ESIM-US-7D-1GB")
    assert await hook.tick() == [("a", "ACCEPTED")]


# -- the top-up gateway, with the card network replaced by a recorder ---------------------------------
class FakeNetwork:
    def __init__(self, approved: bool = True, reason: str | None = None, down: bool = False) -> None:
        self.approved, self.reason, self.down = approved, reason, down
        self.charges: list[dict] = []

    async def __call__(self, stripe_url, *, card, amount, currency, reference):
        if self.down:
            raise card_network.CardNetworkUnavailable("down")
        self.charges.append({"amount": amount, "currency": currency, "reference": reference})
        return card_network.ChargeOutcome(self.approved, "iauth_1" if self.approved else None, self.reason)


class Card:
    number, exp_month, exp_year, cvc = "4000009990000001", 12, 2031, "123"


@pytest.fixture
async def gateway(app):
    async with TopupGatewayClient(
        url="http://zendit.test/v1/wallet/topup",
        api_key="topup_test_key",
        transport=httpx.ASGITransport(app=app),
    ) as client:
        yield client


async def test_an_approved_topup_credits_the_wallet_once_per_reference(zendit, gateway, monkeypatch):
    network = FakeNetwork()
    monkeypatch.setattr(card_network, "charge", network)
    first = await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-1")
    again = await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-1")
    assert first == again
    assert len(network.charges) == 1 and network.charges[0]["currency"] == "USD"
    assert (await zendit.get_balance()).available_balance == 12_500
    credits = await zendit.list_transactions(limit=10, offset=0, type=TransactionType.CREDIT)
    assert [(r.transaction_id, r.product_type, r.amount) for r in credits.transactions] == [
        (first.topup_id, "WALLET_RECHARGE", 2500)
    ]


async def test_the_same_reference_with_another_amount_is_a_conflict(gateway, monkeypatch):
    monkeypatch.setattr(card_network, "charge", FakeNetwork())
    await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-1")
    with pytest.raises(TopupDeclined) as caught:
        await gateway.topup(amount=9999, currency="USD", card=Card(), reference="topup-1")
    assert caught.value.status_code == 409 and caught.value.reason == "IDEMPOTENCY_CONFLICT"


async def test_a_declined_card_is_a_402_and_leaves_the_wallet_alone(zendit, gateway, monkeypatch, app):
    monkeypatch.setattr(card_network, "charge", FakeNetwork(approved=False, reason="card_canceled"))
    with pytest.raises(TopupDeclined) as caught:
        await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-2")
    assert caught.value.status_code == 402 and "card_canceled" in str(caught.value)
    assert (await zendit.get_balance()).available_balance == 10_000
    assert app.state.zendit.topups["topup-2"].card_last4 == "0001"


async def test_an_unreachable_card_network_is_a_503_and_retry_still_charges(zendit, gateway, monkeypatch):
    monkeypatch.setattr(card_network, "charge", FakeNetwork(down=True))
    with pytest.raises(TopupGatewayUnavailable):
        await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-3")
    monkeypatch.setattr(card_network, "charge", FakeNetwork())
    await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-3")
    assert (await zendit.get_balance()).available_balance == 12_500


async def test_the_gateway_refuses_the_zendit_key_and_a_foreign_currency(app, monkeypatch):
    monkeypatch.setattr(card_network, "charge", FakeNetwork())
    async with TopupGatewayClient(
        url="http://zendit.test/v1/wallet/topup",
        api_key="sand_test_key",
        transport=httpx.ASGITransport(app=app),
    ) as wrong_key:
        with pytest.raises(TopupDeclined) as caught:
            await wrong_key.topup(amount=2500, currency="USD", card=Card(), reference="r")
    assert caught.value.status_code == 401
    async with TopupGatewayClient(
        url="http://zendit.test/v1/wallet/topup",
        api_key="topup_test_key",
        transport=httpx.ASGITransport(app=app),
    ) as gateway:
        with pytest.raises(TopupDeclined) as caught:
            await gateway.topup(amount=2500, currency="EUR", card=Card(), reference="r")
    assert caught.value.status_code == 400


async def test_the_sandbox_state_never_shows_card_numbers(gateway, control, monkeypatch):
    monkeypatch.setattr(card_network, "charge", FakeNetwork())
    await gateway.topup(amount=2500, currency="USD", card=Card(), reference="topup-4")
    text = (await control.get("/state")).text
    assert Card.number not in text and '"123"' not in text
    assert "0001" in text


async def test_the_zendit_key_cannot_be_used_on_the_gateway_and_vice_versa(app):
    async with ZenditClient(
        base_url="http://zendit.test/v1", api_key="topup_test_key", transport=httpx.ASGITransport(app=app)
    ) as wrong:
        with pytest.raises(ZenditUnauthorized):
            await wrong.get_balance()
