"""The provisioning consumers.

`provisioning.order-funded`: `order.funded` in; `order.provisioned`, `order.paid` (fund again) or the
failure path (`order.failed` + `order.refunded`) out. This message is the order's scheduled poll.

`provisioning.purchase-hint`: `zendit.purchase-updated` (a Zendit webhook) in: re-check that purchase
now. Its failure hook only logs: a hint never compensates anything. The phases live in `phases.py`.
"""

from __future__ import annotations

from esim_common.consumer import consume
from esim_common.events import OrderFunded, PurchaseUpdateHint
from esim_common.service import ServiceContext
from provisioning.phases import Provisioner

QUEUE = "provisioning.order-funded"
HINT_QUEUE = "provisioning.purchase-hint"


def register(ctx: ServiceContext, provisioner: Provisioner) -> None:
    async def on_order_funded(event: OrderFunded) -> None:
        """Buy the funded order's eSIM from Zendit, store its QR code, announce order.provisioned."""
        await provisioner.on_order_funded(event)

    async def on_purchase_failed(event: OrderFunded, reason: str) -> None:
        await provisioner.on_failure(event, reason)

    async def on_purchase_hint(hint: PurchaseUpdateHint) -> None:
        """Zendit's webhook named a purchase: fetch it with our key now, deliver it if it is DONE."""
        await provisioner.on_purchase_hint(hint)

    async def on_hint_failed(hint: PurchaseUpdateHint, reason: str) -> None:
        await provisioner.on_hint_failure(hint, reason)

    consume(ctx.broker, ctx.topology, QUEUE, OrderFunded, on_order_funded, on_failure=on_purchase_failed)
    consume(
        ctx.broker,
        ctx.topology,
        HINT_QUEUE,
        PurchaseUpdateHint,
        on_purchase_hint,
        on_failure=on_hint_failed,
    )
