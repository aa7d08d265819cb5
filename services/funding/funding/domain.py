"""The funding rules, pure: no database, broker or HTTP here, so every rule is testable on its own.

next_step(order)          what a delivery of order.paid should do with an order in this state
reserved_amount(orders)   the wallet money other orders were promised but Zendit has not taken yet
                          (the repository sums it in SQL by the same rule; reserved_with_fresh_status
                          corrects that sum with what Zendit says about the purchases we are unsure of)
WalletBook / decide_funding   fund, wait for a top-up on its way, start one for everyone waiting, or
                          (prefunded) say how much the operator must add; money goes in payment order
fundable_in_payment_order the waiting orders the free money pays for, first paid first
batch_to_fund             what one decision funds: those, bar the orders busy with a top-up
                          (busy_with_topups: they drive one not settled, or joined one still open)
topup_amount(shortfall)   the shortfall rounded up to ZENDIT_MIN_TOPUP, refused above ZENDIT_MAX_TOPUP
topup_ids / next_topup    the deterministic ids of the top-ups an order starts, and what its top-ups say
capture_step / intent_capture   manual capture: what order.delivered asks for, and what Stripe allows
capture_deadline / capture_retry_delay   how long a capture Stripe cannot do yet is tried again
capture_failure_record   whether a capture failure is new (alert) or recorded already (announce only)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from esim_common.money import Money, ceil_to_multiple
from esim_common.order_states import OrderStatus

S = OrderStatus

# ------------------------------------------------------------------------------------ the guard


class Step(StrEnum):
    FUND = "fund"  # make sure the wallet can pay, then announce order.funded
    ANNOUNCE = "announce"  # already funded: publish order.funded again (heals a crash before publish)
    RESUME_FAILURE = "resume_failure"  # funding already failed: finish the refund (take the failure path)
    NOTHING = "nothing"  # past funding, or failed elsewhere: this message has nothing left to do
    UNEXPECTED = "unexpected"  # order.paid for an order that is not paid: a person must look


_FUND_FROM = frozenset({S.PAID, S.FUNDING, S.AWAITING_FUNDS})
# Later states on the happy path: provisioning has the order.funded it acted on, re-announcing heals nothing.
_PAST_FUNDING = frozenset({S.PURCHASING, S.PROVISIONED, S.DELIVERED})
_FUNDING_FAILED = frozenset({S.TOPUP_FAILED, S.REFUND_PENDING})


def next_step(status: OrderStatus, *, ever_funded: bool) -> Step:
    """What to do with an order in `status` when order.paid is (re)delivered.

    `ever_funded` tells a refund that funding started (never funded) from one that a purchase failure
    started: only the first is ours to resume.
    """
    if status in _FUND_FROM:
        return Step.FUND
    if status == S.FUNDED:
        return Step.ANNOUNCE
    if status in _PAST_FUNDING:
        return Step.NOTHING
    if status == S.TOPUP_FAILED:  # only funding enters it, even for an order funded once before
        return Step.RESUME_FAILURE
    if status in _FUNDING_FAILED and not ever_funded:
        return Step.RESUME_FAILURE
    if status == S.PENDING_PAYMENT:
        return Step.UNEXPECTED
    return Step.NOTHING  # refunded, needs_attention, purchase_failed, payment_failed, a purchase refund


# ------------------------------------------------------------------------------------ reservations

# Orders that were promised wallet money: funded, or buying (their purchase may not have reached Zendit).
RESERVING_STATES: frozenset[OrderStatus] = frozenset({S.FUNDED, S.PURCHASING})
# Zendit statuses at which a purchase's cost is no longer ours to reserve: Zendit holds it from
# AUTHORIZED on (availableBalance already excludes it), debits it on DONE, releases it on FAILED.
ZENDIT_HOLDS_OR_RELEASED: frozenset[str] = frozenset({"AUTHORIZED", "IN_PROGRESS", "DONE", "FAILED"})


@dataclass(frozen=True)
class OrderCost:
    """What the reservation rule needs to know about another order."""

    status: OrderStatus
    zendit_status: str | None
    cost: Money | None
    zendit_transaction_id: str | None = None


def status_unsure(order: OrderCost) -> bool:
    """A purchase was placed but we have not seen Zendit hold its cost yet: Zendit may hold it already
    (then it is counted twice — in its hold and in our reservation). Worth asking Zendit before money
    is added on the strength of it."""
    return order.status == S.PURCHASING and order.zendit_transaction_id is not None and reserves_wallet(order)


def reserves_wallet(order: OrderCost) -> bool:
    """An order reserves its cost from being funded until Zendit itself holds (or releases) it.

    When unsure (no Zendit status recorded yet) the cost stays reserved: counting it twice costs at
    most an early top-up, not counting it could let two orders spend the same money.
    """
    return order.status in RESERVING_STATES and order.zendit_status not in ZENDIT_HOLDS_OR_RELEASED


def reserved_amount(orders: Iterable[OrderCost], currency: str) -> Money:
    """The sum of the costs other orders reserve from a wallet in `currency`.

    A cost in another currency cannot be paid from this wallet (such orders are refused before
    funding), so it reserves nothing of it.
    """
    total = Money.zero(currency)
    for order in orders:
        if order.cost is not None and order.cost.currency == currency and reserves_wallet(order):
            total += order.cost
    return total


def reserved_with_fresh_status(
    reserved: Money, asked: Iterable[OrderCost], answered: Iterable[OrderCost]
) -> Money:
    """`reserved` (summed over a set of orders that includes `asked`) with Zendit's fresh statuses of
    the `asked` orders (`answered`, the same orders) in place of the ones we had recorded."""
    currency = reserved.currency
    return reserved - reserved_amount(asked, currency) + reserved_amount(answered, currency)


@dataclass(frozen=True)
class WaitingOrder:
    """An order that was paid and is not funded yet (funding or awaiting_funds), with its known cost."""

    transaction_id: str
    cost: Money


@dataclass(frozen=True)
class WalletBook:
    """Everything one funding decision looks at, read under the wallet lock.

    Money goes to waiting orders in payment order: an order may use only what is left after the orders
    paid before it, so a later order can never take the money an earlier one is waiting for, and a
    top-up is sized for everyone waiting, not just for the order that happens to ask first.
    """

    available: Money  # Zendit's availableBalance (its own holds already taken out)
    reserved: Money  # promised to funded orders, not yet held by Zendit
    incoming: Money  # open top-ups: on their way, not in `available` yet
    waiting: tuple[WaitingOrder, ...]  # in payment order, the deciding order among them

    @property
    def free(self) -> Money:
        return self.available - self.reserved

    @property
    def demand(self) -> Money:
        return sum((o.cost for o in self.waiting), Money.zero(self.available.currency))

    def ahead_of(self, transaction_id: str) -> Money:
        """The costs of the orders paid before this one that are still waiting."""
        ahead = Money.zero(self.available.currency)
        for order in self.waiting:
            if order.transaction_id == transaction_id:
                return ahead
            ahead += order.cost
        raise ValueError(f"order {transaction_id} is not among the waiting orders")


@dataclass(frozen=True)
class Fund:
    """The wallet covers this order after every order paid before it: fund it now."""


@dataclass(frozen=True)
class WaitForTopup:
    """Top-ups already on their way will cover this order: wait for them instead of starting another."""


@dataclass(frozen=True)
class NewTopup:
    """Start one top-up of `amount`: the whole shortfall of the waiting orders, rounded up to
    ZENDIT_MIN_TOPUP and capped by ZENDIT_MAX_TOPUP."""

    amount: Money


@dataclass(frozen=True)
class Short:
    """No top-up possible (prefunded mode): the operator must add at least `amount_to_add`."""

    amount_to_add: Money


FundingDecision = Fund | WaitForTopup | NewTopup | Short


def decide_funding(
    book: WalletBook, transaction_id: str, cost: Money, *, can_top_up: bool, min_topup: int, max_topup: int
) -> FundingDecision:
    """What to do with one waiting order, given the wallet as it is now (see WalletBook)."""
    free, ahead = book.free, book.ahead_of(transaction_id)
    if free - ahead >= cost:
        return Fund()
    needed = ahead + cost - free  # what must still arrive before this order's turn is paid for
    if book.incoming >= needed:
        return WaitForTopup()
    missing = book.demand - free - book.incoming  # what every waiting order together still lacks
    if not can_top_up:
        return Short(amount_to_add=missing)
    own_shortfall = cost.amount - max(free.amount, 0)
    if own_shortfall > 0:  # raises TopupAboveMaximum: no single top-up could ever pay for this order
        topup_amount(Money(own_shortfall, cost.currency), min_topup=min_topup, max_topup=max_topup)
    amount = ceil_to_multiple(missing.amount, max(min_topup, 1))
    return NewTopup(Money(min(amount, max_topup), cost.currency))


def fundable_in_payment_order(book: WalletBook) -> list[str]:
    """The waiting orders the free money pays for, in payment order, stopping at the first that does
    not fit (a large order first in line is not overtaken by smaller ones behind it)."""
    left = book.free
    funded = []
    for order in book.waiting:
        if left < order.cost:
            break
        left -= order.cost
        funded.append(order.transaction_id)
    return funded


def batch_to_fund(book: WalletBook, deciding: str, busy: Collection[str]) -> list[str]:
    """The orders a decision that funds `deciding` funds with it, in payment order: every waiting order
    the free money pays for (fundable_in_payment_order), except the `busy` ones — those drive a top-up
    not settled yet, or joined one still open (busy_with_topups). A busy order keeps its place in line
    (its cost stays set aside, so nobody behind it takes its money) and funds itself once its own
    delivery has settled or seen out that top-up, as before batches: a batch never funds an order whose
    delivery still has a top-up or a card to finish or to rescue, which would leave them to nobody."""
    return [t for t in fundable_in_payment_order(book) if t == deciding or t not in busy]


# ------------------------------------------------------------------------------------ top-ups


class TopupAboveMaximum(ValueError):
    """The top-up this order needs is larger than ZENDIT_MAX_TOPUP allows in one go."""


def topup_amount(shortfall: Money, *, min_topup: int, max_topup: int) -> Money:
    """At least the shortfall, rounded up to a multiple of `min_topup` so that one top-up also covers
    the orders right behind this one (fewer cards, fewer card fees)."""
    if shortfall.amount <= 0:
        raise ValueError(f"nothing to top up: shortfall is {shortfall}")
    amount = ceil_to_multiple(shortfall.amount, max(min_topup, 1))
    if amount > max_topup:
        raise TopupAboveMaximum(
            f"a top-up of {Money(amount, shortfall.currency)} is above the maximum of "
            f"{Money(max_topup, shortfall.currency)}"
        )
    return Money(amount, shortfall.currency)


def issuing_float_covers(issuing_available: int, topup: Money) -> bool:
    return issuing_available >= topup.amount


# One order needs more than one top-up only when other orders took the money between its top-up and
# its re-check; three in a row means something is wrong (a gateway that says "succeeded" but does
# not credit), and retrying through the tiers then refunding is better than topping up forever.
MAX_TOPUPS_PER_ORDER = 3


def topup_ids(transaction_id: str) -> list[str]:
    """The ids of an order's possible top-ups, in order. Derived from our own ids, so a redelivery
    finds the same top-up (and through it the same card and gateway reference) again."""
    return [f"tu_{transaction_id}"] + [f"tu_{transaction_id}-{n}" for n in range(2, MAX_TOPUPS_PER_ORDER + 1)]


class TopupStatus(StrEnum):
    PENDING = "pending"
    CARD_CREATED = "card_created"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    FAILED = "failed"

    @property
    def is_open(self) -> bool:
        return self in (TopupStatus.PENDING, TopupStatus.CARD_CREATED, TopupStatus.SUBMITTED)

    @property
    def is_failure(self) -> bool:
        return self in (TopupStatus.DECLINED, TopupStatus.FAILED)


@dataclass(frozen=True)
class TopupFailed:
    reason: str


@dataclass(frozen=True)
class TopupsExhausted:
    count: int


@dataclass(frozen=True)
class TopupView:
    """What the funding rules need to know about a top-up."""

    id: str
    status: TopupStatus
    failure_reason: str | None = None


def after_short(covering: Sequence[TopupView]) -> TopupFailed | TopupsExhausted | None:
    """The order is short and nothing on its way covers it: what the top-ups that were meant to cover
    it (oldest first) say before another is started.

    The last one failed: the order fails with it (a declined card or a low Issuing float would fail the
    next card too; each waiting order starting its own would only multiply declined cards). Several
    succeeded and it is still short: something is wrong (a gateway that says "succeeded" but does not
    credit), and retrying through the tiers, then refunding, beats topping up forever.
    """
    if covering and covering[-1].status.is_failure:
        return TopupFailed(order_failure_reason(covering[-1].status, covering[-1].failure_reason))
    succeeded = sum(1 for t in covering if t.status == TopupStatus.SUCCEEDED)
    if succeeded >= MAX_TOPUPS_PER_ORDER:
        return TopupsExhausted(succeeded)
    return None


def next_topup_id(transaction_id: str, existing: Iterable[str]) -> str | None:
    """The id of the next top-up this order starts; None when it has started all it may."""
    taken = set(existing)
    return next((topup_id for topup_id in topup_ids(transaction_id) if topup_id not in taken), None)


# An open top-up whose row has not moved for this long has lost its driver (a bug sent the message
# that drove it to the DLQ): an order waiting for it drives it on. Far above the slowest legitimate gap
# (the 10 s retry tier plus a provider timeout), so two drivers never race a live one.
TOPUP_STALE_SECONDS = 60


def drives(topup_id: str, transaction_id: str, driven_by: str | None) -> bool:
    """Whether this order's deliveries drive the top-up (and settle and abandon it): it started it or
    took it over."""
    return topup_id in topup_ids(transaction_id) or driven_by == transaction_id


def may_drive(
    topup_id: str, transaction_id: str, *, idle_seconds: float, driven_by: str | None = None
) -> bool:
    """Whether this order moves the top-up forward itself (it started it, took it over, or the top-up
    has stalled), or waits for the order that drives it."""
    return drives(topup_id, transaction_id, driven_by) or idle_seconds >= TOPUP_STALE_SECONDS


def may_take_over(topup_id: str, transaction_id: str, *, idle_seconds: float, driven_by: str | None) -> bool:
    """Whether this order takes the (open) top-up over: someone else drives it, and it has stalled."""
    return not drives(topup_id, transaction_id, driven_by) and idle_seconds >= TOPUP_STALE_SECONDS


@dataclass(frozen=True)
class UnsettledTopup:
    """A top-up not settled yet: open, or its card still active (is_open False: final, card active)."""

    id: str
    driven_by: str | None
    order_ids: tuple[str, ...]
    is_open: bool


def busy_with_topups(candidates: Iterable[str], unsettled: Sequence[UnsettledTopup]) -> set[str]:
    """The `candidates` a batch leaves to their own deliveries (domain.batch_to_fund):
    - the ones driving an `unsettled` top-up: their delivery settles it first;
    - the ones that joined a top-up still open: their delivery waits for it and, if it stalls (its
      driver's delivery is gone), takes it over and settles it. Funded by a batch, they would not, and
      a stalled top-up (maybe with an active card) would be left to nobody."""
    busy = set()
    for t in candidates:
        if any(drives(u.id, t, u.driven_by) or (u.is_open and t in u.order_ids) for u in unsettled):
            busy.add(t)
    return busy


def order_failure_reason(status: TopupStatus, topup_reason: str | None) -> str:
    """The order's failure code for a top-up that ended badly (the gateway's own code stays on the
    top-up row): `topup_declined`, or the top-up's reason (`issuing_float_low`, ...)."""
    if status == TopupStatus.DECLINED:
        return "topup_declined"
    return topup_reason or "topup_failed"


