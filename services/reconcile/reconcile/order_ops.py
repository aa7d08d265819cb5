"""The rules of the operator's order actions, without I/O: what a re-drive publishes, when a refund may be
retried, what may be resolved by hand, which states may be listed.

    re-drive        paid, funding, awaiting_funds ─► order.paid         (funding picks it up again)
                    funded, purchasing            ─► order.funded       (provisioning resumes)
                    provisioned                   ─► order.provisioned  (notify emails, → delivered)
                    needs_attention + {"to": "funding"}      ─► funding     + order.paid
                    needs_attention + {"to": "provisioned"}  ─► provisioned + order.provisioned
    retry-refund    topup_failed, purchase_failed, refund_pending, needs_attention after a failed refund;
                    refunded by the system: only its announcements again (order.refunded, order.failed)
    resolve         needs_attention ─► delivered | refunded (done by hand, outside the system)

Every consumer is idempotent per order (it looks at the order's state, not at the message), so
publishing a driving event again is a redelivery: it moves the order on if it was stuck, and changes
nothing if it was not. Anything else is refused with `NotAllowed`, whose message says what to do instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from esim_common.events import Event, FailedStep, OrderFunded, OrderPaid, OrderProvisioned
from esim_common.logging import redact
from esim_common.order_states import TERMINAL_STATES, OrderStatus, can_transition

S = OrderStatus

# Zendit's status of a purchase that delivered its eSIM, and of one that never will.
ZENDIT_DONE = "DONE"
ZENDIT_FAILED = "FAILED"
# A refund that did not give the money back (Stripe's `failed`): the customer is still charged.
REFUND_NOT_GIVEN_BACK = frozenset({"failed"})

ManualTarget = Literal["funding", "provisioned"]
ResolveOutcome = Literal["delivered", "refunded"]

# The event that moves an order on from each state it can get stuck in: the one its consumer acts on.
REDRIVE_EVENT: dict[OrderStatus, type[Event]] = {
    S.PAID: OrderPaid,
    S.FUNDING: OrderPaid,
    S.AWAITING_FUNDS: OrderPaid,
    S.FUNDED: OrderFunded,
    S.PURCHASING: OrderFunded,
    S.PROVISIONED: OrderProvisioned,
}
# needs_attention leaves only by an operator's choice; these two go back into the pipeline.
MANUAL_REDRIVE_EVENT: dict[OrderStatus, type[Event]] = {S.FUNDING: OrderPaid, S.PROVISIONED: OrderProvisioned}

# The failed state a refund follows, and the step the customer's failure email names.
FAILED_STEP: dict[OrderStatus, FailedStep] = {S.TOPUP_FAILED: "funding", S.PURCHASE_FAILED: "purchase"}
REFUNDABLE_STATES: frozenset[OrderStatus] = frozenset(
    {S.TOPUP_FAILED, S.PURCHASE_FAILED, S.REFUND_PENDING, S.NEEDS_ATTENTION}
)

RESOLVE_TARGET: dict[str, OrderStatus] = {"delivered": S.DELIVERED, "refunded": S.REFUNDED}

# Listed when no status is asked for: every state an order can still be in before its end.
DEFAULT_LIST_STATUSES: tuple[OrderStatus, ...] = tuple(s for s in OrderStatus if s not in TERMINAL_STATES)
VALID_STATUSES: tuple[str, ...] = tuple(s.value for s in OrderStatus)

_RETRY_REFUND = "POST /api/admin/orders/{txn}/retry-refund"
_RESOLVE = 'POST /api/admin/orders/{txn}/resolve {{"outcome": "refunded", "note": ...}}'


class NotAllowed(Exception):
    """The order's state does not allow the operation; the message says what to do instead."""


class MovedOn(NotAllowed):
    """The order changed after the sweep found it stuck: its own consumer is at work again."""


