"""The emulator's memory: buckets, objects, injected faults, and a log of what was asked.

Nothing persists: a restart (or `/_sandbox/reset`) brings back the buckets it was started with, empty.
The clock can be moved forward (`advance_clock`) so a test sees a signed URL expire without waiting.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import errors, tokens

# Operations a fault can target: the API calls this emulator serves, by what they do.
OPERATIONS = frozenset({"bucket", "upload", "download", "sign", "signed_download", "public_download", "*"})
Clock = Callable[[], float]


def utc_seconds() -> float:
    return time.time()


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Bucket:
    id: str
    name: str
    public: bool = False
    file_size_limit: int | None = None
    allowed_mime_types: list[str] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "owner": "",
            "public": self.public,
            "type": "STANDARD",
            "file_size_limit": self.file_size_limit,
            "allowed_mime_types": self.allowed_mime_types,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }

    def accepts(self, mime_type: str) -> bool:
        """Storage's `allowed_mime_types` check: exact types or `type/*` wildcards; none = anything."""
        if not self.allowed_mime_types:
            return True
        main = mime_type.split("/")[0]
        return any(allowed in (mime_type, f"{main}/*") for allowed in self.allowed_mime_types)


@dataclass
class StoredObject:
    bucket_id: str
    name: str
    data: bytes
    mime_type: str
    cache_control: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    writes: int = 1  # how many uploads stored this object (an upsert adds one)

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data, usedforsecurity=False).hexdigest()}"'

    def summary(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket_id,
            "name": self.name,
            "size": len(self.data),
            "mimetype": self.mime_type,
            "cacheControl": self.cache_control,
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "writes": self.writes,
        }


@dataclass
class Fault:
    operation: str
    remaining: int
    status: int | None  # None: only the delay (a client timeout), then the real answer
    sleep_seconds: float = 0.0


@dataclass
class InitialBucket:
    id: str
    public: bool = False


class StorageState:
    def __init__(
        self, *, jwt_secret: str, buckets: tuple[InitialBucket, ...] = (), now: Clock = utc_seconds
    ) -> None:
        self.jwt_secret = jwt_secret
        self._initial = buckets
        self._now = now
        self.reset()

    def reset(self) -> None:
        self.clock_offset = 0.0
        self.buckets: dict[str, Bucket] = {
            b.id: Bucket(id=b.id, name=b.id, public=b.public, created_at=self.now(), updated_at=self.now())
            for b in self._initial
        }
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.faults: list[Fault] = []
        self.log: list[dict[str, Any]] = []

    # -- time and keys -----------------------------------------------------------------------------
    def now(self) -> float:
        return self._now() + self.clock_offset

    def advance_clock(self, seconds: float) -> None:
        self.clock_offset += seconds

    def role_of(self, authorization: str) -> str:
        """The `role` claim of the bearer token, or AccessDenied with the verifier's message."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            claims = tokens.verify(token, self.jwt_secret, now=self.now())
        except tokens.TokenError as exc:
            raise errors.access_denied(str(exc)) from None
        return str(claims.get("role") or "anon")

    def sign_url(self, bucket_id: str, name: str, expires_in: int) -> str:
        issued = int(self.now())
        return tokens.sign(
            {"url": f"{bucket_id}/{name}", "iat": issued, "exp": issued + expires_in}, self.jwt_secret
        )

    def signed_path(self, token: str) -> str:
        """The `<bucket>/<path>` a signed-URL token grants, or InvalidJWT as Storage answers it."""
        try:
            claims = tokens.verify(token, self.jwt_secret, now=self.now())
        except tokens.TokenError as exc:
            raise errors.invalid_jwt(str(exc)) from None
        return str(claims.get("url", ""))

    # -- buckets and objects -----------------------------------------------------------------------
    def bucket(self, bucket_id: str) -> Bucket:
        found = self.buckets.get(bucket_id)
        if found is None:
            raise errors.no_such_bucket()
        return found

    def object(self, bucket_id: str, name: str) -> StoredObject:
        found = self.objects.get((bucket_id, name))
        if found is None:
            raise errors.no_such_key()
        return found

    def put(
        self, bucket_id: str, name: str, data: bytes, mime_type: str, cache_control: str, *, upsert: bool
    ) -> StoredObject:
        bucket = self.bucket(bucket_id)
        if not bucket.accepts(mime_type):
            raise errors.invalid_mime_type(mime_type)
        if bucket.file_size_limit is not None and len(data) > bucket.file_size_limit:
            raise errors.entity_too_large()
        current = self.objects.get((bucket_id, name))
        if current is not None and not upsert:
            raise errors.key_already_exists()
        stored = StoredObject(
            bucket_id, name, data, mime_type, cache_control, created_at=self.now(), updated_at=self.now()
        )
        if current is not None:
            stored.id, stored.created_at, stored.writes = current.id, current.created_at, current.writes + 1
        self.objects[(bucket_id, name)] = stored
        return stored

    # -- faults and the log ------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def take_fault(self, operation: str) -> Fault | None:
        for fault in self.faults:
            if fault.operation in (operation, "*"):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def record(self, operation: str, key: str, status: int) -> None:
        self.log.append({"operation": operation, "key": key, "status": status})

    def snapshot(self) -> dict[str, Any]:
        return {
            "buckets": [bucket.json() for bucket in self.buckets.values()],
            "objects": [stored.summary() for stored in self.objects.values()],
            "faults": [vars(fault).copy() for fault in self.faults],
            "operations": list(self.log),
            "clockOffsetSeconds": self.clock_offset,
        }