def card_expiry(exp_month: int, exp_year: int) -> str:
    """`MM/YYYY`, the only expiry form we store (issuing_cards.card_exp)."""
    if not 1 <= exp_month <= 12 or not 1000 <= exp_year <= 9999:
        raise ValueError(f"not a card expiry: {exp_month}/{exp_year}")
    return f"{exp_month:02d}/{exp_year}"


# ------------------------------------------------------------------------------------ capture after delivery

CAPTURED = "captured"  # esim_purchases.capture_status values (migration 0004)
CAPTURE_FAILED = "failed"


class CaptureStep(StrEnum):
    NOT_REQUIRED = "not_required"  # automatic capture: Stripe took the money at checkout
    DONE = "done"  # already captured: a redelivery
    CAPTURE = "capture"  # manual capture, delivered, not captured yet (or a re-drive after a failure)
    NOT_DELIVERED = "not_delivered"  # order.delivered for an order that is not: a person must look


def capture_step(*, capture_method: str, status: OrderStatus, capture_status: str | None) -> CaptureStep:
    """What a delivery of order.delivered should do about the order's payment.

    The order's own `capture_method` decides, not today's CAPTURE_MODE: switching the setting must not
    strand the orders authorised before the switch.
    """
    if capture_method != "manual":
        return CaptureStep.NOT_REQUIRED
    if capture_status == CAPTURED:
        return CaptureStep.DONE
    if status is not S.DELIVERED:
        return CaptureStep.NOT_DELIVERED
    # A recorded failure is tried again: a message re-driven from the DLQ by an operator must work.
    return CaptureStep.CAPTURE