class OrderFacts(Protocol):
    """What the rules read of an order (`esim_common.order_repository.Order` has all of it)."""

    @property
    def transaction_id(self) -> str: ...
    @property
    def status(self) -> OrderStatus: ...
    @property
    def stripe_payment_intent_id(self) -> str | None: ...
    @property
    def refund_id(self) -> str | None: ...
    @property
    def refund_status(self) -> str | None: ...
    @property
    def zendit_transaction_id(self) -> str | None: ...
    @property
    def zendit_status(self) -> str | None: ...
    @property
    def qr_code_url(self) -> str | None: ...
    @property
    def qr_stored_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class Move:
    """One row of an order's timeline (`order_transitions`)."""

    from_status: str
    to_status: str
    reason: str | None = None


@dataclass(frozen=True)
class RefundPlan:
    """How `esim_common.compensation.fail_and_refund` is called to finish the order's refund."""

    failed_state: OrderStatus  # topup_failed | purchase_failed: the step that failed
    step: FailedStep  # named in the customer's email
    reason: str  # the original failure's reason (a failed refund overwrote the order's)
    reopen: bool  # needs_attention: move it back to refund_pending first
    announce_only: bool = False  # refunded already: only order.refunded and order.failed go out again


# ------------------------------------------------------------------------------------------- listing
def parse_statuses(values: Sequence[str] | None) -> tuple[OrderStatus, ...]:
    """The states asked for (in the state machine's order, once each), or the default ones; an unknown
    value raises ValueError with the valid ones listed (the value itself is not echoed)."""
    if not values:
        return DEFAULT_LIST_STATUSES
    unknown = [v for v in values if v not in VALID_STATUSES]
    if unknown:
        raise ValueError(f"unknown order status; valid statuses: {', '.join(VALID_STATUSES)}")
    asked = set(values)
    return tuple(s for s in OrderStatus if s.value in asked)


# ------------------------------------------------------------------------------------------- re-drive
# `operator_actions.action` of a re-drive: asked for by an operator, made by the scheduled sweep, or
# refused to the sweep (the order cannot be re-driven from its state's facts). Each of them holds the
# sweep off the order for a deadline (stuck_rules).
REDRIVE_ACTION = "redrive"
AUTO_REDRIVE_ACTION = "auto_redrive"
AUTO_REDRIVE_REFUSED_ACTION = "auto_redrive_refused"
REDRIVE_ACTIONS: tuple[str, ...] = (REDRIVE_ACTION, AUTO_REDRIVE_ACTION, AUTO_REDRIVE_REFUSED_ACTION)


class LastChange(Protocol):
    @property
    def transaction_id(self) -> str: ...
    @property
    def status(self) -> OrderStatus: ...
    @property
    def updated_at(self) -> datetime: ...


def check_unchanged(order: LastChange, status: OrderStatus, updated_at: datetime) -> None:
    """MovedOn unless the order is still as the sweep found it (same state, not updated since)."""
    if order.status != status or order.updated_at != updated_at:
        raise MovedOn(f"order {order.transaction_id} moved on since it was found stuck in {status.value}")


def redrive_event(order: OrderFacts) -> type[Event]:
    """The event that drives `order` on from its current state, or NotAllowed saying what to do."""
    event = REDRIVE_EVENT.get(order.status)
    if event is not None:
        return event
    txn = order.transaction_id
    instead = {
        S.PENDING_PAYMENT: "the customer has not paid: their payment moves it, there is nothing to re-drive",
        S.DELIVERED: "the eSIM was emailed: there is nothing left to drive",
        S.REFUNDED: "the customer was refunded: the order is finished",
        S.PAYMENT_FAILED: "the payment failed and nothing was charged: the order is finished",
        S.NEEDS_ATTENTION: (
            'an operator chooses where it goes: re-drive it with {"to": "funding" | "provisioned", '
            f'"note": ...}}, or {_RETRY_REFUND.format(txn=txn)}, or POST .../resolve'
        ),
    }.get(order.status, f"it is failed and its refund has not finished: {_RETRY_REFUND.format(txn=txn)}")
    raise NotAllowed(f"order {txn} is {order.status.value}; {instead}")


