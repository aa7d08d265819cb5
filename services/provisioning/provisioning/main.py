"""Wiring only: `create_app(settings)` builds the provisioning service; nothing connects until it starts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from esim_common.providers import stripe_gateway, zendit_client
from esim_common.service import ServiceContext, service_app
from esim_common.settings import Settings
from provisioning import handlers
from provisioning.phases import Provisioner
from provisioning.routes import qr_code_router
from provisioning.storage import LocalQrStorage, StorageKind, storage_kind

if TYPE_CHECKING:
    from provisioning.supabase_storage import SupabaseQrStorage

SERVICE = "provisioning"
log = logging.getLogger("esim.provisioning")


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE, settings)
    storage = qr_storage(settings)
    provisioner = Provisioner(
        ctx=ctx, zendit=zendit_client(settings), stripe=stripe_gateway(settings), storage=storage
    )
    handlers.register(ctx, provisioner)
    # The QR route serves the local directory; Supabase serves its own objects (public or signed URLs).
    routers = [qr_code_router(storage)] if isinstance(storage, LocalQrStorage) else []
    app = service_app(ctx, title=SERVICE, routers=routers)
    app.state.provisioner = provisioner
    _close_clients_on_shutdown(app, provisioner, storage)
    return app


def qr_storage(settings: Settings) -> LocalQrStorage | SupabaseQrStorage:
    url = settings.supabase_url or ""
    secret = settings.supabase_service_role_key
    key = secret.get_secret_value() if secret is not None else ""
    if storage_kind(url, key) == StorageKind.LOCAL:
        log.info(
            "QR codes are stored in a local directory", extra={"qr_storage_dir": settings.qr_storage_dir}
        )
        return LocalQrStorage(Path(settings.qr_storage_dir), settings.qr_public_base_url)
    # Imported only when used: the supabase package adds ~10 MB and half a second to start-up.
    from provisioning.supabase_storage import SupabaseQrStorage

    seconds = settings.supabase_signed_url_seconds
    log.info(
        "QR codes are stored in Supabase Storage",
        extra={
            "supabase_url": url,
            "bucket": settings.supabase_bucket,
            "urls": f"signed, valid {seconds} s" if seconds else "public (the bucket must be public)",
        },
    )
    return SupabaseQrStorage(
        url=url,
        service_role_key=key,
        bucket=settings.supabase_bucket,
        signed_url_seconds=seconds,
    )


def _close_clients_on_shutdown(
    app: FastAPI, provisioner: Provisioner, storage: LocalQrStorage | SupabaseQrStorage
) -> None:
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
            await storage.aclose()

    app.router.lifespan_context = lifespan
