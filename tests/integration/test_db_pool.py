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
