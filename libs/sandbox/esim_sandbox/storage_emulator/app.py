"""Assembles the Supabase Storage emulator: the API under /storage/v1 and the sandbox controls.

The URL to give the `supabase` client (SUPABASE_URL) is the emulator's root: the client adds
`/storage/v1/` itself, as it does for a project URL such as https://<ref>.supabase.co.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount

from . import api, control, errors, tokens
from .state import Clock, InitialBucket, StorageState, utc_seconds

# The sandbox project's JWT secret; its keys are derived from it, like a real project's.
DEFAULT_JWT_SECRET = "sandbox-storage-jwt-secret-not-for-production"  # noqa: S105 (sandbox only)
DEFAULT_BUCKET = "esim-qrcodes"
DEFAULT_SERVICE_ROLE_KEY = tokens.api_key("service_role", DEFAULT_JWT_SECRET)
DEFAULT_ANON_KEY = tokens.api_key("anon", DEFAULT_JWT_SECRET)


def service_role_key(jwt_secret: str) -> str:
    """The service-role key of an emulator started with `jwt_secret`."""
    return tokens.api_key("service_role", jwt_secret)


def anon_key(jwt_secret: str) -> str:
    return tokens.api_key("anon", jwt_secret)


async def _not_found(request: Request, exc: Exception) -> Response:
    # Fastify answers unknown routes (and unknown methods) with its own 404, not a Storage error.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status in (404, 405):
        return errors.route_not_found(request.method, request.url.path)
    return errors.internal_error().response()


def create_app(
    *,
    jwt_secret: str = DEFAULT_JWT_SECRET,
    buckets: tuple[InitialBucket, ...] = (InitialBucket(DEFAULT_BUCKET),),
    now: Clock = utc_seconds,
) -> Starlette:
    """A fresh emulator whose state is `app.state.storage` (a StorageState).

    `buckets` exist from the start (and again after a reset); private unless `public=True`.
    """
    app = Starlette(
        routes=[Mount("/storage/v1", routes=api.ROUTES), Mount("/_sandbox", routes=control.ROUTES)],
        exception_handlers={HTTPException: _not_found},
    )
    app.state.storage = StorageState(jwt_secret=jwt_secret, buckets=buckets, now=now)
    return app
