"""The one wrapper every `/v1` route goes through: auth, decoding, parameter checks, idempotency, headers.

Handlers receive a `Call` and return the response object (a dict) or raise `StripeApiError`; everything
Stripe does around that (Request-Id, Stripe-Version, replaying the first result of an Idempotency-Key)
happens here once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import StripeApiError
from .forms import FormError, decode_pairs, parse_body
from .ids import new_id
from .params import check_params
from .render import render
from .state import IdempotentResult, StripeState
from .webhooks import Webhooks

logger = logging.getLogger("esim_sandbox.stripe_emulator")

REQUEST_ID_LENGTH = 14
_TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")


@dataclass
class Call:
    """One API request, decoded and authenticated."""

    request: Request
    state: StripeState
    webhooks: Webhooks
    params: dict[str, Any]
    request_id: str
    idempotency_key: str | None

    @property
    def path(self) -> dict[str, str]:
        return dict(self.request.path_params)

    @property
    def base_url(self) -> str:
        return str(self.request.base_url).rstrip("/")

    @property
    def expand(self) -> list[str]:
        value = self.params.get("expand") or []
        return [value] if isinstance(value, str) else [item for item in value if isinstance(item, str)]

    def render(self, obj: dict[str, Any]) -> dict[str, Any]:
        return render(self.state, obj, self.expand)

    def emit(self, event_type: str, obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """An event caused by this request (so `event.request` names it), with a snapshot of `obj`."""
        return self.webhooks.emit(
            event_type,
            obj,
            request_id=self.request_id,
            idempotency_key=self.idempotency_key,
            **kwargs,
        )


Handler = Callable[[Call], Awaitable[dict[str, Any]]]


def api_route(path: str, handler: Handler, *, method: str, spec: type | None) -> Route:
    """A Starlette route for a Stripe endpoint whose parameters `spec` (an SDK TypedDict) describes."""

    async def endpoint(request: Request) -> Response:
        state: StripeState = request.app.state.stripe
        request_id = new_id("req_", REQUEST_ID_LENGTH)
        headers = {
            "Request-Id": request_id,
            "Stripe-Version": request.headers.get("Stripe-Version") or state.api_version,
        }
        try:
            api_key = _authenticate(request, state)
            params = await _read_params(request)
        except StripeApiError as exc:
            return _json(exc.body(request_id), exc.status, headers)
        key = request.headers.get("Idempotency-Key") if method == "POST" else None
        if key is None:
            status, body, _ = await _run(handler, spec, request, state, params, request_id, None)
            return _json(body, status, headers)
        headers["Idempotency-Key"] = key
        return await _idempotent(handler, spec, request, state, params, request_id, (api_key, key), headers)

    return Route(path, endpoint, methods=[method])


async def _idempotent(
    handler: Handler,
    spec: type | None,
    request: Request,
    state: StripeState,
    params: dict[str, Any],
    request_id: str,
    scope: tuple[str, str],
    headers: dict[str, str],
) -> Response:
    fingerprint = _fingerprint(request, params)
    previous = state.idempotency.get(scope)
    if previous is not None:
        if previous.fingerprint != fingerprint:
            error = StripeApiError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were first used "
                f"with. Try using a key other than '{scope[1]}' if you meant to execute a different request.",
                type="idempotency_error",
            )
            return _json(error.body(request_id), 400, headers)
        if previous.status is None:
            error = StripeApiError(
                409,
                "There is currently another in-progress request using this Idempotent Key (that probably "
                "means you submitted twice, and the other request is still going through): "
                f"{scope[1]}. Please try again later.",
                type="idempotency_error",
                code="idempotency_key_in_use",
            )
            return _json(error.body(request_id), 409, {**headers, "Stripe-Should-Retry": "true"})
        replay_headers = {**headers, "Idempotent-Replayed": "true", "Original-Request": previous.request_id}
        return Response(previous.body, previous.status, media_type="application/json", headers=replay_headers)
    record = state.idempotency[scope] = IdempotentResult(fingerprint=fingerprint, request_id=request_id)
    status, body, saves = await _run(handler, spec, request, state, params, request_id, scope[1])
    response = _json(body, status, {**headers, "Original-Request": request_id})
    if saves:
        record.status, record.body = status, bytes(response.body)
    else:
        del state.idempotency[scope]
    return response


async def _run(
    handler: Handler,
    spec: type | None,
    request: Request,
    state: StripeState,
    params: dict[str, Any],
    request_id: str,
    idempotency_key: str | None,
) -> tuple[int, dict[str, Any], bool]:
    """(status, body, whether an idempotent replay should return this result)."""
    try:
        check_params(params, spec)
        call = Call(request, state, request.app.state.webhooks, params, request_id, idempotency_key)
        return 200, await handler(call), True
    except StripeApiError as exc:
        return exc.status, exc.body(request_id), exc.saves_idempotent_result
    except Exception:
        logger.exception("unexpected_error path=%s request_id=%s", request.url.path, request_id)
        error = StripeApiError(500, "An unknown error occurred in the Stripe emulator.", type="api_error")
        return 500, error.body(request_id), True


def _authenticate(request: Request, state: StripeState) -> str:
    key = _presented_key(request.headers.get("Authorization", ""))
    if not key:
        raise StripeApiError(
            401,
            "You did not provide an API key. You need to provide your API key in the Authorization header, "
            "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        )
    valid = key == state.api_key if state.api_key else key.startswith(_TEST_KEY_PREFIXES)
    if not valid:
        redacted = key[:8] + "*" * max(len(key) - 12, 0) + key[-4:] if len(key) > 12 else "****"
        raise StripeApiError(401, f"Invalid API Key provided: {redacted}")
    return key


def _presented_key(authorization: str) -> str:
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":  # curl -u sk_test_...:
        try:
            return base64.b64decode(credentials).decode().partition(":")[0]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


async def _read_params(request: Request) -> dict[str, Any]:
    try:
        if request.method == "POST":
            return parse_body(await request.body())
        return decode_pairs(request.query_params.multi_items())
    except FormError as exc:
        raise StripeApiError(400, str(exc), param=exc.param) from None


def _fingerprint(request: Request, params: dict[str, Any]) -> str:
    canonical = json.dumps([request.method, request.url.path, params], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _json(body: dict[str, Any], status: int, headers: dict[str, str]) -> Response:
    return Response(json.dumps(body, indent=2), status, media_type="application/json", headers=headers)
