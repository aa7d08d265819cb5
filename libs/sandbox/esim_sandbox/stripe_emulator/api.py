"""The one wrapper every `/v1` route goes through: auth, decoding, parameter checks, idempotency, headers.

Handlers receive a `Call` and return the response object (a dict) or raise `StripeApiError`; everything
Stripe does around that (Request-Id, Stripe-Version, idempotency, injected faults) happens here once.

Idempotency, as Stripe documents it for API v1 (POST only; keys scoped to the API key, ≤ 255 chars):
- the first result of a key (status and body, errors and 500s included) is saved once the endpoint starts
  executing and replayed for 24 h (`idempotency_ttl_seconds`), with `Idempotent-Replayed: true`;
- the same key on another endpoint or with other parameters is a 400 `idempotency_error`;
- the same key while its first request still runs is a 409 `idempotency_key_in_use`
  (`Stripe-Should-Retry: true`);
- a request refused while validating parameters (`ParamError`), or by a gate in front of the endpoint
  (rate limit, permissions: see `faults`), saves nothing: the key can be retried after fixing it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import faults
from .errors import StripeApiError
from .forms import FormError, decode_pairs, parse_body
from .ids import new_id
from .params import check_params
from .render import render
from .state import IdempotentResult, StripeState
from .webhooks import Webhooks

logger = logging.getLogger("esim_sandbox.stripe_emulator")

REQUEST_ID_LENGTH = 14
# Stripe documents idempotency keys as "up to 255 characters long".
MAX_IDEMPOTENCY_KEY_LENGTH = 255
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
            # Stripe ignores the header on GET (and DELETE): reading twice has no effect to protect.
            key = _idempotency_key(request) if method == "POST" else None
        except StripeApiError as exc:
            return _json(exc.body(request_id), exc.status, headers)
        gate = faults.take(state.faults, method, request.url.path, at_gate=True)
        if gate is not None:
            return await _gate_fault(gate, request_id, headers)
        run = _Run(handler, spec, request, state, params, request_id)
        if key is None:
            status, body, _ = await run(None)
            return _json(body, status, headers)
        headers["Idempotency-Key"] = key
        return await _idempotent(run, (api_key, key), headers)

    return Route(path, endpoint, methods=[method])


@dataclass
class _Run:
    """Executes the endpoint once: parameter check, handler (or an injected fault), error rendering."""

    handler: Handler
    spec: type | None
    request: Request
    state: StripeState
    params: dict[str, Any]
    request_id: str

    async def __call__(self, idempotency_key: str | None) -> tuple[int, dict[str, Any], bool]:
        """(status, body, whether an idempotent replay should return this result)."""
        request = self.request
        fault = faults.take(self.state.faults, request.method, request.url.path, at_gate=False)
        status, body, saves = await self._execute(fault, idempotency_key)
        if fault is not None and fault.delay_seconds:
            # The effect has happened; the answer is late (the Idempotency-Key stays "in use" meanwhile).
            await asyncio.sleep(fault.delay_seconds)
        return status, body, saves

    async def _execute(
        self, fault: faults.Fault | None, idempotency_key: str | None
    ) -> tuple[int, dict[str, Any], bool]:
        error = fault.error() if fault is not None else None
        if error is not None:
            return error.status, error.body(self.request_id), True
        try:
            check_params(self.params, self.spec)
            call = Call(
                self.request,
                self.state,
                self.request.app.state.webhooks,
                self.params,
                self.request_id,
                idempotency_key,
            )
            return 200, await self.handler(call), True
        except StripeApiError as exc:
            return exc.status, exc.body(self.request_id), exc.saves_idempotent_result
        except Exception:
            logger.exception("unexpected_error path=%s request_id=%s", self.request.url.path, self.request_id)
            error = StripeApiError(500, "An unknown error occurred in the Stripe emulator.", type="api_error")
            return 500, error.body(self.request_id), True


async def _gate_fault(fault: faults.Fault, request_id: str, headers: dict[str, str]) -> Response:
    await asyncio.sleep(fault.delay_seconds)
    error = fault.error()
    assert error is not None  # gate faults always carry a status
    return _json(error.body(request_id), error.status, headers)


async def _idempotent(run: _Run, scope: tuple[str, str], headers: dict[str, str]) -> Response:
    """Stripe's rules: replay the first saved result, refuse a different request or a concurrent one."""
    state, request, request_id = run.state, run.request, run.request_id
    started = time.monotonic()
    _forget_expired(state, started)
    previous = state.idempotency.get(scope)
    if previous is not None:
        refusal = _refusal(previous, request, _fingerprint(request, run.params), scope[1])
        if refusal is not None:
            extra = {"Stripe-Should-Retry": "true"} if refusal.status == 409 else {}
            return _json(refusal.body(request_id), refusal.status, {**headers, **extra})
        assert previous.status is not None  # _refusal answered 409 for a request still running
        replay_headers = {**headers, "Idempotent-Replayed": "true", "Original-Request": previous.request_id}
        return Response(previous.body, previous.status, media_type="application/json", headers=replay_headers)
    record = state.idempotency[scope] = IdempotentResult(
        fingerprint=_fingerprint(request, run.params),
        method=request.method,
        path=request.url.path,
        request_id=request_id,
        created_at=started,
    )
    try:
        status, body, saves = await run(scope[1])
    except BaseException:
        # Cancelled mid-request (server shutting down): no result, so the key must not stay "in use".
        if state.idempotency.get(scope) is record:
            del state.idempotency[scope]
        raise
    response = _json(body, status, {**headers, "Original-Request": request_id})
    if saves:
        record.status, record.body = status, bytes(response.body)
    elif state.idempotency.get(scope) is record:
        del state.idempotency[scope]
    return response


def _refusal(
    previous: IdempotentResult, request: Request, fingerprint: str, key: str
) -> StripeApiError | None:
    if (previous.method, previous.path) != (request.method, request.url.path):
        return StripeApiError(
            400,
            "Keys for idempotent requests can only be used for the same endpoint they were first used for "
            f"('{request.url.path}' vs '{previous.path}'). Try using a key other than '{key}' if you meant "
            "to execute a different request.",
            type="idempotency_error",
        )
    if previous.fingerprint != fingerprint:
        return StripeApiError(
            400,
            "Keys for idempotent requests can only be used with the same parameters they were first used "
            f"with. Try using a key other than '{key}' if you meant to execute a different request.",
            type="idempotency_error",
        )
    if previous.status is None:
        return StripeApiError(
            409,
            "There is currently another in-progress request using this Idempotent Key (that probably "
            f"means you submitted twice, and the other request is still going through): {key}. "
            "Please try again later.",
            type="idempotency_error",
            code="idempotency_key_in_use",
        )
    return None


def _forget_expired(state: StripeState, now: float) -> None:
    """Drop saved results older than the TTL. Records are kept in creation order, so the scan stops at
    the first young one; a request still running (no result yet) keeps its key but is stepped over, or
    one hung request would keep every later key from ever being forgotten."""
    expired = []
    for scope, record in state.idempotency.items():
        if now - record.created_at < state.idempotency_ttl_seconds:
            break
        if record.status is not None:
            expired.append(scope)
    for scope in expired:
        del state.idempotency[scope]


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise StripeApiError(
            400,
            f"Invalid Idempotency-Key: keys can be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
        )
    return key


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
