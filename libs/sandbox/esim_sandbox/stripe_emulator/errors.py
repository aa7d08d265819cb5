"""Stripe-shaped API errors: `{"error": {"type", "code", "message", "param"}}` with Stripe's statuses.

The SDK picks its exception class from the status (400/404 → InvalidRequestError or IdempotencyError by
`type`, 401 → AuthenticationError, 402 → CardError, 409/5xx → APIError), so the status matters as much
as the body.
"""

from __future__ import annotations

from typing import Any


class StripeApiError(Exception):
    """Raised anywhere inside a request; the route wrapper renders it."""

    # Stripe saves an idempotent result only once an endpoint "started executing": requests rejected
    # while validating parameters can be retried with the same key after fixing them.
    saves_idempotent_result = True

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.extra = extra or {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            **self.extra,
        }
        if self.code:
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if request_id:
            error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        return {"error": error}


class ParamError(StripeApiError):
    """A request refused during parameter validation (not saved for idempotent replay)."""

    saves_idempotent_result = False

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(400, message, code=code, param=param)


def unknown_param(param: str) -> ParamError:
    return ParamError(f"Received unknown parameter: {param}", code="parameter_unknown", param=param)


def missing_param(param: str) -> ParamError:
    return ParamError(f"Missing required param: {param}.", code="parameter_missing", param=param)


def invalid_integer(param: str, value: object) -> ParamError:
    return ParamError(f"Invalid integer: {value}", code="parameter_invalid_integer", param=param)


def invalid_value(param: str, message: str) -> ParamError:
    """Stripe sends enum and range violations without a `code`, only a message and the param."""
    return ParamError(message, param=param)


def no_such(kind: str, object_id: str, *, param: str | None = None) -> StripeApiError:
    """`resource_missing`: 404 for an id in the URL, 400 for an id passed as a parameter (as Stripe)."""
    return StripeApiError(
        400 if param else 404,
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param or "id",
    )


def unexpected_state(message: str, *, code: str = "payment_intent_unexpected_state") -> StripeApiError:
    return StripeApiError(400, message, code=code)
