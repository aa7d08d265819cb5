"""HS256 JSON Web Tokens, as Supabase uses them: the project's API keys and signed-URL tokens.

A Supabase project signs its `anon` and `service_role` keys with the project's JWT secret; Storage
verifies the `Authorization: Bearer` token with that secret and reads the `role` claim, and signs
`{"url": "<bucket>/<path>", "iat", "exp"}` with it for signed URLs. The error messages are those of
`jsonwebtoken` (the library Storage verifies with), because Storage passes them through to callers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

_HEADER = {"alg": "HS256", "typ": "JWT"}
# The issue and expiry dates of a hosted project's keys are fixed when the project is created and
# the keys live for ten years; fixed values keep the sandbox keys the same on every start.
KEY_ISSUED_AT = 1_700_000_000
KEY_EXPIRES_AT = KEY_ISSUED_AT + 10 * 365 * 24 * 3600


class TokenError(Exception):
    """The token is missing, malformed, forged or expired; the message is the verifier's."""


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _signature(signing_input: str, secret: str) -> str:
    return _encode(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())


def sign(claims: dict[str, Any], secret: str) -> str:
    signing_input = f"{_encode(_json(_HEADER))}.{_encode(_json(claims))}"
    return f"{signing_input}.{_signature(signing_input, secret)}"


def verify(token: str, secret: str, *, now: float) -> dict[str, Any]:
    """The token's claims, or TokenError with the message Storage would pass on."""
    if not token:
        raise TokenError("jwt must be provided")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("jwt malformed")
    try:
        header = json.loads(_decode(parts[0]))
        claims = json.loads(_decode(parts[1]))
    except ValueError:
        raise TokenError("invalid token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("invalid token")
    if header.get("alg") != "HS256":
        raise TokenError("invalid algorithm")
    if not hmac.compare_digest(parts[2], _signature(f"{parts[0]}.{parts[1]}", secret)):
        raise TokenError("invalid signature")
    expires = claims.get("exp")
    if isinstance(expires, int | float) and now >= expires:
        raise TokenError("jwt expired")
    return claims


def api_key(role: str, secret: str, *, ref: str = "sandbox") -> str:
    """A project API key as Supabase issues them (`anon` or `service_role`)."""
    claims = {"iss": "supabase", "ref": ref, "role": role, "iat": KEY_ISSUED_AT, "exp": KEY_EXPIRES_AT}
    return sign(claims, secret)