def manual_redrive(order: OrderFacts, to: ManualTarget) -> tuple[OrderStatus, type[Event]]:
    """needs_attention → `to`, and the event that drives it from there; NotAllowed when that could
    deliver twice, deliver unpaid, or has nothing to deliver."""
    txn, target = order.transaction_id, OrderStatus(to)
    if order.status != S.NEEDS_ATTENTION:
        raise NotAllowed(
            f'order {txn} is {order.status.value}: "to" only moves a needs_attention order; '
            "re-drive this one from its own state (no body)"
        )
    if not can_transition(S.NEEDS_ATTENTION, target) or target not in MANUAL_REDRIVE_EVENT:
        raise NotAllowed(f"needs_attention orders are not re-driven to {target.value}")
    if target == S.FUNDING:
        _refuse_second_fulfilment(order)
    elif not (order.qr_code_url and order.zendit_transaction_id):
        raise NotAllowed(
            f"order {txn} has no stored QR code (provisioning never finished), so there is nothing to "
            "email; check its Zendit purchase, then re-drive it to funding only if that purchase FAILED"
        )
    return target, MANUAL_REDRIVE_EVENT[target]


def _refuse_second_fulfilment(order: OrderFacts) -> None:
    """Funding again starts a new Zendit purchase: only for a paid, unrefunded order whose earlier
    purchase (if any) certainly delivered nothing."""
    txn = order.transaction_id
    if order.refund_status is not None and order.refund_status not in REFUND_NOT_GIVEN_BACK:
        raise NotAllowed(
            f"order {txn}'s payment was given back (refund_status {order.refund_status}): fulfilling "
            "it now would deliver an unpaid eSIM; POST .../resolve instead"
        )
    if order.zendit_transaction_id and order.zendit_status != ZENDIT_FAILED:
        seen = order.zendit_status or "unknown"
        hint = (
            'Zendit delivered it: re-drive with {"to": "provisioned"} once its QR code is stored'
            if order.zendit_status == ZENDIT_DONE
            else "it may still deliver: check it in the Zendit console first"
        )
        raise NotAllowed(
            f"order {txn} has Zendit purchase {order.zendit_transaction_id} ({seen}); funding it again "
            f"would buy a second eSIM. {hint}"
        )
    if not order.stripe_payment_intent_id:
        raise NotAllowed(f"order {txn} has no PaymentIntent: it was never paid through Stripe")


# ------------------------------------------------------------------------------------------- refunds
def zendit_delivered(order: OrderFacts) -> bool:
    """Zendit delivered the eSIM (or we stored its QR code): never refunded automatically."""
    return order.zendit_status == ZENDIT_DONE or order.qr_stored_at is not None


def refund_failed(history: Sequence[Move]) -> bool:
    """The order's latest move into needs_attention came from refund_pending: the refund failed."""
    into = [m for m in history if m.to_status == S.NEEDS_ATTENTION.value]
    return bool(into) and into[-1].from_status == S.REFUND_PENDING.value


def refund_retry_plan(order: OrderFacts, history: Sequence[Move]) -> RefundPlan:
    """How to finish the refund of a failed order, with the compensation's own idempotency key (a
    retry can never refund twice); NotAllowed when a refund is not the system's to make."""
    txn, status = order.transaction_id, order.status
    if status == S.REFUNDED:
        return _announce_again_plan(order, history)
    if zendit_delivered(order) or status in (S.PROVISIONED, S.DELIVERED):
        raise NotAllowed(
            f"order {txn} is {status.value} and Zendit delivered its eSIM: it is never refunded "
            f"automatically. If the customer must be refunded, do it in Stripe, then "
            f"{_RESOLVE.format(txn=txn)}"
        )
    if status not in REFUNDABLE_STATES:
        raise NotAllowed(f"order {txn} is {status.value}: no step failed, so there is nothing to refund")
    if status == S.NEEDS_ATTENTION and not refund_failed(history):
        into = [m for m in history if m.to_status == S.NEEDS_ATTENTION.value]
        came_from = into[-1].from_status if into else "unknown"
        why = (
            "its Zendit purchase was unresolved and may still deliver; check it in the Zendit console"
            if came_from == S.PURCHASING.value
            else "no automatic refund was attempted for it, so there is none to retry"
        )
        raise NotAllowed(
            f"order {txn} needs attention after {came_from}: {why}. Refund it in Stripe if it must be, "
            f"then {_RESOLVE.format(txn=txn)}"
        )
    failed_state, reason = _failed_step(txn, status, history)
    return RefundPlan(
        failed_state=failed_state,
        step=FAILED_STEP[failed_state],
        reason=reason,
        reopen=status == S.NEEDS_ATTENTION,
    )


