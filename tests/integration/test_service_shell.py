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
