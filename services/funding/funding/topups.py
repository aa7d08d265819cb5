"""A wallet top-up as resumable phases, each recorded in `wallet_topups` before and after its side effect.

    pending ──Issuing float ok (card_requested_at), card created──► card_created ──► submitted
       │                                                                               │
       └─ Issuing float too low ─► failed        succeeded ◄──gateway 200──────────────┤ 5xx / timeout:
                                                 declined  ◄──gateway 4xx──────────────┘ retried later,
                                                                                          same reference

A top-up is started by one order (`tu_{txn}`, see `domain.topup_ids`) and covers the orders that wait
for it (`order_ids`). Its id is the idempotency root: the Stripe card is created with the key
`issuing-card:{topup_id}` and the gateway is called with `reference = topup_id`, so a redelivered message
resumes the same top-up and can never pay twice.

Each phase runs in one transaction holding the top-up's advisory lock and re-reads the row first, so
two deliveries of the same order (duplicates, replicas) take turns: the second finds the phase done
and moves on. A crash inside a phase rolls it back; the repeat is safe because every provider call in
it is idempotent. `card_requested_at` is committed before the card is created and `submitted` before
the gateway call, so a resumed delivery and `abandon` know when a card may exist or may already have
paid.

The card's number and CVC are read just before the gateway call and live only in a local variable for
that call. The card is cancelled once the outcome is known (succeeded, declined) and when we give up;
Stripe cancels a single-use card after its one payment anyway, and cancelling again is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import asyncpg

from esim_common.crash_points import crash_here
from esim_common.errors import FailPermanently
from esim_common.providers.stripe import (
    CardDetails,
    IssuedCard,
    StripeGateway,
    StripeGatewayError,
    StripePermanentError,
)
from esim_common.providers.topup_gateway import (
    TopupDeclined,
    TopupGatewayClient,
    TopupGatewayError,
    TopupGatewayUnavailable,
)
from funding import domain
from funding import repository as repo
from funding.cardholder import PlatformCardholder
from funding.domain import TopupStatus
from funding.metrics import issuing_available, issuing_float_low, operator_alert, topups_total
from funding.repository import WalletTopup

log = logging.getLogger("esim.funding.topups")

# Answers Stripe does not save under the idempotency key (so they say nothing about an earlier request
# under it, which may still be making the card): still in progress (409), rate limited before the
# idempotency layer (429), a gateway error from Stripe's edge (502-504). The same key again, later.
UNSAVED_ANSWERS = frozenset({409, 429, 502, 503, 504})
# Cards are looked up from the top-up's creation on, minus this much for clocks that disagree.
CLOCK_SKEW_SECONDS = 600


class TopupPhases:
    def __init__(
        self,
        *,
        pool: Callable[[], asyncpg.Pool],
        stripe: StripeGateway,
        gateway: TopupGatewayClient,
        cardholder: PlatformCardholder,
        allowed_categories: Sequence[str] = (),
        allowed_merchant_countries: Sequence[str] = (),
    ) -> None:
        self._pool = pool  # a getter: the pool exists only once the service has started
        self._stripe = stripe
        self._gateway = gateway
        self._cardholder = cardholder
        self._allowed_categories = tuple(allowed_categories)
        self._allowed_merchant_countries = tuple(allowed_merchant_countries)

    async def settle_interrupted(self, transaction_id: str, covering: Sequence[WalletTopup]) -> bool:
        """Finish this order's top-ups that a crash or a transient error interrupted, and cancel any
        card still active. Runs before the balance check: a submitted top-up may already have paid.

        `covering` are the top-ups naming the order (repo.covering_topups): the ones it drives are among
        them (it started them with itself in order_ids, or joined before taking over). True when it
        finished any."""
        settled = False
        for topup in covering:
            if domain.drives(topup.id, transaction_id, topup.driven_by) and (
                topup.status.is_open or topup.card_active
            ):
                await self.finish(topup.id, transaction_id)
                settled = True
        return settled

    async def finish(self, topup_id: str, transaction_id: str) -> WalletTopup:
        """Drive a top-up from wherever it is to a final status; a failed one raises FailPermanently."""
        await self._issue_card(topup_id, transaction_id)
        await self._mark_submitted(topup_id)
        await self._submit(topup_id)
        topup = await self._retire_card(topup_id)
        if topup.status.is_failure:
            raise FailPermanently(
                domain.order_failure_reason(topup.status, topup.failure_reason),
                f"top-up {topup.id} {topup.status.value}: {topup.failure_reason or 'no reason given'}",
            )
        return topup

    async def abandon(self, transaction_id: str, reason: str) -> None:
        """We give up on this order: close the top-ups it started or took over as failed, and cancel
        their cards."""
        for found in await repo.topups_driven_by(
            self._pool(), transaction_id, domain.topup_ids(transaction_id)
        ):
            async with self._locked(found.id) as (conn, topup):
                if topup.status == TopupStatus.SUBMITTED:
                    # The gateway may have charged the card before it stopped answering: money may sit
                    # in the wallet without an order. Reconciliation against Zendit's CREDITs settles it.
                    operator_alert(
                        "topup_outcome_unknown",
                        "giving up on a top-up whose gateway outcome is unknown; check Zendit /transactions",
                        topup_id=topup.id,
                        amount=topup.amount,
                        currency=topup.currency,
                    )
                if topup.status == TopupStatus.PENDING and (
                    topup.card_requested_at is not None or topup.card_attempts > 1
                ):
                    await self._recover_card(conn, topup, transaction_id)
                if topup.status.is_open:
                    await self._end(conn, topup, TopupStatus.FAILED, failure_reason=reason)
            try:
                await self._retire_card(found.id)
            except StripeGatewayError as exc:  # the refund must not wait for Stripe's Issuing API
                self._alert_card_may_be_active(found.id, exc)

    async def _recover_card(self, conn: asyncpg.Connection, topup: WalletTopup, transaction_id: str) -> None:
        """A card creation whose outcome we never learnt: a card may exist at Stripe that our books do
        not know. Look for it, so that it is recorded and cancelled with the rest."""
        try:
            card = await self._existing_card(topup)
        except (StripeGatewayError, TimeoutError) as exc:
            self._alert_card_may_be_active(topup.id, exc)
            return
        if card is not None:
            await repo.record_card(conn, topup=topup, card=card, transaction_id=transaction_id)
        elif topup.card_requested_at is not None:
            # The last request got no saved answer: Stripe may still be making the card.
            self._alert_card_may_be_active(topup.id, None)

    @staticmethod
    def _alert_card_may_be_active(topup_id: str, exc: BaseException | None) -> None:
        operator_alert(
            "card_may_be_active",
            "giving up on a top-up whose card may exist at Stripe; find cards with this "
            "metadata.topup_id in the Stripe Dashboard and cancel any that are active",
            topup_id=topup_id,
            error=type(exc).__name__ if exc is not None else None,
        )

    # ------------------------------------------------------------------------------------ phases

    @asynccontextmanager
    async def _locked(self, topup_id: str) -> AsyncIterator[tuple[asyncpg.Connection, WalletTopup]]:
        """One phase: a transaction holding this top-up's lock, with the row as it is now."""
        async with self._pool().acquire() as conn, conn.transaction():
            await conn.execute(repo.LOCK_TOPUP, topup_id)
            yield conn, await repo.get_topup(conn, topup_id)

    async def _issue_card(self, topup_id: str, transaction_id: str) -> None:
        """pending → card_created (or failed when the Issuing float cannot pay the top-up, or Stripe
        will not make the card).

        Two phases. The float check ends by committing `card_requested_at`: from then on a card may
        exist at Stripe. A delivery that finds it set without a card (a crash, a timeout) looks the card
        up at Stripe before asking for one (the same idempotency key would also return it, but only for
        24 h). An answer Stripe does not save under the key (409, 429, an edge 5xx: UNSAVED_ANSWERS) or
        none at all says nothing about an earlier request that may still be making the card: the same
        key again, later. After a saved error answer (a 500, a refusal) we look too, and only when no
        card exists does the next attempt get a key of its own (`card_attempts`), because Stripe replays
        a saved 500 for the key all day."""
        cardholder_id = await self._cardholder.id()  # before a card is asked for: its errors are its own
        async with self._locked(topup_id) as (conn, topup):
            if topup.status != TopupStatus.PENDING:
                return
            # An earlier delivery asked for a card: look before asking (again, or under a new key).
            resuming = topup.card_requested_at is not None or topup.card_attempts > 1
            if topup.card_requested_at is None:
                if not await self._float_covers(topup):
                    await self._end(conn, topup, TopupStatus.FAILED, failure_reason="issuing_float_low")
                    return
                await repo.mark_card_requested(conn, topup_id)
        refused: StripeGatewayError | None = None
        async with self._locked(topup_id) as (conn, topup):
            if topup.status != TopupStatus.PENDING or topup.card_requested_at is None:
                return  # finished meanwhile, or an attempt ended without a card: start over
            card = await self._existing_card(topup) if resuming else None
            if card is None:
                try:
                    card = await self._create_card(topup, cardholder_id)
                except StripeGatewayError as exc:
                    if exc.http_status is None or exc.http_status in UNSAVED_ANSWERS:
                        raise  # nothing saved under the key, or still running: the same key, later
                    card = await self._existing_card(topup)
                    if card is None:
                        await repo.mark_card_request_answered(conn, topup_id)
                        if isinstance(exc, StripePermanentError):
                            await self._refuse_card(conn, topup, exc)
                            return
                        refused = exc  # transient: committed above, raised below for the retry tiers
            if card is not None:
                crash_here("funding.after_card_created")  # the card exists at Stripe, not in our books
                await repo.record_card(conn, topup=topup, card=card, transaction_id=transaction_id)
                log.info("single-use card created", extra={"topup_id": topup_id, "card_id": card.id})
        if refused is not None:
            raise refused

    async def _existing_card(self, topup: WalletTopup) -> IssuedCard | None:
        """The card Stripe made for this top-up, if any (an active one first); any extra card — two
        requests that both made one — is cancelled at once."""
        cards = await self._stripe.find_topup_cards(
            cardholder_id=await self._cardholder.id(),
            topup_id=topup.id,
            since=int(topup.created_at.timestamp()) - CLOCK_SKEW_SECONDS,
        )
        if not cards:
            return None
        keep = next((card for card in cards if card.status == "active"), cards[0])
        for extra in cards:
            if extra.id != keep.id and extra.status != "canceled":
                await self._stripe.cancel_card(extra.id)
                log.warning(
                    "extra card of a top-up cancelled", extra={"topup_id": topup.id, "card_id": extra.id}
                )
        return keep

    async def _refuse_card(
        self, conn: asyncpg.Connection, topup: WalletTopup, exc: StripeGatewayError
    ) -> None:
        reason = f"card_refused_{exc.code or exc.http_status}"
        operator_alert(
            "card_refused",
            "Stripe refused to create a top-up card (key, permissions or spending-control settings?)",
            topup_id=topup.id,
            http_status=exc.http_status,
            code=exc.code,
        )
        await self._end(conn, topup, TopupStatus.FAILED, failure_reason=reason)

    async def _float_covers(self, topup: WalletTopup) -> bool:
        available = await self._stripe.issuing_available_balance(topup.currency)
        issuing_available.labels(currency=topup.currency).set(available)
        if domain.issuing_float_covers(available, topup.money):
            issuing_float_low.labels(currency=topup.currency).set(0)
            return True
        issuing_float_low.labels(currency=topup.currency).set(1)
        operator_alert(
            "issuing_float_low",
            "the Stripe Issuing balance cannot pay a wallet top-up: fund Issuing",
            issuing_available=available,
            topup_amount=topup.amount,
            currency=topup.currency,
            topup_id=topup.id,
        )
        return False

    async def _create_card(self, topup: WalletTopup, cardholder_id: str) -> IssuedCard:
        """The top-up's card; asking again (same idempotency key) returns the card made the first time."""
        return await self._stripe.create_single_use_card(
            topup_id=topup.id,
            cardholder_id=cardholder_id,
            amount=topup.amount,
            currency=topup.currency,
            allowed_categories=self._allowed_categories,
            allowed_merchant_countries=self._allowed_merchant_countries,
            attempt=topup.card_attempts,
        )

    async def _mark_submitted(self, topup_id: str) -> None:
        """card_created → submitted, committed before the card is handed over (counts hand-overs)."""
        async with self._locked(topup_id) as (conn, topup):
            if topup.status in (TopupStatus.CARD_CREATED, TopupStatus.SUBMITTED):
                await repo.mark_submitted(conn, topup_id)

    async def _submit(self, topup_id: str) -> None:
        """submitted → succeeded | declined: the one call that moves money, with the card just revealed."""
        mismatch: TopupGatewayError | None = None
        async with self._locked(topup_id) as (conn, topup):
            if topup.status != TopupStatus.SUBMITTED:
                return  # another delivery finished it while we waited for the lock
            assert topup.card_id is not None and topup.gateway_reference is not None  # set with the card
            card: CardDetails | None = None
            try:
                card = await self._stripe.reveal_card(topup.card_id)
                result = await self._gateway.topup(
                    amount=topup.amount,
                    currency=topup.currency,
                    card=card,
                    reference=topup.gateway_reference,
                )
            except TopupDeclined as exc:
                log.warning("wallet top-up declined", extra={"topup_id": topup_id, "reason": exc.reason})
                if topup.attempts > 1:
                    # An earlier hand-over's outcome was unknown: the gateway should have replayed it
                    # (same reference). A decline now may mean it did not, and the single-use card had
                    # already paid: the wallet may hold money no order accounts for.
                    operator_alert(
                        "topup_declined_after_handover",
                        "a top-up was declined after an earlier hand-over of its card; "
                        "check Zendit /transactions for a CREDIT with this reference",
                        topup_id=topup.id,
                        amount=topup.amount,
                        currency=topup.currency,
                        attempts=topup.attempts,
                    )
                await self._end(conn, topup, TopupStatus.DECLINED, failure_reason=exc.reason)
                return
            except TopupGatewayUnavailable:
                raise  # the card stays usable: the retry repeats the same reference, the gateway replays
            except TopupGatewayError as exc:
                # Neither declined nor unavailable: the gateway credited something other than we asked.
                # The card was charged; record it as failed (committed below), stop the card, and let
                # the message go to the DLQ for a person.
                await self._end(conn, topup, TopupStatus.FAILED, failure_reason="gateway_answer_mismatch")
                mismatch = exc
            else:
                crash_here("funding.after_gateway_accepted")  # the wallet is credited, our row says submitted
                await self._end(conn, topup, TopupStatus.SUCCEEDED, gateway_topup_id=result.topup_id)
                log.info(
                    "wallet topped up", extra={"topup_id": topup_id, "gateway_topup_id": result.topup_id}
                )
            finally:
                card = None  # the number and CVC were needed for that one call only
        if mismatch is not None:
            await self._retire_card(topup_id)
            raise mismatch

    async def _retire_card(self, topup_id: str) -> WalletTopup:
        """Cancel the card of a top-up whose outcome is known; returns the top-up as it ends up."""
        async with self._locked(topup_id) as (conn, topup):
            if topup.status.is_open or topup.card_id is None or not topup.card_active:
                return topup
            await self._stripe.cancel_card(topup.card_id)
            await repo.mark_card_cancelled(conn, topup.card_id)
            log.info("single-use card cancelled", extra={"topup_id": topup_id, "card_id": topup.card_id})
            return await repo.get_topup(conn, topup_id)

    async def _end(
        self,
        conn: asyncpg.Connection,
        topup: WalletTopup,
        status: TopupStatus,
        *,
        gateway_topup_id: str | None = None,
        failure_reason: str | None = None,
    ) -> None:
        await repo.finish_topup(
            conn, topup.id, status, gateway_topup_id=gateway_topup_id, failure_reason=failure_reason
        )
        topups_total.labels(outcome=status.value).inc()  # under the lock, from an open top-up: once
