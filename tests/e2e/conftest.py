"""The whole system as real processes (sandbox + five services) for end-to-end tests.

One stack per test module (starting six processes takes seconds); its own database and a private
topology prefix on the real broker, so it never sees another test's orders or messages.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from esim_common.migrate import migrate
from esim_sandbox.stack import Stack


@pytest.fixture(scope="module")
async def e2e_database_url(postgres_url: str) -> AsyncIterator[str]:
    name = f"esim_e2e_{uuid.uuid4().hex[:12]}"
    dsn = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
    await migrate(dsn, create_database=True)
    yield dsn
    admin = await asyncpg.connect(urlunsplit(urlsplit(postgres_url)._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def stack(e2e_database_url: str, amqp_url: str, tmp_path_factory) -> Iterator[Stack]:
    running = Stack(
        database_url=e2e_database_url,
        amqp_url=amqp_url,
        workdir=tmp_path_factory.mktemp("stack"),
        topology_prefix=f"e2e-{uuid.uuid4().hex[:8]}.",
    )
    try:
        running.start()
        yield running
    finally:
        running.stop(delete_topology=True)
