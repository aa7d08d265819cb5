"""QR PNGs in Supabase Storage, through the official `supabase` client (storage3 underneath).

    save(name, png)   upload `<name>.png` to SUPABASE_BUCKET (image/png, upsert: a redelivery stores the
                      same image again), then return
                        SUPABASE_SIGNED_URL_SECONDS > 0   a signed URL valid that long (private bucket)
                        SUPABASE_SIGNED_URL_SECONDS = 0   the public URL; the bucket must be public,
                                                          checked once before the first upload

Errors are mapped here, at the one boundary with the client:

    QrStorageError     (transient → retry tiers)   timeouts, connection errors, 5xx and 429 from Storage
                                                    or its gateway, answers that cannot be read
    QrStorageRefused   (permanent → failure path)   the key is refused, the bucket is missing (or private
                                                    while public URLs are configured), the bucket refuses
                                                    PNGs; the message says which setting to fix

A refusal after Zendit delivered must never refund the customer: its reasons do not start with
`zendit_`, so `domain.refund_is_safe` holds the order for an operator instead (tested).

The service-role key travels in request headers only. No message built here contains it, and what the
server says back is scrubbed of it before it reaches an exception (and so a log line or a header).

Why `supabase.AsyncClient` rather than `acreate_client`: the latter only adds an awaited look-up of a
signed-in user's session, which a service-role client never has; the constructor is synchronous, so
`create_app` can build it without connecting. Its auth/realtime parts stay idle (no connection is made
until used); all HTTP goes through our own httpx client with finite timeouts, closed on shutdown.
"""

from __future__ import annotations

import httpx
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException
from supabase import AsyncClient, AsyncClientOptions

from esim_common.errors import PermanentError
from esim_common.logging import redact
from provisioning.storage import PNG_SUFFIX, QrStorageError, valid_name

# A QR PNG is ~1 kB: ten seconds is an outage, not a slow upload. The upload runs while the order's
# row lock is held, so it must not wait long before the retry tiers take over.
STORAGE_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Stored as `Cache-Control: max-age=0`: the image is an activation secret, so neither the Supabase CDN
# nor a browser should keep a copy (Storage only takes a number of seconds here).
CACHE_SECONDS = "0"
PNG_CONTENT_TYPE = "image/png"
# Statuses that say "try again later": throttled, locked, or the service (or its database) struggling.
RETRYABLE_STATUSES = frozenset({408, 423, 429})
MAX_SERVER_MESSAGE = 200

UNAUTHORIZED = "qr_storage_unauthorized"
BUCKET_MISSING = "qr_storage_bucket_missing"
BUCKET_PRIVATE = "qr_storage_bucket_private"
REFUSED = "qr_storage_refused"
REFUSAL_REASONS = frozenset({UNAUTHORIZED, BUCKET_MISSING, BUCKET_PRIVATE, REFUSED})


class QrStorageRefused(PermanentError):
    """Supabase Storage will not take the QR code until an operator fixes the configuration."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _status(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def is_retryable(*statuses: int | None) -> bool:
    """Whether any of the statuses (the error body's, the HTTP one) means the service may recover."""
    return any(s is not None and (s >= 500 or s in RETRYABLE_STATUSES) for s in statuses)


def refusal_reason(status: int | None, error: str) -> str:
    """The failure reason of a permanent Storage error (`status` as the error body gives it)."""
    if status in (401, 403):
        return UNAUTHORIZED
    if status == 404 and error == "Bucket not found":
        return BUCKET_MISSING
    return REFUSED


class SupabaseQrStorage:
    def __init__(
        self,
        *,
        url: str,
        service_role_key: str,
        bucket: str,
        signed_url_seconds: int,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if signed_url_seconds < 0:
            raise ValueError("signed_url_seconds must be >= 0 (0: public URLs)")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.signed_url_seconds = signed_url_seconds
        self._key = service_role_key
        self._http = http_client or httpx.AsyncClient(timeout=STORAGE_TIMEOUT)
        options = AsyncClientOptions(httpx_client=self._http, auto_refresh_token=False, persist_session=False)
        self._client = AsyncClient(self.url, service_role_key, options)
        # Only public URLs depend on the bucket's visibility; a signed URL works either way.
        self._bucket_checked = signed_url_seconds > 0

    async def save(self, name: str, png: bytes) -> str:
        if not valid_name(name):
            raise ValueError(f"not a valid QR code name: {name!r}")
        path = f"{name}{PNG_SUFFIX}"
        files = self._client.storage.from_(self.bucket)
        try:
            if not self._bucket_checked:
                await self._check_public_bucket()
            await files.upload(
                path,
                png,
                {"content-type": PNG_CONTENT_TYPE, "cache-control": CACHE_SECONDS, "upsert": "true"},
            )
            if self.signed_url_seconds == 0:
                return await files.get_public_url(path)
            signed = await files.create_signed_url(path, self.signed_url_seconds)
            return str(signed["signedURL"])
        except (StorageException, httpx.HTTPError, KeyError, ValueError) as exc:
            raise self._mapped(exc, path) from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _check_public_bucket(self) -> None:
        bucket = await self._client.storage.get_bucket(self.bucket)
        if not bucket.public:
            raise QrStorageRefused(
                BUCKET_PRIVATE,
                f"Supabase Storage bucket {self.bucket!r} is private, but SUPABASE_SIGNED_URL_SECONDS=0 "
                "stores public URLs, which a private bucket does not serve: make the bucket public, or set "
                "SUPABASE_SIGNED_URL_SECONDS > 0 to store signed URLs",
            )
        self._bucket_checked = True

    def _said(self, text: str) -> str:
        """What the server said, safe to keep: never the key, never long."""
        return redact(text, [self._key])[:MAX_SERVER_MESSAGE]

    def _mapped(self, exc: Exception, path: str) -> Exception:
        where = f"Supabase Storage at {self.url}"
        if isinstance(exc, httpx.TimeoutException):
            return QrStorageError(f"{where} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.HTTPError):
            return QrStorageError(f"{where} could not be reached: {type(exc).__name__}")
        if not isinstance(exc, StorageApiError):
            return QrStorageError(f"{where} gave an answer that could not be read: {type(exc).__name__}")
        status = _status(exc.status)
        cause = exc.__cause__
        http_status = cause.response.status_code if isinstance(cause, httpx.HTTPStatusError) else None
        said = f"{exc.status} {self._said(str(exc.code))}: {self._said(str(exc.message))}"
        if is_retryable(status, http_status):
            return QrStorageError(f"{where} failed ({said}); trying again later")
        reason = refusal_reason(status, str(exc.code))
        if reason == UNAUTHORIZED:
            message = (
                f"{where} refused the service-role key ({said}): set SUPABASE_SERVICE_ROLE_KEY to the "
                "project's service_role (secret) key, not the anon key"
            )
        elif reason == BUCKET_MISSING:
            message = (
                f"{where} has no bucket {self.bucket!r} ({said}): create it (private) in the project, "
                "or set SUPABASE_BUCKET to an existing one"
            )
        else:
            message = (
                f"{where} refused to store {path} in bucket {self.bucket!r} ({said}): check the bucket's "
                "allowed MIME types (image/png) and file size limit"
            )
        return QrStorageRefused(reason, message)
