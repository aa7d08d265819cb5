"""The operator's order actions: each reads the order under its row lock, asks `order_ops` whether it may
act, and writes its `operator_actions` row in the transaction of the change it makes.

    re-drive (from the current state)   one transaction: lock order and event, audit row (and the
                                        event into the outbox if it was never queued); then the publish
                                        and its stamp, after the commit (no lock is held while the broker
                                        confirms); a publish the broker refuses is recorded in a second
                                        audit row, and the next re-drive publishes it
    re-drive needs_attention → "to"     one transaction: move, audit row, event into the outbox; then
                                        the publish (a consumer must see the move, so it comes after
                                        the commit; a lost publish is made by the next re-drive)
    retry-refund                        one transaction: (needs_attention → refund_pending), audit row;
                                        then compensation.fail_and_refund, whose Stripe call carries
                                        `refund:<txn>` as before, so no retry can refund twice; if Stripe
                                        or the broker does not answer, a reopened order goes back to
                                        needs_attention and a second audit row says where it was left
    retry-refund of a refunded order    refunded by the system: the announcements again, with the
                                        same event ids every time (no refund, notify emails once)
    resolve                             one transaction: needs_attention → delivered|refunded, audit row
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg

from esim_common import outbox
from esim_common.compensation import fail_and_refund
from esim_common.errors import TransientError
from esim_common.events import Event, OrderFunded, OrderPaid, OrderProvisioned
from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import StripeGateway
from esim_common.publisher import EventPublisher
from reconcile import order_ops, sweep_queries
from reconcile import order_queries as q
from reconcile.order_ops import MovedOn, NotAllowed
from reconcile.order_schemas import (
    Amount,
    EventSource,
    OrderDetail,
    OrderList,
    OrderSummary,
    OrderTimeline,
    RedriveRequest,
    RedriveResponse,
    ResolveRequest,
    ResolveResponse,
    RetryRefundResponse,
    StepTimes,
    StripeFacts,
    ZenditFacts,
)
from reconcile.sweep_queries import StuckOrder

log = logging.getLogger("esim.reconcile.orders")

S = OrderStatus


class OrderNotFound(LookupError):
    def __init__(self, transaction_id: str) -> None:
        super().__init__(f"no order with transaction id {transaction_id}")


class RefundRefused(Exception):
    """Stripe refused the refund again; the order is back in needs_attention."""


class TryAgain(Exception):
    """The broker or Stripe did not answer; the message says what state the order was left in."""


# ------------------------------------------------------------------------------------------- reads
async def list_orders(
    pool: asyncpg.Pool, statuses: tuple[OrderStatus, ...], older_than_minutes: int, limit: int
) -> OrderList:
    total, rows = await q.list_orders(pool, statuses, older_than_minutes, limit)
    return OrderList(
        statuses=[s.value for s in statuses],
        older_than_minutes=older_than_minutes,
        count=total,
        orders=[
            OrderSummary(
                transaction_id=r.transaction_id,
                status=r.status.value,
                price=Amount(amount=r.price, currency=r.currency),
                paid_at=r.paid_at,
                last_change_at=r.changed_at,
                age_seconds=r.age_seconds,
                failure_reason=r.failure_reason,
            )
            for r in rows
        ],
    )


async def timeline(pool: asyncpg.Pool, transaction_id: str) -> OrderTimeline:
    order = await get_order(pool, transaction_id)
    if order is None:
        raise OrderNotFound(transaction_id)
    return OrderTimeline(
        order=_detail(order),
        transitions=await q.transitions(pool, transaction_id),
        events=await q.events(pool, transaction_id),
        stripe_events=await q.stripe_events(pool, transaction_id),
        emails=await q.emails(pool, transaction_id),
        topups=await q.topups(pool, transaction_id),
        operator_actions=await q.actions(pool, transaction_id),
    )


def _detail(order: Order) -> OrderDetail:
    """The order for an operator's eyes: named fields only, so a column added later (or the eSIM's
    activation code, or a signed URL's token) cannot slip into an answer."""
    cost = order.zendit_cost_money
    return OrderDetail(
        transaction_id=order.transaction_id,
        status=order.status.value,
        offer_id=order.offer_id,
        price=Amount(amount=order.price, currency=order.currency),
        user_id=order.user_id,
        recipient_email=order.recipient_email,
        recipient_name=order.recipient_name,
        failure_reason=order.failure_reason,
        funding_attempts=order.funding_attempts,
        created_at=order.created_at,
        updated_at=order.updated_at,
        steps=StepTimes(
            paid_at=order.paid_at,
            funded_at=order.funded_at,
            purchased_at=order.purchased_at,
            qr_stored_at=order.qr_stored_at,
            emailed_at=order.emailed_at,
            failed_at=order.failed_at,
            refunded_at=order.refunded_at,
        ),
        stripe=StripeFacts(
            checkout_session_id=order.stripe_checkout_session_id,
            payment_intent_id=order.stripe_payment_intent_id,
            capture_method=order.capture_method,
            capture_status=order.capture_status,
            captured_at=order.captured_at,
            capture_failure_reason=order.capture_failure_reason,
            refund_id=order.refund_id,
            refund_status=order.refund_status,
        ),
        zendit=ZenditFacts(
            transaction_id=order.zendit_transaction_id,
            status=order.zendit_status,
            purchase_attempts=order.purchase_attempts,
            cost=Amount(amount=cost.amount, currency=cost.currency) if cost else None,
            iccid=order.iccid,
            smdp_address=order.smdp_address,
            qr_code_url=order_ops.shareable_url(order.qr_code_url),
        ),
    )


