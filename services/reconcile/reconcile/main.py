"""Wiring only: `create_app(settings)` builds the reconcile service; nothing connects until it starts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI

from esim_common.service import ServiceContext, run_while_serving, service_app
from esim_common.settings import Settings
from reconcile import handlers
from reconcile.admin import admin_router
from reconcile.business_metrics import BusinessMetrics
from reconcile.dlq_admin import dlq_admin_router
from reconcile.dlq_monitor import DeadLetterMonitor
from reconcile.failure_admin import failure_admin_router
from reconcile.issuing_check import issuing_mismatches
from reconcile.ledger_checks import ExtraCheck, scheduled_check
from reconcile.mismatch_admin import mismatch_admin_router
from reconcile.order_admin import order_admin_router
from reconcile.stuck_rules import stuck_rules
from reconcile.sweep import ReconcileSweep

SERVICE_NAME = "reconcile"
DEFAULT_PORT = 8084


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE_NAME, settings)

    def issuing_checks() -> Sequence[ExtraCheck]:
        """The Issuing card checks, stored with the ledger checks on every run (sweep and run-now)."""
        return (
            ExtraCheck(
                "stripe_issuing",
                ("card_charged_without_credit", "card_still_active"),
                lambda: issuing_mismatches(ctx.pool, settings, now=datetime.now(UTC)),
            ),
        )

    handlers.register(ctx)
    app = service_app(
        ctx,
        title=SERVICE_NAME,
        routers=[
            admin_router(ctx),
            order_admin_router(ctx),
            dlq_admin_router(ctx),
            failure_admin_router(ctx),
            mismatch_admin_router(ctx, extra_checks=issuing_checks),
        ],
    )
    business_metrics = BusinessMetrics(lambda: ctx.pool)
    app.state.business_metrics = business_metrics
    run_while_serving(app, business_metrics.run_forever)
    dead_letters = DeadLetterMonitor(settings.amqp_url, ctx.topology)
    app.state.dead_letter_monitor = dead_letters
    run_while_serving(app, dead_letters.run_forever)
    sweep = ReconcileSweep(
        pool=lambda: ctx.pool,
        publisher=ctx.publisher,
        rules=stuck_rules(settings),
        interval_seconds=settings.reconcile_interval,
        checks=[scheduled_check(lambda: ctx.pool, settings, extra=issuing_checks)],
        checks_every=timedelta(seconds=settings.reconcile_ledger_interval),
    )
    app.state.reconcile_sweep = sweep
    run_while_serving(app, sweep.run_forever)
    return app
