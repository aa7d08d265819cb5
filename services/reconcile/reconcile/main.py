"""Wiring only: `create_app(settings)` builds the reconcile service; nothing connects until it starts."""

from __future__ import annotations

from fastapi import FastAPI

from esim_common.service import ServiceContext, run_while_serving, service_app
from esim_common.settings import Settings
from reconcile import handlers
from reconcile.admin import admin_router
from reconcile.business_metrics import BusinessMetrics
from reconcile.dlq_admin import dlq_admin_router
from reconcile.dlq_monitor import DeadLetterMonitor
from reconcile.order_admin import order_admin_router

SERVICE_NAME = "reconcile"
DEFAULT_PORT = 8084


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE_NAME, settings)
    handlers.register(ctx)
    app = service_app(
        ctx,
        title=SERVICE_NAME,
        routers=[admin_router(ctx), order_admin_router(ctx), dlq_admin_router(ctx)],
    )
    business_metrics = BusinessMetrics(lambda: ctx.pool)
    app.state.business_metrics = business_metrics
    run_while_serving(app, business_metrics.run_forever)
    dead_letters = DeadLetterMonitor(settings.amqp_url, ctx.topology)
    app.state.dead_letter_monitor = dead_letters
    run_while_serving(app, dead_letters.run_forever)
    return app