def _announce_again_plan(order: OrderFacts, history: Sequence[Move]) -> RefundPlan:
    """A refund the system made whose announcement the broker may have refused (the customer then never
    hears of it): the compensation, called again, publishes order.refunded and order.failed once more
    and refunds nothing. Notify emails once per order and template, so a repeat sends no second email.
    An order an operator marked refunded by hand has nothing to announce."""
    txn = order.transaction_id
    what = f"refund {order.refund_id}" if order.refund_id else "its authorisation was released"
    into = [m for m in history if m.to_status == S.REFUNDED.value]
    if not into or into[-1].from_status != S.REFUND_PENDING.value:
        raise NotAllowed(
            f"order {txn} is refunded already ({what}) and was marked so by hand; there is nothing to "
            "retry or announce"
        )
    failed_state, reason = _failed_step(txn, S.REFUNDED, history)
    return RefundPlan(
        failed_state=failed_state,
        step=FAILED_STEP[failed_state],
        reason=reason,
        reopen=False,
        announce_only=True,
    )


def _failed_step(txn: str, status: OrderStatus, history: Sequence[Move]) -> tuple[OrderStatus, str]:
    """The failed state the refund follows and its original reason (a failed refund overwrote the
    order's), or NotAllowed when the timeline shows none."""
    failed = [m for m in history if m.to_status in {s.value for s in FAILED_STEP}]
    if status in FAILED_STEP:
        failed_state, reason = status, failed[-1].reason if failed else None
    elif failed:
        failed_state, reason = OrderStatus(failed[-1].to_status), failed[-1].reason
    else:
        raise NotAllowed(
            f"order {txn}'s timeline shows no failed step, so the amount and the customer's email "
            f"cannot be chosen safely; refund it in Stripe, then {_RESOLVE.format(txn=txn)}"
        )
    return failed_state, reason or failed_state.value


# ------------------------------------------------------------------------------------------- resolve
def resolve_target(order: OrderFacts, outcome: ResolveOutcome) -> OrderStatus:
    if order.status != S.NEEDS_ATTENTION:
        raise NotAllowed(
            f"order {order.transaction_id} is {order.status.value}: only a needs_attention order is "
            "resolved by hand"
        )
    return RESOLVE_TARGET[outcome]


# ------------------------------------------------------------------------------------------- output
def shareable_url(url: str | None) -> str | None:
    """`url` without its query and fragment (provisioning.domain.shareable_qr_url's rule): a signed
    Storage URL's `?token=` opens the customer's activation QR code, so it never leaves the database."""
    return None if url is None else url.split("#", 1)[0].split("?", 1)[0]


def operator_reason(what: str, note: str | None) -> str:
    """The `order_transitions.reason` of a move an operator made (`note` as `stored_note` made it)."""
    return f"{what}: {note}" if note else what


NOTE_MAX_CHARS = 500  # operator_actions.note's CHECK


def stored_note(note: str | None) -> str | None:
    """An operator's note as it is stored (audit row, transition reason): a card number, key or token
    pasted into it is redacted like a log line, since both tables are read back in timelines."""
    return None if note is None else redact(note)[:NOTE_MAX_CHARS]
