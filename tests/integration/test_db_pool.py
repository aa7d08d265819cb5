"""The asyncpg pool waits for Postgres with logged retries, then gives up loudly."""

from __future__ import annotations

import logging
import time

import pytest

from esim_common.db import create_pool
from esim_sandbox.serve import free_port

pytestmark = pytest.mark.db


async def test_the_pool_connects_to_a_running_database(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        assert await pool.fetchval("SELECT count(*) FROM esim_purchases") == 0
    finally:
        await pool.close()


async def test_an_unreachable_database_is_retried_with_a_log_line_per_attempt_then_raises(caplog):
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/esim"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="esim.db"), pytest.raises(OSError):
        await create_pool(dsn, deadline_seconds=1.5)
    assert time.monotonic() - started >= 1.5
    retries = [r for r in caplog.records if r.getMessage() == "database not ready, retrying"]
    assert len(retries) >= 2


async def test_a_connection_handed_back_mid_transaction_is_rolled_back_without_the_reset_query(database_url):
    """The pool skips asyncpg's session reset query (db.keep_session); what must never leak from one
    use of a connection to the next — an open transaction and its writes — is still rolled back."""
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        await pool.execute("CREATE TABLE pool_probe (x int)")
        conn = await pool.acquire()
        queries: list[str] = []
        conn.add_query_logger(lambda record: queries.append(record.query))
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("INSERT INTO pool_probe VALUES (1)")
        await pool.release(conn)  # never committed: a bug elsewhere, not a write

        async with pool.acquire() as again:  # the same (only) connection
            assert not again.is_in_transaction()
            assert await again.fetchval("SELECT count(*) FROM pool_probe") == 0
        assert "ROLLBACK" in queries
        assert not any("RESET ALL" in query or "pg_advisory_unlock_all" in query for query in queries)
    finally:
        await pool.close()
