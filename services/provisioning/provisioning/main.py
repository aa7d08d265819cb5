"""Wiring only: `create_app(settings)` builds the provisioning service; nothing connects until it starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from esim_common.providers import stripe_gateway, zendit_client
from esim_common.service import ServiceContext, service_app
from esim_common.settings import Settings
from provisioning import handlers
from provisioning.phases import Provisioner
from provisioning.routes import qr_code_router
from provisioning.storage import LocalQrStorage

SERVICE = "provisioning"


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE, settings)
    # Supabase Storage (SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY) is a later issue: another QrStorage here.
    storage = LocalQrStorage(Path(settings.qr_storage_dir), settings.qr_public_base_url)
    provisioner = Provisioner(
        ctx=ctx, zendit=zendit_client(settings), stripe=stripe_gateway(settings), storage=storage
    )
    handlers.register(ctx, provisioner)
    app = service_app(ctx, title=SERVICE, routers=[qr_code_router(storage)])
    app.state.provisioner = provisioner
    _close_clients_on_shutdown(app, provisioner)
    return app


def _close_clients_on_shutdown(app: FastAPI, provisioner: Provisioner) -> None:
    """Run the shell's lifespan (broker, pool), then close the HTTP clients after it has stopped."""
    shell_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with shell_lifespan(app):
                yield
        finally:
            await provisioner.zendit.aclose()
            await provisioner.stripe.aclose()

    app.router.lifespan_context = lifespan
