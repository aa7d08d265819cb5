"""QR PNGs in Supabase Storage, through the official `supabase` client (storage3 underneath).

    verify()          at start-up, GET the bucket: a refusal (the key, a missing bucket, a private bucket
                      while SUPABASE_SIGNED_URL_SECONDS=0) → QrStorageRefused, and the service does not
                      start; an outage → QrStorageError, and it starts anyway (saves wait for it)
    save(name, png)   upload `<name>.png` to SUPABASE_BUCKET (image/png, upsert: a redelivery stores the
                      same image again), then return
                        SUPABASE_SIGNED_URL_SECONDS > 0   a signed URL valid that long (private bucket)
                        SUPABASE_SIGNED_URL_SECONDS = 0   the public URL; the bucket must be public,
                                                          checked before the first upload unless
                                                          `verify` already did
                      All of it within SAVE_TIMEOUT_SECONDS, however many requests it takes.

Errors are mapped here, at the one boundary with the client, and judged by `judge` (a plain function):

    QrStorageError     (transient → waited out)    timeouts, connection errors, 5xx and 429 from Storage
                                                    or its gateway, answers that cannot be read, an object
                                                    not found when signing it right after our upload
    QrStorageRefused   (permanent → failure path)   the key is refused, the bucket is missing (or private
                                                    while public URLs are configured), the bucket's limits
                                                    refuse PNGs, SUPABASE_URL is not Storage, any other
                                                    4xx; the message says which setting to fix

A refusal after Zendit delivered must never refund the customer: the order is still `purchasing`
then, so `domain.refund_is_safe` holds it for an operator instead (tested).

The service-role key travels in request headers only. No message built here contains it, and what the
server says back is scrubbed of it before it reaches an exception (and so a log line or a header).

Why `supabase.AsyncClient` rather than `acreate_client`: the latter only adds an awaited look-up of a
signed-in user's session, which a service-role client never has; the constructor is synchronous, so
`create_app` can build it without connecting. Its auth/realtime parts stay idle (no connection is made
until used); all HTTP goes through an httpx client with finite timeouts (ours unless one is given).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum

import httpx
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException
from supabase import AsyncClient, AsyncClientOptions

from esim_common.logging import redact
from provisioning.storage import PNG_SUFFIX, QrStorageError, QrStorageRefused, valid_name

__all__ = ["QrStorageRefused", "SupabaseQrStorage", "Verdict", "is_retryable", "judge"]

log = logging.getLogger("esim.provisioning")

# A QR PNG is ~1 kB: ten seconds is an outage, not a slow upload. The upload runs while the order's
# consumer waits for it, so it must not hang long before the poll's backoff takes over.
STORAGE_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# The whole save (a bucket check, the upload, the signing: up to three requests, each allowed the
# timeout above) or the whole start-up check: the row lock is not held for longer than this.
SAVE_TIMEOUT_SECONDS = 15.0
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

# The steps of a save, as messages name them; a missing object means something else when signing.
CHECK, UPLOAD, SIGN = "read", "upload", "sign"

# How Storage says a bucket or an object is missing (`error` as storage3 passes it on, or the code).
MISSING_BUCKET_ERRORS = frozenset({"Bucket not found", "NoSuchBucket"})
MISSING_OBJECT_ERRORS = frozenset({"not_found", "NoSuchKey", "Object not found"})
LIMIT_ERRORS = frozenset({"invalid_mime_type", "InvalidMimeType", "EntityTooLarge", "Payload too large"})
# Fastify's answer to a path Storage does not serve, e.g. SUPABASE_URL ending in /storage/v1.
ROUTE_NOT_FOUND = re.compile(r"^Route \S+ not found$")
# storage3's message when an error body is not Storage's JSON (an HTML page, a proxy's text).
UNPARSED = ("Unable to parse error message", "The request failed, but could not parse")


class Verdict(StrEnum):
    """What a Storage error means for us; each refusal has its own advice (`_advice`)."""

    TRANSIENT = "transient"  # try again later
    UNAUTHORIZED = "unauthorized"  # SUPABASE_SERVICE_ROLE_KEY
    BUCKET_MISSING = "bucket_missing"  # SUPABASE_BUCKET
    BUCKET_LIMITS = "bucket_limits"  # the bucket's allowed MIME types or file size limit
    WRONG_URL = "wrong_url"  # SUPABASE_URL answers, but not as Storage
    REFUSED = "refused"  # anything else: what the server said


# The order's failure reason for each refusal; the finer verdicts only change the advice.
REASON_OF = {Verdict.UNAUTHORIZED: UNAUTHORIZED, Verdict.BUCKET_MISSING: BUCKET_MISSING}


def _status(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def is_retryable(*statuses: int | None) -> bool:
    """Whether any of the statuses (the error body's, the HTTP one) means the service may recover."""
    return any(s is not None and (s >= 500 or s in RETRYABLE_STATUSES) for s in statuses)


def judge(*, step: str, status: int | None, http_status: int | None, error: str, message: str) -> Verdict:
    """The verdict on a Storage error: `status` as the error body gives it, `http_status` the answer's,
    `error` and `message` as storage3 passes them on."""
    statuses = {s for s in (status, http_status) if s is not None}
    lowered = message.lower()
    if is_retryable(status, http_status):
        return Verdict.TRANSIENT
    if any(300 <= s < 400 for s in statuses):  # Storage never redirects: something else answered
        return Verdict.WRONG_URL
    if statuses & {401, 403} or "row-level security" in lowered:
        return Verdict.UNAUTHORIZED
    if error in MISSING_BUCKET_ERRORS or "bucket not found" in lowered:
        return Verdict.BUCKET_MISSING
    # Signing what we uploaded a moment ago: a replica that has not seen it yet, not a refusal.
    if step == SIGN and 404 in statuses and (error in MISSING_OBJECT_ERRORS or "object not found" in lowered):
        return Verdict.TRANSIENT
    if statuses & {413, 415} or error in LIMIT_ERRORS:
        return Verdict.BUCKET_LIMITS
    if 404 in statuses and (ROUTE_NOT_FOUND.match(message) or message.startswith(UNPARSED)):
        return Verdict.WRONG_URL
    return Verdict.REFUSED


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a StorageApiError: storage3 chains the httpx error, directly or not."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, httpx.HTTPStatusError):
            return seen.response.status_code
        seen = seen.__cause__ or seen.__context__
    return None


# What the client may raise: its own errors, httpx's, and what reading an unexpected answer raises.
CLIENT_ERRORS = (StorageException, httpx.HTTPError, KeyError, ValueError)


class SupabaseQrStorage:
    def __init__(
        self,
        *,
        url: str,
        service_role_key: str,
        bucket: str,
        signed_url_seconds: int,
        http_client: httpx.AsyncClient | None = None,
        timeout_seconds: float = SAVE_TIMEOUT_SECONDS,
    ) -> None:
        if signed_url_seconds < 0:
            raise ValueError("signed_url_seconds must be >= 0 (0: public URLs)")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.signed_url_seconds = signed_url_seconds
        self.timeout_seconds = timeout_seconds
        self._key = service_role_key
        # A client given to us belongs to the caller, who closes it; ours we close in `aclose`.
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=STORAGE_TIMEOUT)
        options = AsyncClientOptions(httpx_client=self._http, auto_refresh_token=False, persist_session=False)
        self._client = AsyncClient(self.url, service_role_key, options)
        # Only public URLs depend on the bucket's visibility; a signed URL works either way.
        self._bucket_checked = signed_url_seconds > 0

    async def verify(self) -> None:
        """Read the bucket once, at start-up: QrStorageRefused when no save can succeed, QrStorageError
        when Storage is only unavailable. A public bucket with signed URLs is allowed, with a warning."""
        async with self._deadline(f"answer for bucket {self.bucket!r}"):
            await self._check_bucket()

    async def save(self, name: str, png: bytes) -> str:
        if not valid_name(name):
            raise ValueError(f"not a valid QR code name: {name!r}")
        path = f"{name}{PNG_SUFFIX}"
        async with self._deadline(f"store {path}"):
            return await self._save(path, png)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _save(self, path: str, png: bytes) -> str:
        if not self._bucket_checked:
            await self._check_bucket()
        files = self._client.storage.from_(self.bucket)
        step = UPLOAD
        try:
            await files.upload(
                path,
                png,
                {"content-type": PNG_CONTENT_TYPE, "cache-control": CACHE_SECONDS, "upsert": "true"},
            )
            step = SIGN
            if self.signed_url_seconds == 0:
                return await files.get_public_url(path)
            signed = await files.create_signed_url(path, self.signed_url_seconds)
            return str(signed["signedURL"])
        except CLIENT_ERRORS as exc:
            raise self._mapped(exc, step, path) from exc

    @asynccontextmanager
    async def _deadline(self, what: str) -> AsyncIterator[None]:
        """One bound on all the requests inside, each of which has its own timeout as well."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                yield
        except TimeoutError:
            raise QrStorageError(
                f"Supabase Storage at {self.url} did not {what} within {self.timeout_seconds:g} s; "
                "trying again later"
            ) from None

    async def _check_bucket(self) -> None:
        try:
            bucket = await self._client.storage.get_bucket(self.bucket)
        except (*CLIENT_ERRORS, TypeError) as exc:  # TypeError: JSON that is not a bucket's
            raise self._mapped(exc, CHECK, f"bucket {self.bucket!r}") from exc
        if self.signed_url_seconds == 0 and not bucket.public:
            raise QrStorageRefused(
                BUCKET_PRIVATE,
                f"Supabase Storage bucket {self.bucket!r} is private, but SUPABASE_SIGNED_URL_SECONDS=0 "
                "stores public URLs, which a private bucket does not serve: make the bucket public, or set "
                "SUPABASE_SIGNED_URL_SECONDS > 0 to store signed URLs",
            )
        if self.signed_url_seconds > 0 and bucket.public:
            log.warning(
                "Supabase Storage bucket is public: anyone who learns an object's name can fetch that QR "
                "code without the signed URL; make the bucket private",
                extra={"bucket": self.bucket, "supabase_url": self.url},
            )
        self._bucket_checked = True

    def _said(self, text: str) -> str:
        """What the server said, safe to keep: never the key, never long."""
        return redact(text, [self._key])[:MAX_SERVER_MESSAGE]

    def _mapped(self, exc: Exception, step: str, target: str) -> Exception:
        where = f"Supabase Storage at {self.url}"
        if isinstance(exc, httpx.TimeoutException):
            return QrStorageError(f"{where} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.HTTPError):
            return QrStorageError(f"{where} could not be reached: {type(exc).__name__}")
        if not isinstance(exc, StorageApiError):
            return QrStorageError(
                f"{where} gave an answer that could not be read ({type(exc).__name__}); if this lasts, "
                "check SUPABASE_URL"
            )
        said = f"{exc.status} {self._said(str(exc.code))}: {self._said(str(exc.message))}"
        verdict = judge(
            step=step,
            status=_status(exc.status),
            http_status=_http_status(exc),
            error=str(exc.code),
            message=str(exc.message),
        )
        if verdict == Verdict.TRANSIENT:
            return QrStorageError(f"{where} could not {step} {target} ({said}); trying again later")
        advice = self._advice(verdict)
        return QrStorageRefused(
            REASON_OF.get(verdict, REFUSED), f"{where} refused to {step} {target} ({said}): {advice}"
        )

    def _advice(self, verdict: Verdict) -> str:
        if verdict == Verdict.UNAUTHORIZED:
            return (
                "set SUPABASE_SERVICE_ROLE_KEY to the project's service_role (secret) key, not the anon key"
            )
        if verdict == Verdict.BUCKET_MISSING:
            return (
                f"there is no bucket {self.bucket!r}: create it (private) in the project, or set "
                "SUPABASE_BUCKET to an existing one (a key without the service role sees no bucket either: "
                "check SUPABASE_SERVICE_ROLE_KEY)"
            )
        if verdict == Verdict.BUCKET_LIMITS:
            return (
                f"allow image/png in bucket {self.bucket!r}'s allowed MIME types, and a file size limit of "
                "a few kB at least (a QR code is ~1 kB)"
            )
        if verdict == Verdict.WRONG_URL:
            return (
                "this is not Supabase Storage's answer: check SUPABASE_URL, which must be the project URL, "
                "e.g. https://<ref>.supabase.co, without /storage/v1"
            )
        return f"check bucket {self.bucket!r} and the project's Storage settings against what it said"
