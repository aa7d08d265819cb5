"""Error answers in the shapes the real service gives, because clients parse them.

Storage (supabase/storage, `StorageBackendError.render()` and its Fastify error handler) answers
every error with HTTP 400 — or 500 for internal errors — and puts the real status, as a string,
in the body:

    HTTP 400  {"statusCode": "404", "code": "NoSuchBucket", "error": "Bucket not found",
               "message": "Bucket not found"}

storage3 raises `StorageApiError(message, error, statusCode)` from that body, so a caller sees the
body's status ("404"), not the HTTP one. Request validation errors come from Fastify itself
(`{"statusCode": "400", "error": "Bad Request", ...}`), unknown routes from Fastify's 404 handler.
When the Storage server itself is down, the API gateway in front of it answers instead, with its
own status (502/503/504, 429 when rate limited) and a body storage3 cannot parse as a Storage error.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class StorageError(Exception):
    """One of Storage's own errors: `status` is its `httpStatusCode` (the one rendered in the body)."""

    def __init__(self, status: int, code: str, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.error = error or code

    def response(self) -> JSONResponse:
        body = {
            "statusCode": str(self.status),
            "code": self.code,
            "error": self.error,
            "message": self.message,
        }
        return JSONResponse(body, status_code=500 if self.status == 500 else 400)


class RequestInvalid(Exception):
    """A request that fails Storage's route schema (Fastify validation): HTTP 400."""

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"statusCode": "400", "error": "Bad Request", "message": str(self)}, status_code=400
        )


def no_such_bucket() -> StorageError:
    return StorageError(404, "NoSuchBucket", "Bucket not found", error="Bucket not found")


def no_such_key() -> StorageError:
    return StorageError(404, "NoSuchKey", "Object not found", error="not_found")


def access_denied(message: str) -> StorageError:
    return StorageError(403, "AccessDenied", message, error="Unauthorized")


def row_level_security(table: str = "objects") -> StorageError:
    """What a key without the service role gets from a write: the default policies allow nothing."""
    return access_denied(f'new row violates row-level security policy for table "{table}"')


def invalid_jwt(message: str) -> StorageError:
    return StorageError(400, "InvalidJWT", message)


def invalid_signature() -> StorageError:
    return StorageError(400, "InvalidSignature", "Invalid signature")


def key_already_exists() -> StorageError:
    return StorageError(409, "KeyAlreadyExists", "The resource already exists", error="Duplicate")


def bucket_already_exists() -> StorageError:
    return StorageError(409, "BucketAlreadyExists", "The resource already exists", error="Duplicate")


def invalid_bucket_name() -> StorageError:
    return StorageError(400, "InvalidBucketName", "Bucket name invalid", error="Invalid Input")


def invalid_key(key: str) -> StorageError:
    return StorageError(400, "InvalidKey", f"Invalid key: {key}")


def invalid_mime_type(mime_type: str) -> StorageError:
    return StorageError(
        415, "InvalidMimeType", f"mime type {mime_type} is not supported", error="invalid_mime_type"
    )


def entity_too_large() -> StorageError:
    return StorageError(
        413, "EntityTooLarge", "The object exceeded the maximum allowed size", error="Payload too large"
    )


def no_content() -> StorageError:
    return StorageError(400, "InvalidRequest", "No content provided")


def internal_error() -> StorageError:
    return StorageError(500, "InternalError", "Internal server error")


def route_not_found(method: str, path: str) -> JSONResponse:
    return JSONResponse(
        {"message": f"Route {method}:{path} not found", "error": "Not Found", "statusCode": 404},
        status_code=404,
    )


# What the API gateway says when it cannot get an answer from Storage (Kong's messages).
_GATEWAY_MESSAGES = {
    429: "API rate limit exceeded",
    502: "An invalid response was received from the upstream server",
    503: "failure to get a peer from the ring-balancer",
    504: "The upstream server is timing out",
}


def gateway_error(status: int) -> JSONResponse:
    return JSONResponse({"message": _GATEWAY_MESSAGES.get(status, "Service Unavailable")}, status_code=status)


def injected(status: int) -> JSONResponse:
    """An injected fault: a gateway answer for outages and throttling, else one of Storage's own."""
    if status in _GATEWAY_MESSAGES or status > 500:
        return gateway_error(status)
    if status == 500:
        return internal_error().response()
    return StorageError(status, "InvalidRequest", "Injected by the sandbox").response()
