"""The shell every service runs in: it starts against the real broker and database and reports health."""

from __future__ import annotations

import aio_pika
import httpx
import pytest

from esim_common.service import ServiceContext, service_app
from esim_common.topology import delete_from_url

pytestmark = [pytest.mark.broker, pytest.mark.db]


async def test_a_started_service_is_healthy_serves_metrics_and_declares_its_topology(service_settings):
    ctx = ServiceContext.build("shell-test", service_settings)
    app = service_app(ctx, title="shell-test")
    await ctx.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            health = await client.get("/healthz")
            metrics = await client.get("/metrics")
        connection = await aio_pika.connect(service_settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(
                ctx.topology.queue("funding.order-paid").name, passive=True
            )
    finally:
        await ctx.stop()
        await delete_from_url(service_settings.amqp_url, ctx.topology)
    assert health.status_code == 200 and health.json() == {"status": "ok", "broker": True, "database": True}
    assert metrics.status_code == 200 and "esim_messages_processed_total" in metrics.text
    assert declared.name == f"{service_settings.topology_prefix}funding.order-paid"


async def test_a_service_whose_database_is_gone_reports_unhealthy(service_settings):
    ctx = ServiceContext.build("shell-test", service_settings)
    app = service_app(ctx, title="shell-test")
    await ctx.start()
    try:
        await ctx.pool.close()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            health = await client.get("/healthz")
    finally:
        ctx._pool = None
        await ctx.stop()
        await delete_from_url(service_settings.amqp_url, ctx.topology)
    assert health.status_code == 503 and health.json()["database"] is False


async def test_the_start_up_line_names_every_queue_the_service_consumes(service_settings, caplog):
    """FastStream's per-subscriber start-up line is DEBUG; ours says which queues this process consumes."""
    from esim_common.consumer import consume
    from esim_common.events import OrderPaid

    async def handler(event: OrderPaid) -> None:
        return None

    caplog.set_level("INFO", logger="esim.service")
    ctx = ServiceContext.build("shell-test", service_settings)
    consume(ctx.broker, ctx.topology, "funding.order-paid", OrderPaid, handler)
    await ctx.start()
    try:
        [started] = [r for r in caplog.records if r.getMessage() == "service started"]
    finally:
        await ctx.stop()
        await delete_from_url(service_settings.amqp_url, ctx.topology)
    assert started.consuming == [f"{service_settings.topology_prefix}funding.order-paid"]