# ------------------------------------------------------------------------------------------- re-drive
async def redrive(
    pool: asyncpg.Pool, publisher: EventPublisher, transaction_id: str, request: RedriveRequest
) -> RedriveResponse:
    if request.to is not None:
        return await _redrive_by_hand(pool, publisher, transaction_id, request)
    return await redrive_from_state(pool, publisher, transaction_id, note=order_ops.stored_note(request.note))


async def redrive_from_state(
    pool: asyncpg.Pool,
    publisher: EventPublisher,
    transaction_id: str,
    *,
    note: str | None = None,
    action: str = order_ops.REDRIVE_ACTION,
    found_stuck: StuckOrder | None = None,
) -> RedriveResponse:
    """The driving event of the order's state again, audited as `action`: the operator's re-drive and
    the scheduled sweep's (`auto_redrive`, which passes the order as it found it stuck: MovedOn if the
    order changed since, or someone re-drove it since, and nothing is written)."""
    async with pool.acquire() as conn, conn.transaction():
        order = await _locked(conn, transaction_id)
        if found_stuck is not None:
            await _check_still_stuck(conn, order, found_stuck)
        event_type = order_ops.redrive_event(order)
        queued = await q.latest_event(conn, transaction_id, event_type.routing_key)
        source: EventSource
        if queued is not None:
            event = event_type.model_validate_json(queued.payload)
            source = "republished" if queued.published_at else "pending"
        else:  # never queued (an order from before the outbox carried this event, or moved by hand)
            key = f"operator-redrive:{event_type.routing_key}:{transaction_id}"
            event = await _build(conn, event_type, order, outbox.stable_event_id(key))
            await outbox.add(conn, event)
            source = "rebuilt"
        detail = _detail_of(order.status, None, event, source)
        action_id = await q.record_action(conn, transaction_id, action, detail, note)
    # After the commit, as the outbox publishes: what the audit row says was asked is durable before the
    # event can go out, and the order's row is not locked while the broker confirms.
    by = "operator" if action == order_ops.REDRIVE_ACTION else "automatic"
    log.info(f"{by} re-drive", extra={"action_id": action_id, **detail})
    try:
        if source == "republished":  # stamped already: the same event, sent once more
            await publisher.publish(event)
        else:
            await outbox.publish_pending(pool, publisher, event)
    except Exception as exc:  # PublishFailed and connection errors alike: not durable
        failure = {**detail, "error": _name(exc)}
        await _record_outcome(pool, transaction_id, f"{action}_not_published", failure)
        log.warning("re-drive not published", extra={"routing_key": event.routing_key, "error": str(exc)})
        waits = "" if source == "republished" else ", it waits in the outbox"
        raise TryAgain(
            f"the broker did not take {event.routing_key}{waits}: order {transaction_id} is still "
            f"{order.status.value}, nothing was sent; re-drive it again (action {action_id} records this)"
        ) from exc
    return RedriveResponse(
        transaction_id=transaction_id,
        status=order.status.value,
        moved_from=None,
        routing_key=event.routing_key,
        event_id=event.event_id,
        event_source=source,
        action_id=action_id,
    )


