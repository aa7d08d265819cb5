"""Where QR PNGs are kept: one small interface, two implementations, chosen by `storage_kind`.

    QrStorage.save(name, png) -> URL     store (or replace) `<name>.png`, say where it can be fetched
    verify()                             at start-up: QrStorageRefused when no save can ever succeed
                                         (the service refuses to start), QrStorageError when the
                                         storage is only unavailable now (it starts anyway)

    LocalQrStorage      a directory, served by the provisioning app (`routes.py`); the default
    SupabaseQrStorage   Supabase Storage through the `supabase` client (`supabase_storage.py`), when
                        SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are both set

Saving is idempotent: a redelivered message renders the same image and replaces the stored one.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from esim_common.errors import PermanentError, TransientError

# Names are our transaction ids: the alphabet Zendit accepts for ids. Anything else (a `/`, `..`, a
# NUL byte) is refused before it gets near a path.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PNG_SUFFIX = ".png"


class QrStorageError(TransientError):
    """The PNG could not be stored (disk full, a storage service down): retry later."""


class QrStorageRefused(PermanentError):
    """The storage will not take QR codes until an operator fixes the configuration named in the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class QrStorage(Protocol):
    async def save(self, name: str, png: bytes) -> str:
        """Store `png` as `<name>.png`, replacing any previous version; return its public URL."""
        ...


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name))


class StorageKind(StrEnum):
    LOCAL = "local"
    SUPABASE = "supabase"


def storage_kind(supabase_url: str | None, service_role_key: str | None) -> StorageKind:
    """Supabase when both are set, the local directory when neither is.

    One without the other is refused: storing locally while the operator meant Supabase would mail
    customers links to a machine they cannot reach, and nobody would notice until they complained.
    """
    has_url, has_key = bool(supabase_url and supabase_url.strip()), bool(service_role_key)
    if has_url and has_key:
        return StorageKind.SUPABASE
    if has_url or has_key:
        given, missing = (
            ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")
            if has_url
            else ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_URL")
        )
        raise ValueError(
            f"{given} is set but {missing} is not: set both to store QR codes in Supabase Storage, "
            "or neither to keep them in QR_STORAGE_DIR"
        )
    return StorageKind.LOCAL


class LocalQrStorage:
    """PNGs in a local directory, served by the provisioning app at `public_base_url/<name>.png`."""

    def __init__(self, directory: Path, public_base_url: str) -> None:
        self.directory = directory
        self.public_base_url = public_base_url.rstrip("/")

    def path_of(self, name: str) -> Path | None:
        """The file for `name`, or None when `name` is not a valid QR name (never a path outside)."""
        if not valid_name(name):
            return None
        return self.directory / f"{name}{PNG_SUFFIX}"

    def url_of(self, name: str) -> str:
        return f"{self.public_base_url}/{name}{PNG_SUFFIX}"

    async def aclose(self) -> None:
        """Nothing to close: the same shape as SupabaseQrStorage, so `main.py` closes either."""

    async def verify(self) -> None:
        """Write and remove a probe file, so a directory that cannot be written is known at start-up.

        Only ever a QrStorageError (start anyway, with a warning): a full disk or a mount that is not
        there yet may well recover, and each save waits for it like a Zendit outage (the poll's
        backoff, up to the purchase deadline).
        """
        try:
            await asyncio.to_thread(_probe, self.directory)
        except OSError as exc:
            raise QrStorageError(
                f"QR_STORAGE_DIR {self.directory} cannot be written: {exc.strerror or type(exc).__name__}"
            ) from exc

    async def save(self, name: str, png: bytes) -> str:
        path = self.path_of(name)
        if path is None:
            raise ValueError(f"not a valid QR code name: {name!r}")
        try:
            await asyncio.to_thread(_write_atomically, path, png)
        except OSError as exc:
            raise QrStorageError(f"could not store the QR code in {self.directory}: {exc.strerror}") from exc
        return self.url_of(name)


def _probe(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(dir=directory, prefix=".verify.", suffix=".tmp")
    os.close(descriptor)
    os.unlink(probe)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, flush it to disk, then rename over `path`.

    A reader (the HTTP route, an email being built) sees the old file or the new one, never half of
    one; a crash leaves at most a stray `.tmp` file, never a truncated PNG under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # The rename itself lives in the directory: flush it too, or a power cut can undo it.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
