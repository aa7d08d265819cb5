"""Wiring only: `create_app(settings)` builds the provisioning service; nothing connects until it starts.

At start-up the QR storage is verified before any message is consumed: a configuration that can never
store a QR code (a refused key, a missing bucket) stops the service with the setting to fix, rather than
being found at the first order, after the customer paid and Zendit delivered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from esim_common.providers import stripe_gateway, zendit_client
from esim_common.service import ServiceContext, service_app
from esim_common.settings import Settings
from provisioning import handlers, qr
from provisioning.phases import Provisioner
from provisioning.routes import qr_code_router
from provisioning.storage import LocalQrStorage, QrStorageError, QrStorageRefused, StorageKind, storage_kind

if TYPE_CHECKING:
    from provisioning.supabase_storage import SupabaseQrStorage

SERVICE = "provisioning"
log = logging.getLogger("esim.provisioning")


def create_app(settings: Settings) -> FastAPI:
    if not qr.can_decode():
        # Every DONE purchase would be paid for and then handed to an operator: refuse instead.
        raise qr.QrDecoderMissing()
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
    _verify_storage_and_close_clients(app, provisioner, storage)
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


async def verify_storage(storage: LocalQrStorage | SupabaseQrStorage) -> None:
    """Refuse to start on a storage configuration that will never work; start anyway on an outage."""
    try:
        await storage.verify()
    except QrStorageRefused as exc:
        log.critical(
            "QR storage refuses our configuration: not starting until it is fixed",
            extra={"reason": exc.reason, "error": str(exc)},
        )
        raise
    except QrStorageError as exc:
        log.warning(
            "QR storage could not be checked at start-up: starting anyway; saves wait for it to come back",
            extra={"error": str(exc)},
        )


def _verify_storage_and_close_clients(
    app: FastAPI, provisioner: Provisioner, storage: LocalQrStorage | SupabaseQrStorage
) -> None:
    """Verify the storage, run the shell's lifespan (broker, pool), then close the HTTP clients after it
    has stopped (or failed to start)."""
    shell_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as clients:
            # Closed last-pushed first, each one even when an earlier close raises.
            clients.push_async_callback(storage.aclose)
            clients.push_async_callback(provisioner.stripe.aclose)
            clients.push_async_callback(provisioner.zendit.aclose)
            await verify_storage(storage)  # before the broker starts: no message consumed in vain
            async with shell_lifespan(app):
                yield

    app.router.lifespan_context = lifespan
