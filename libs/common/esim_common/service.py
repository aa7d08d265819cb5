"""What every service process shares: its context (settings, broker, publisher, pool) and its app shell.

A service's `main.py` only wires:

    def create_app(settings: Settings) -> FastAPI:
        ctx = ServiceContext.build("funding", settings)
        handlers.register(ctx)                      # consume(...) calls: before the broker starts
        return service_app(ctx, title="funding")    # /healthz, /metrics, lifespan

    if __name__ == "__main__":
        run(create_app(load_settings()), load_settings(), default_port=8081)

Nothing connects at import time or in `create_app`; the lifespan declares the topology, waits for
Postgres, starts the broker (consumers included), and stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from faststream.rabbit import RabbitBroker
from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from esim_common import crash_points
from esim_common.db import create_pool
from esim_common.logging import configure_logging
from esim_common.publisher import EventPublisher, create_broker
from esim_common.settings import Settings
from esim_common.topology import Topology, declare_from_url, esim_topology

log = logging.getLogger("esim.service")

# /healthz must answer fast even when a dependency hangs: a probe that times out is a restart.
HEALTH_CHECK_TIMEOUT_SECONDS = 2.0


@dataclass
class ServiceContext:
    """Everything a handler or route needs, built without I/O and started by the app's lifespan."""

    name: str
    settings: Settings
    topology: Topology
    broker: RabbitBroker
    publisher: EventPublisher
    _pool: asyncpg.Pool | None = field(default=None, repr=False)

    @classmethod
    def build(cls, name: str, settings: Settings) -> ServiceContext:
        configure_logging(service=name, level=settings.log_level, secrets=settings.secret_values().values())
        crash_points.arm(settings.crash_points)
        broker = create_broker(
            settings.amqp_url,
            prefetch=settings.broker_prefetch,
            middlewares=(RabbitPrometheusMiddleware(registry=REGISTRY, app_name=name),),
        )
        topology = esim_topology(exchange=settings.exchange_name, prefix=settings.topology_prefix)
        return cls(
            name=name,
            settings=settings,
            topology=topology,
            broker=broker,
            publisher=EventPublisher(broker, topology),
        )

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"{self.name}: the database pool is used before the service started")
        return self._pool

    async def start(self) -> None:
        await declare_from_url(self.settings.amqp_url, self.topology)
        self._pool = await create_pool(
            self.settings.database_url,
            min_size=self.settings.database_pool_min_size,
            max_size=self.settings.database_pool_max_size,
            statement_cache_size=self.settings.database_statement_cache_size,
        )
        await self.broker.start()
        # FastStream's own "waiting for messages" line per subscriber is DEBUG (create_broker): say here
        # which queues this process consumes, so a missing subscription shows in the start-up line.
        queues = sorted(s.queue.name for s in self.broker.subscribers if isinstance(s, RabbitSubscriber))
        log.info("service started", extra={"service": self.name, "consuming": queues})

    async def stop(self) -> None:
        await self.broker.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        log.info("service stopped", extra={"service": self.name})

    async def health(self) -> dict[str, bool]:
        async def database_ok() -> bool:
            if self._pool is None:
                return False
            await self._pool.fetchval("SELECT 1")
            return True

        checks: dict[str, bool] = {}
        for name, probe in (
            ("broker", self.broker.ping(HEALTH_CHECK_TIMEOUT_SECONDS)),
            ("database", database_ok()),
        ):
            try:
                checks[name] = bool(await asyncio.wait_for(probe, HEALTH_CHECK_TIMEOUT_SECONDS))
            except Exception:
                checks[name] = False
        return checks


def service_app(ctx: ServiceContext, *, title: str, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """A FastAPI app with the service's lifespan, `/healthz`, `/livez`, `/metrics` and its own routers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.start()
        try:
            yield
        finally:
            await ctx.stop()

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.ctx = ctx

    @app.get(
        "/healthz",
        tags=["operations"],
        responses={503: {"description": "The broker or the database does not answer."}},
    )
    async def healthz() -> JSONResponse:
        """The dependencies answer: `{"status": "ok", "broker": true, "database": true}`, or 503 saying
        which does not."""
        checks = await ctx.health()
        healthy = all(checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", **checks}, status_code=200 if healthy else 503
        )

    @app.get("/livez", tags=["operations"])
    async def livez() -> JSONResponse:
        """The process serves requests: `{"status": "alive"}`. Checks no dependency on purpose, so that a
        Kubernetes liveness probe restarts a hung process, not every replica during a database outage."""
        return JSONResponse({"status": "alive"})

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    )
    async def metrics() -> Response:
        """The process's Prometheus metrics (FastStream's broker metrics included)."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


MAX_CONCURRENT_REQUESTS = 1024


def run(app: FastAPI, settings: Settings, *, default_port: int) -> None:
    """Serve `app` until SIGTERM/SIGINT; uvicorn keeps our logging configuration (log_config=None)."""
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port or default_port,
        log_config=None,
        # A ceiling on connections and requests in progress (uvicorn answers 503 beyond it), so that
        # unauthenticated callers cannot make a process hold unbounded bodies and sockets.
        limit_concurrency=MAX_CONCURRENT_REQUESTS,
    )


def run_while_serving(app: FastAPI, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `loop` as a task between the service's start-up (broker, pool) and its shutdown. The loop
    handles its own errors; should it end anyway, that is logged, never silent."""
    service_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_lifespan(app):
            task = asyncio.create_task(loop(), name=getattr(loop, "__qualname__", "background loop"))
            task.add_done_callback(_log_if_ended)
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # an end is logged already
                    await task

    app.router.lifespan_context = lifespan


def _log_if_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        exc = task.exception()
        error = f"{type(exc).__name__}: {exc}" if exc else None
        log.error("background loop ended", extra={"loop": task.get_name(), "error": error})