async def _check_still_stuck(conn: asyncpg.Connection, order: Order, found: StuckOrder) -> None:
    """Under the order's row lock: the sweep's search is stale if the order changed, or if a re-drive
    (an operator's, committed between the search and this lock) now holds it off for a deadline."""
    order_ops.check_unchanged(order, found.status, found.updated_at)
    if await sweep_queries.redriven_within(conn, order.transaction_id, found.deadline):
        raise MovedOn(f"order {order.transaction_id} was re-driven since it was found stuck")


async def _redrive_by_hand(
    pool: asyncpg.Pool, publisher: EventPublisher, transaction_id: str, request: RedriveRequest
) -> RedriveResponse:
    """needs_attention → funding | provisioned, then its driving event. Published after the commit: a
    consumer that got the message before the move was visible would find needs_attention and drop it."""
    assert request.to is not None
    note = order_ops.stored_note(request.note)
    async with pool.acquire() as conn, conn.transaction():
        order = await _locked(conn, transaction_id)
        target, event_type = order_ops.manual_redrive(order, request.to)
        reason = order_ops.operator_reason("operator re-drive", note)
        await transition(conn, transaction_id, target, reason=reason)
        event = await _build(conn, event_type, order, uuid.uuid4())
        await outbox.add(conn, event)
        detail = _detail_of(order.status, target, event, "operator")
        action_id = await q.record_action(conn, transaction_id, "redrive", detail, note)
    log.info("operator re-drive", extra={"action_id": action_id, **detail})
    await _publish_pending(pool, publisher, event, moved_to=target)
    return RedriveResponse(
        transaction_id=transaction_id,
        status=target.value,
        moved_from=order.status.value,
        routing_key=event.routing_key,
        event_id=event.event_id,
        event_source="operator",
        action_id=action_id,
    )


async def _build(
    conn: asyncpg.Connection, event_type: type[Event], order: Order, event_id: uuid.UUID
) -> Event:
    """The event as its own service builds it (webhook's order.paid, funding's order.funded,
    provisioning's order.provisioned), from the order's row."""
    txn = order.transaction_id
    if event_type is OrderPaid:
        if not order.stripe_payment_intent_id:
            raise NotAllowed(f"order {txn} has no PaymentIntent: it was never paid through Stripe")
        return OrderPaid(
            event_id=event_id,
            transaction_id=txn,
            offer_id=order.offer_id,
            price=order.price_money,
            payment_intent_id=order.stripe_payment_intent_id,
        )
    if event_type is OrderFunded:
        cost = order.zendit_cost_money
        if cost is None:
            raise NotAllowed(f"order {txn} has no Zendit cost recorded: re-drive it from funding instead")
        return OrderFunded(
            event_id=event_id,
            transaction_id=txn,
            offer_id=order.offer_id,
            zendit_cost=cost,
            topup_id=await q.latest_succeeded_topup(conn, txn),
        )
    if event_type is OrderProvisioned:
        url = order_ops.shareable_url(order.qr_code_url)
        if not url or not order.zendit_transaction_id:
            raise NotAllowed(f"order {txn} has no stored QR code: provisioning never finished")
        return OrderProvisioned(
            event_id=event_id,
            transaction_id=txn,
            zendit_transaction_id=order.zendit_transaction_id,
            qr_code_url=url,
        )
    raise AssertionError(f"no re-drive builds {event_type.__name__}")


