"""The provisioning consumer: `order.funded` in; `order.provisioned`, `order.paid` (fund again) or the
failure path (`order.failed` + `order.refunded`) out. The phases live in `phases.py`."""

from __future__ import annotations

from esim_common.consumer import consume
from esim_common.events import OrderFunded
from esim_common.service import ServiceContext
from provisioning.phases import Provisioner

QUEUE = "provisioning.order-funded"


def register(ctx: ServiceContext, provisioner: Provisioner) -> None:
    async def on_order_funded(event: OrderFunded) -> None:
        """Buy the funded order's eSIM from Zendit, store its QR code, announce order.provisioned."""
        await provisioner.on_order_funded(event)

    async def on_purchase_failed(event: OrderFunded, reason: str) -> None:
        await provisioner.on_failure(event, reason)

    consume(ctx.broker, ctx.topology, QUEUE, OrderFunded, on_order_funded, on_failure=on_purchase_failed)
