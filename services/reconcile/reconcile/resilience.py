"""Database outages are transient: a handler that loses Postgres is retried, not dead-lettered.

The consumer dead-letters any exception it does not know (a bug). A dropped or refused database
connection is not a bug: the same message succeeds once Postgres is back, so it takes the retry tiers.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg

from esim_common.errors import RetryLater

# Connection lost or refused, the server restarting or full, a statement that timed out, and the two
# conflicts Postgres itself says to retry (serialization failure, deadlock).
TRANSIENT_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    ConnectionError,
    TimeoutError,
)

P = ParamSpec("P")
R = TypeVar("R")


def database_outage_is_transient(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except TRANSIENT_DATABASE_ERRORS as exc:
            raise RetryLater(f"database unavailable: {type(exc).__name__}") from exc

    return wrapper
