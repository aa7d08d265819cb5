"""The asyncpg pool: created once per process, after waiting for Postgres with logged retries."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger("esim.db")

# A service started together with Postgres (compose, `make run`) may come up first: wait this long
# before giving up, logging each failed attempt, instead of crash-looping.
CONNECT_DEADLINE_SECONDS = 30.0
CONNECT_RETRY_PAUSE_SECONDS = 1.0
# Queries are short; anything slower than this is a stuck connection, not work.
COMMAND_TIMEOUT_SECONDS = 10.0


async def keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection handed back, besides rolling back an open transaction
    (asyncpg always does that): nothing. asyncpg's default runs `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` — one more round trip on every release, ~30 per order. Our services leave no
    session state behind: advisory locks are transaction-scoped (`pg_advisory_xact_lock`), cursors live
    in transactions, nobody LISTENs or SETs. Code that starts to must not use pooled connections."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_cache_size: int = 100,
    deadline_seconds: float = CONNECT_DEADLINE_SECONDS,
) -> asyncpg.Pool:
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=COMMAND_TIMEOUT_SECONDS,
                statement_cache_size=statement_cache_size,
                reset=keep_session,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            if loop.time() >= give_up_at:
                raise
            # The error text can quote the DSN; the log formatter redacts the password from it.
            log.warning(
                "database not ready, retrying",
                extra={"attempt": attempt, "error": f"{type(exc).__name__}: {exc}"},
            )
            await asyncio.sleep(CONNECT_RETRY_PAUSE_SECONDS)
            continue
        assert pool is not None
        return pool