def _detail_of(
    status: OrderStatus, moved_to: OrderStatus | None, event: Event, source: EventSource
) -> dict[str, Any]:
    return {
        "from": status.value,
        "to": moved_to.value if moved_to else None,
        "routing_key": event.routing_key,
        "event_id": str(event.event_id),
        "event_source": source,
    }


async def _publish_pending(
    pool: asyncpg.Pool, publisher: EventPublisher, event: Event, *, moved_to: OrderStatus
) -> None:
    try:
        await outbox.publish_pending(pool, publisher, event)
    except Exception as exc:
        txn = event.transaction_id
        detail = {"routing_key": event.routing_key, "event_id": str(event.event_id), "error": _name(exc)}
        await _record_outcome(pool, txn, "redrive_not_published", detail)
        log.warning("re-drive not published", extra={"routing_key": event.routing_key, "error": str(exc)})
        raise TryAgain(
            f"order {txn} was moved to {moved_to.value} and its {event.routing_key} queued, but the broker "
            f"did not take it: POST /api/admin/orders/{txn}/redrive (no body) to publish it"
        ) from exc


# ------------------------------------------------------------------------------------------- refunds
async def retry_refund(
    pool: asyncpg.Pool,
    publisher: EventPublisher,
    stripe: StripeGateway,
    transaction_id: str,
    note: str | None,
) -> RetryRefundResponse:
    note = order_ops.stored_note(note)
    async with pool.acquire() as conn, conn.transaction():
        order = await _locked(conn, transaction_id)
        plan = order_ops.refund_retry_plan(order, q.moves(await q.transitions(conn, transaction_id)))
        if plan.reopen:
            # The refund's failure overwrote the order's failure reason; the failed step's is restored
            # so that the customer's email (order.failed) names what really went wrong.
            reason = order_ops.operator_reason("operator refund retry", note)
            await transition(
                conn, transaction_id, S.REFUND_PENDING, reason=reason, failure_reason=plan.reason
            )
        detail = {
            "from": order.status.value,
            "failed_state": plan.failed_state.value,
            "step": plan.step,
            "announce_only": plan.announce_only,
        }
        action_id = await q.record_action(conn, transaction_id, "retry_refund", detail, note)
    log.info("operator refund retry", extra={"action_id": action_id, **detail})
    try:
        final = await fail_and_refund(
            pool=pool,
            stripe=stripe,
            publisher=StableAnnouncements(publisher),
            transaction_id=transaction_id,
            failed_state=plan.failed_state,
            step=plan.step,
            reason=plan.reason,
        )
    except TransientError as exc:  # Stripe or the broker: the same call later resumes where this stopped
        raise await _interrupted(pool, transaction_id, order, plan, exc) from exc
    order = await _order(pool, transaction_id)
    if final == S.NEEDS_ATTENTION:
        raise RefundRefused(
            f"Stripe refused the refund again ({order.failure_reason}); order {transaction_id} is back in "
            "needs_attention. Refund it in the Stripe dashboard, then POST .../resolve "
            '{"outcome": "refunded", "note": ...}'
        )
    return RetryRefundResponse(
        transaction_id=transaction_id,
        status=order.status.value,
        refund_id=order.refund_id,
        refund_status=order.refund_status,
        announced_again=plan.announce_only,
        action_id=action_id,
    )


