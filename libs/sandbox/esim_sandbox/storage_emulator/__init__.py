"""A stateful, in-memory emulator of Supabase Storage's REST API, faithful enough for the real
`supabase` client (storage3): buckets, uploads with upsert, downloads, public and signed URLs,
Storage's JWT auth and its error shapes, plus injectable outages.

`create_app(...)` builds it; `python -m esim_sandbox.storage_emulator --port 12113` serves it.
Routes: `api.py`; controls: `control.py`.
"""

from .app import (
    DEFAULT_ANON_KEY,
    DEFAULT_BUCKET,
    DEFAULT_JWT_SECRET,
    DEFAULT_SERVICE_ROLE_KEY,
    anon_key,
    create_app,
    service_role_key,
)
from .state import Fault, InitialBucket, StorageState

__all__ = [
    "DEFAULT_ANON_KEY",
    "DEFAULT_BUCKET",
    "DEFAULT_JWT_SECRET",
    "DEFAULT_SERVICE_ROLE_KEY",
    "Fault",
    "InitialBucket",
    "StorageState",
    "anon_key",
    "create_app",
    "service_role_key",
]
