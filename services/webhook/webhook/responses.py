"""The error answers of the webhook service's routes, as declared in its OpenAPI (docs/api/openapi).

Webhook endpoints answer `{"error": "..."}` (what Stripe's and Zendit's dashboards show); the shop's API
answers FastAPI's `{"detail": "..."}`. A route lists its codes with one of the two helpers.
"""

from __future__ import annotations

from typing import Any

Responses = dict[int | str, dict[str, Any]]

_ERROR_BODY = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
_DETAIL_BODY = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}


def webhook_errors(**descriptions: str) -> Responses:
    """`webhook_errors(e400="...", e413="...")` → responses with an `{"error": ...}` body."""
    return {int(code[1:]): _answer(text, _ERROR_BODY) for code, text in descriptions.items()}


# A 422 is either FastAPI's validation error (a list) or one of our refusals (a sentence).
_VALIDATION_BODY = {
    "type": "object",
    "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}},
    "required": ["detail"],
}


def api_errors(**descriptions: str) -> Responses:
    """`api_errors(e404="...")` → responses with a `{"detail": ...}` body."""
    return {
        int(code[1:]): _answer(text, _VALIDATION_BODY if code == "e422" else _DETAIL_BODY)
        for code, text in descriptions.items()
    }


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def signed_body(header: str, description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its raw body itself (to verify it) and one header."""
    return {
        "parameters": [
            {"name": header, "in": "header", "required": True, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    }