async def _interrupted(
    pool: asyncpg.Pool, transaction_id: str, before: Order, plan: order_ops.RefundPlan, exc: Exception
) -> TryAgain:
    """Leave the order where an operator finds it, record where that is, and say so. An order this
    retry reopened goes back to needs_attention (with the refund's failure reason it had): left in
    refund_pending it would wait for a message nobody sends."""
    log.warning("operator refund retry interrupted", extra={"error": str(exc)[:200]})
    async with pool.acquire() as conn, conn.transaction():
        order = await _locked(conn, transaction_id)
        if plan.reopen and order.status == S.REFUND_PENDING:
            await transition(
                conn,
                transaction_id,
                S.NEEDS_ATTENTION,
                reason=f"operator refund retry interrupted: {_name(exc)}",
                failure_reason=before.failure_reason,
            )
        left = S.NEEDS_ATTENTION if plan.reopen and order.status == S.REFUND_PENDING else order.status
        detail = {"from": before.status.value, "left": left.value, "error": _name(exc)}
        await q.record_action(conn, transaction_id, "retry_refund_interrupted", detail, None)
    log.info("operator refund retry left the order", extra=detail)
    if left == S.REFUNDED:  # only the announcement (order.refunded, order.failed) is missing
        return TryAgain(
            f"order {transaction_id} was refunded (refund {order.refund_id}) but the broker did not take "
            "its announcement, so the customer is not emailed yet: call retry-refund again to announce it "
            "(it refunds nothing)"
        )
    return TryAgain(
        f"interrupted ({_name(exc)}); order {transaction_id} is {left.value}. Call retry-refund again "
        "later: it carries the same Stripe idempotency key, so it cannot refund twice"
    )


class StableAnnouncements:
    """The publisher the compensation announces through (it only calls `publish`): each announcement's
    id is derived from the order (and the failed step), so every retry-refund of an order publishes the
    same order.refunded and order.failed, and a consumer that remembers message ids sees a redelivery."""

    def __init__(self, publisher: EventPublisher) -> None:
        self._publisher = publisher

    async def publish(self, event: Event) -> None:
        step = getattr(event, "step", "")
        key = f"retry-refund:{event.routing_key}:{step}:{event.transaction_id}"
        await self._publisher.publish(event.model_copy(update={"event_id": outbox.stable_event_id(key)}))


# ------------------------------------------------------------------------------------------- resolve
async def resolve(pool: asyncpg.Pool, transaction_id: str, request: ResolveRequest) -> ResolveResponse:
    """No event is published: what was done happened outside the system, and order.delivered would,
    for instance, make funding capture a payment the operator may have settled otherwise."""
    note = order_ops.stored_note(request.note)
    async with pool.acquire() as conn, conn.transaction():
        order = await _locked(conn, transaction_id)
        target = order_ops.resolve_target(order, request.outcome)
        await transition(
            conn, transaction_id, target, reason=order_ops.operator_reason("operator resolved", note)
        )
        detail = {"from": order.status.value, "to": target.value}
        action_id = await q.record_action(conn, transaction_id, "resolve", detail, note)
    log.info("operator resolved an order", extra={"action_id": action_id, **detail})
    return ResolveResponse(transaction_id=transaction_id, status=target.value, action_id=action_id)


# ------------------------------------------------------------------------------------------- helpers
async def _locked(conn: asyncpg.Connection, transaction_id: str) -> Order:
    order = await get_order(conn, transaction_id, lock=True)
    if order is None:
        raise OrderNotFound(transaction_id)
    return order


async def _order(pool: asyncpg.Pool, transaction_id: str) -> Order:
    order = await get_order(pool, transaction_id)
    if order is None:
        raise OrderNotFound(transaction_id)
    return order


async def _record_outcome(
    pool: asyncpg.Pool, transaction_id: str, action: str, detail: dict[str, Any]
) -> None:
    """A second audit row: how an action that was recorded (and committed) ended."""
    async with pool.acquire() as conn:
        await q.record_action(conn, transaction_id, action, detail, None)


def _name(exc: BaseException) -> str:
    """An error's class for an audit row: never its message, which may quote a provider's answer."""
    return type(exc).__name__
