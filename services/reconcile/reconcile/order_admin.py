"""The admin order API under `/api/admin/orders`, behind the admin bearer token (`admin.admin_guard`).

    GET  /orders?status=…&older_than_minutes=…&limit=…   orders by state and age, most recently stuck first
    GET  /orders/{transaction_id}                        the order's whole timeline
    POST /orders/{transaction_id}/redrive                publish the event that drives its state again
    POST /orders/{transaction_id}/retry-refund           finish a failed order's refund (same Stripe key)
    POST /orders/{transaction_id}/resolve                needs_attention → delivered | refunded, by hand

The guard is a router dependency, so it runs before anything else: a body is read (by a dependency) only
once the token was accepted. Refusals by the rules are 409s whose message says what to do instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel

from esim_common.logging import bind_transaction_id
from esim_common.orders import IllegalTransition
from esim_common.providers import stripe_gateway
from esim_common.service import ServiceContext
from reconcile import order_actions, order_ops
from reconcile.admin import admin_guard, json_body
from reconcile.domain import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from reconcile.order_actions import OrderNotFound, RefundRefused, TryAgain
from reconcile.order_ops import NotAllowed
from reconcile.order_schemas import (
    OrderList,
    OrderTimeline,
    RedriveRequest,
    RedriveResponse,
    ResolveRequest,
    ResolveResponse,
    RetryRefundRequest,
    RetryRefundResponse,
)
from reconcile.schemas import ErrorResponse

log = logging.getLogger("esim.reconcile.admin")

T = TypeVar("T")

# A month: longer-stuck orders are still listed with the default (0), this only bounds the filter.
MAX_OLDER_THAN_MINUTES = 30 * 24 * 60

TransactionId = Annotated[str, Path(min_length=1, max_length=64, description="The order's transaction id.")]

Responses = dict[int | str, dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_UNAUTHORIZED: Responses = {status.HTTP_401_UNAUTHORIZED: _error("No valid bearer token.")}
_NOT_FOUND: Responses = {status.HTTP_404_NOT_FOUND: _error("No order with this transaction id.")}
_CONFLICT: Responses = {
    status.HTTP_409_CONFLICT: _error("Not allowed in the order's state; says what to do instead.")
}
_INVALID: Responses = {
    status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid request; the error says why."}
}
# The bodies are read by `json_body` (admin.MAX_BODY_BYTES).
_TOO_LARGE: Responses = {status.HTTP_413_CONTENT_TOO_LARGE: _error("Request body too large.")}
_UNAVAILABLE: Responses = {
    status.HTTP_503_SERVICE_UNAVAILABLE: _error("The broker or Stripe did not answer.")
}


def _documented_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def _answer(transaction_id: str, work: Awaitable[T]) -> T:
    """Run `work` with the order's id on every log line; the actions' refusals become HTTP errors."""
    with bind_transaction_id(transaction_id):
        try:
            return await work
        except OrderNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
        except (NotAllowed, IllegalTransition) as exc:  # IllegalTransition: it moved meanwhile
            log.info("admin order action refused", extra={"error": str(exc)})
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
        except RefundRefused as exc:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc)) from None
        except TryAgain as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None


def order_admin_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(
        prefix="/api/admin",
        tags=["admin: orders"],
        dependencies=[Depends(admin_guard(ctx))],
        responses=_UNAUTHORIZED,
    )

    @router.get("/orders", responses=_INVALID)
    async def list_orders(
        order_status: Annotated[
            list[str] | None,
            Query(
                alias="status",
                description="Repeat for several states; default: every state that is not final.",
            ),
        ] = None,
        older_than_minutes: Annotated[
            int, Query(ge=0, le=MAX_OLDER_THAN_MINUTES, description="Unchanged for at least this long.")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = DEFAULT_LIST_LIMIT,
    ) -> OrderList:
        """Orders by state and age (time since their last state change), most recently stuck first."""
        try:
            statuses = order_ops.parse_statuses(order_status)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
        return await order_actions.list_orders(ctx.pool, statuses, older_than_minutes, limit)

    @router.get("/orders/{transaction_id}", responses=_NOT_FOUND)
    async def order_timeline(transaction_id: TransactionId) -> OrderTimeline:
        """The order (no card data, no activation code), every state change, its events, Stripe webhook
        events, emails, wallet top-ups and operator actions."""
        return await _answer(transaction_id, order_actions.timeline(ctx.pool, transaction_id))

    @router.post(
        "/orders/{transaction_id}/redrive",
        responses={**_NOT_FOUND, **_CONFLICT, **_TOO_LARGE, **_INVALID, **_UNAVAILABLE},
        openapi_extra=_documented_body(RedriveRequest, required=False),
    )
    async def redrive(
        transaction_id: TransactionId, body: Annotated[RedriveRequest, Depends(json_body(RedriveRequest))]
    ) -> RedriveResponse:
        """Publish again the event that drives the order on from its state: order.paid (paid, funding,
        awaiting_funds), order.funded (funded, purchasing), order.provisioned (provisioned). Safe to
        repeat: consumers act on the order's state. A needs_attention order moves only with
        `{"to": "funding" | "provisioned", "note": ...}`. Other states: 409 with what to do instead."""
        return await _answer(
            transaction_id, order_actions.redrive(ctx.pool, ctx.publisher, transaction_id, body)
        )

    @router.post(
        "/orders/{transaction_id}/retry-refund",
        responses={
            **_NOT_FOUND,
            **_CONFLICT,
            **_TOO_LARGE,
            **_INVALID,
            status.HTTP_502_BAD_GATEWAY: _error("Stripe refused the refund again (needs_attention)."),
            **_UNAVAILABLE,
        },
        openapi_extra=_documented_body(RetryRefundRequest, required=False),
    )
    async def retry_refund(
        transaction_id: TransactionId,
        body: Annotated[RetryRefundRequest, Depends(json_body(RetryRefundRequest))],
    ) -> RetryRefundResponse:
        """Finish the refund of a failed order (topup_failed, purchase_failed, refund_pending, or
        needs_attention after a refund Stripe refused) through the services' own compensation. Its
        Stripe idempotency key is the one used before, so no number of retries refunds twice. An order
        whose eSIM Zendit delivered is never refunded here (409). An order the system refunded already
        gets its order.refunded and order.failed published again (`announced_again`; same event ids,
        one email): the way out when the broker refused them. Stripe or the broker not answering is a
        503 that says where the order was left (a reopened order goes back to needs_attention)."""

        async def work() -> RetryRefundResponse:
            async with stripe_gateway(ctx.settings) as stripe:
                return await order_actions.retry_refund(
                    ctx.pool, ctx.publisher, stripe, transaction_id, body.note
                )

        return await _answer(transaction_id, work())

    @router.post(
        "/orders/{transaction_id}/resolve",
        responses={**_NOT_FOUND, **_CONFLICT, **_TOO_LARGE, **_INVALID},
        openapi_extra=_documented_body(ResolveRequest, required=True),
    )
    async def resolve(
        transaction_id: TransactionId, body: Annotated[ResolveRequest, Depends(json_body(ResolveRequest))]
    ) -> ResolveResponse:
        """Mark a needs_attention order delivered or refunded: the operator did it outside the system.
        Publishes nothing."""
        return await _answer(transaction_id, order_actions.resolve(ctx.pool, transaction_id, body))

    return router
