"""Minimal `/checkout/success` and `/checkout/cancel` pages, for when SHOP_BASE_URL points at this service.

The default SHOP_BASE_URL is this service (the sandbox has no shop), so Checkout sends the customer
back here: without these pages the demo would end on a 404. A real shop serves its own pages and
reads the order through `GET /api/orders/{transactionId}?session_id=...`. The success page shows the
same public view, with the same rule: no matching session id, no order.
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from esim_common.order_repository import get_order
from webhook.order_status import holds_session, public_view
from webhook.ports import PortsDep

router = APIRouter(tags=["shop pages"], include_in_schema=False)

# The order moves from paid to delivered within seconds; reloading every few keeps the page current.
REFRESH_SECONDS = 3
_PAGE = "<!doctype html><meta charset='utf-8'>{refresh}<title>eSIM order</title><h1>{title}</h1><p>{body}</p>"


def _page(title: str, body: str, *, refresh: bool = False) -> HTMLResponse:
    meta = f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'>" if refresh else ""
    return HTMLResponse(_PAGE.format(refresh=meta, title=html.escape(title), body=body))


@router.get("/checkout/success")
async def checkout_success(
    ports: PortsDep,
    transaction_id: str = Query(default="", max_length=64),
    session_id: str = Query(default="", max_length=255),
) -> HTMLResponse:
    order = await get_order(ports.ctx.pool, transaction_id) if transaction_id else None
    if order is None or not holds_session(order, session_id):
        return _page("Order not found", "We could not find this order.")
    view = public_view(order)
    body = f"Order {html.escape(view.transaction_id)} is <b>{html.escape(view.status)}</b>."
    if view.qr_code_url:
        body += f" Your eSIM QR code: <a href='{html.escape(view.qr_code_url)}'>open</a> (also emailed)."
    return _page("Thank you for your order", body, refresh=view.qr_code_url is None)


@router.get("/checkout/cancel")
async def checkout_cancel() -> HTMLResponse:
    return _page("Payment cancelled", "You have not been charged. You can start again from the shop.")
