"""Wiring only: `create_app(settings)` builds the reconcile service; nothing connects until it starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI

from esim_common.service import ServiceContext, service_app
from esim_common.settings import Settings
from reconcile import handlers
from reconcile.admin import admin_router
from reconcile.business_metrics import BusinessMetrics

SERVICE_NAME = "reconcile"
DEFAULT_PORT = 8084


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE_NAME, settings)
    handlers.register(ctx)
    app = service_app(ctx, title=SERVICE_NAME, routers=[admin_router(ctx)])
    business_metrics = BusinessMetrics(lambda: ctx.pool)
    app.state.business_metrics = business_metrics
    _run_while_serving(app, business_metrics.run_forever)
    return app


def _run_while_serving(app: FastAPI, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `loop` as a task between the service's start-up (broker, pool) and its shutdown."""
    service_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_lifespan(app):
            task = asyncio.create_task(loop())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