class IntentCapture(StrEnum):
    CAPTURE = "capture"  # authorised and still capturable
    ALREADY_CAPTURED = "already_captured"  # succeeded: captured by an earlier delivery (or by hand)
    WAIT = "wait"  # processing: Stripe has not settled it yet, ask again later
    REFUSED = "refused"  # canceled (authorisation expired or released) or never authorised: never capturable


def intent_capture(intent_status: str) -> IntentCapture:
    """What a PaymentIntent in `intent_status` allows. Stripe captures only `requires_capture`."""
    if intent_status == "requires_capture":
        return IntentCapture.CAPTURE
    if intent_status == "succeeded":
        return IntentCapture.ALREADY_CAPTURED
    if intent_status == "processing":
        return IntentCapture.WAIT
    return IntentCapture.REFUSED


def capture_refusal_reason(intent_status: str, cancellation_reason: str | None) -> str:
    """The short code recorded on the order, e.g. `authorisation_canceled_automatic` (it expired)."""
    if intent_status == "canceled":
        return f"authorisation_canceled_{cancellation_reason or 'unknown'}"
    return f"payment_intent_{intent_status}"


# Stripe keeps an online card authorisation for 7 days; the charge's `capture_before` says exactly when.
AUTHORISATION_VALIDITY = timedelta(days=7)
# Retries stop (and the operator is alerted) this long before the authorisation lapses: time for a person
# to capture by hand once Stripe answers again.
CAPTURE_SAFETY_MARGIN = timedelta(days=1)
# Back off from 1 s, doubling. The consumer rounds a delay down to its longest retry tier (10 s today), so
# the cap only matters if longer tiers are ever declared; 5 min is still ~1,700 tries in 6 days.
CAPTURE_RETRY_FIRST_SECONDS = 1.0
CAPTURE_RETRY_MAX_SECONDS = 300.0


