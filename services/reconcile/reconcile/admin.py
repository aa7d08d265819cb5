"""The admin API: `POST /api/admin/reconcile-zendit`, behind `Authorization: Bearer <ADMIN_API_TOKEN>`.

No token, a wrong one or another scheme → 401 with `WWW-Authenticate: Bearer`; the token is compared
in constant time and never echoed or logged. The check runs before the body is read, so an
unauthenticated caller learns nothing from the answer, not even whether their JSON was valid.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from esim_common.providers.zendit import ZenditError, ZenditTransientError
from esim_common.service import ServiceContext
from reconcile import actions
from reconcile.schemas import AdminRequest, AdminResponse, ErrorResponse

log = logging.getLogger("esim.reconcile.admin")

# auto_error=False: FastAPI would answer a missing header with its own status; ours is always 401.
_bearer = HTTPBearer(auto_error=False, description="The ADMIN_API_TOKEN setting.")

UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    detail="a valid admin bearer token is required",
    headers={"WWW-Authenticate": "Bearer"},
)
# An admin request body is a few fields; anything larger is not one.
MAX_BODY_BYTES = 4096

# What the admin routes take for "the database is away" (down, restarting, refusing the query): a 503
# or a degraded answer, never a 500.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def admin_guard(ctx: ServiceContext) -> Callable[..., Awaitable[None]]:
    """The dependency every admin route declares (before its body or query is read): 401 unless the
    request carries the configured bearer token."""
    expected = ctx.settings.admin_api_token.get_secret_value().encode()

    async def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        supplied = credentials.credentials.encode() if credentials else b""
        # An empty configured token would let an empty bearer in: refuse everyone instead.
        if not expected or not hmac.compare_digest(supplied, expected):
            log.warning("admin request refused: missing or wrong bearer token")
            raise UNAUTHORIZED

    return require_admin


M = TypeVar("M", bound=BaseModel)


def json_body(model: type[M], *, max_bytes: int = MAX_BODY_BYTES) -> Callable[[Request], Awaitable[M]]:
    """A dependency reading the JSON body as `model` (an empty body is `{}`). Declared after the guard, so
    no body is read before the token was accepted; errors are 413 or 422 without echoing the input."""

    async def read(request: Request) -> M:
        body = await request.body()
        if len(body) > max_bytes:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail="request body too large")
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None

    return read


_admin_request = json_body(AdminRequest)


_ZENDIT_ERRORS: dict[int | str, dict[str, Any]] = {
    status.HTTP_502_BAD_GATEWAY: {"model": ErrorResponse, "description": "Zendit refused the request."},
    status.HTTP_503_SERVICE_UNAVAILABLE: {"model": ErrorResponse, "description": "Zendit is unavailable."},
}


def admin_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(prefix="/api/admin", tags=["admin"])
    require_admin = admin_guard(ctx)

    @router.post(
        "/reconcile-zendit",
        dependencies=[Depends(require_admin)],
        responses={
            status.HTTP_401_UNAUTHORIZED: {"model": ErrorResponse, "description": "No valid bearer token."},
            status.HTTP_413_CONTENT_TOO_LARGE: {"model": ErrorResponse, "description": "Body too large."},
            status.HTTP_422_UNPROCESSABLE_CONTENT: {
                "description": "Not a valid request; an unknown action's error lists the valid ones."
            },
            **_ZENDIT_ERRORS,
        },
        # The body is read by a dependency (after the token check), so it is documented here.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": AdminRequest.model_json_schema()}},
            }
        },
    )
    async def reconcile_zendit(body: Annotated[AdminRequest, Depends(_admin_request)]) -> AdminResponse:
        """The seed's reconciliation actions: `check_balance` (Zendit wallet), `list_failed_topups`,
        `list_failed_purchases`, `reconcile` (statistics). Read-only."""
        try:
            match body.action:
                case "check_balance":
                    return await actions.check_balance(ctx.settings)
                case "list_failed_topups":
                    return await actions.list_failed_topups(ctx.pool, body)
                case "list_failed_purchases":
                    return await actions.list_failed_purchases(ctx.pool, body)
                case "reconcile":
                    return await actions.reconcile(ctx.pool, ctx.settings, body)
        except ZenditTransientError as exc:
            log.warning("Zendit unavailable for an admin request", extra={"error": str(exc)})
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="Zendit is unavailable") from exc
        except ZenditError as exc:
            log.error("Zendit refused an admin request", extra={"error": str(exc)})
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail="Zendit refused the request") from exc

    return router