def capture_deadline(*, capture_before: datetime | None, authorised_at: datetime) -> datetime:
    """Until when a capture Stripe cannot do yet (unreachable, or the payment still processing) is
    retried: the hold's end minus the safety margin. Without the charge's `capture_before` (Stripe did not
    answer), the hold is taken to last 7 days from the authorisation."""
    hold_ends = capture_before or authorised_at + AUTHORISATION_VALIDITY
    return hold_ends - CAPTURE_SAFETY_MARGIN


def capture_retry_delay(attempt: int, *, now: datetime, deadline: datetime) -> float | None:
    """Seconds until capture attempt `attempt + 1`, or None when the deadline has passed."""
    if now >= deadline:
        return None
    doublings = min(max(attempt, 1) - 1, 30)  # bounded: 2**30 s is far past any cap
    return min(CAPTURE_RETRY_FIRST_SECONDS * float(1 << doublings), CAPTURE_RETRY_MAX_SECONDS)


class CaptureFailureRecord(StrEnum):
    NEW = "new"  # recorded now (first failure, or another reason after a re-drive): alert and announce
    UNCHANGED = "unchanged"  # this very failure is recorded already (the failure path runs again): announce
    CAPTURED = "captured"  # captured meanwhile: nothing failed
    NOT_MANUAL = "not_manual"  # automatic capture: there is no capture to fail (the database check agrees)


def capture_failure_record(
    *, capture_method: str, capture_status: str | None, recorded_reason: str | None, reason: str
) -> CaptureFailureRecord:
    """What recording a capture failure with `reason` changes. The failure path can run twice for one
    failure (its announcement failed and the message came back): the operator is alerted only once."""
    if capture_method != "manual":
        return CaptureFailureRecord.NOT_MANUAL
    if capture_status == CAPTURED:
        return CaptureFailureRecord.CAPTURED
    if capture_status == CAPTURE_FAILED and recorded_reason == reason:
        return CaptureFailureRecord.UNCHANGED
    return CaptureFailureRecord.NEW
