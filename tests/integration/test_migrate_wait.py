"""`esim-migrate --wait`: a Kubernetes pod's init container holds the pod until the migration Job has
applied every migration its image carries (deploy/k8s). On a real Postgres."""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from esim_common.migrate import DEFAULT_MIGRATIONS_DIR, MigrationError, main, migrate, wait_for_schema
from tests.fixtures.polling import eventually
from tests.fixtures.services import _with_database

pytestmark = pytest.mark.db

FIRST_VERSION = sorted(DEFAULT_MIGRATIONS_DIR.glob("*.sql"))[0].stem


@pytest.fixture
async def empty_database(postgres_url: str) -> AsyncIterator[str]:
    """A database that exists but has never been migrated: what the pods find before the Job has run."""
    name = f"esim_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_with_database(postgres_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(postgres_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_a_waiting_pod_starts_once_the_job_has_migrated_and_not_before(empty_database, caplog):
    caplog.set_level(logging.INFO, logger="esim.migrate")
    waiting = asyncio.create_task(wait_for_schema(empty_database, max_wait=60, interval=0.05))
    await eventually(
        lambda: any(r.getMessage() == "waiting for the schema" for r in caplog.records),
        within=30,
        what="the waiter has looked and found the schema missing",
    )
    assert not waiting.done()
    await migrate(empty_database)  # the Job
    async with asyncio.timeout(30):
        await waiting


async def test_a_pod_gives_up_after_its_wait_naming_what_is_missing(empty_database):
    with pytest.raises(MigrationError, match=f"still waiting for migrations {FIRST_VERSION}"):
        await wait_for_schema(empty_database, max_wait=0.2, interval=0.05)


async def test_an_unreachable_database_is_waited_for_like_a_missing_schema():
    unreachable = "postgresql://postgres@127.0.0.1:1/esim"  # nothing listens on port 1
    with pytest.raises(MigrationError, match=r"still waiting for the database \(\w+\)"):
        await wait_for_schema(unreachable, max_wait=0.2, interval=0.05)


async def test_a_migration_edited_after_it_was_applied_fails_at_once_instead_of_waiting(
    database_url, tmp_path
):
    edited = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, edited)
    first = edited / f"{FIRST_VERSION}.sql"
    first.write_text(first.read_text() + "\n-- edited")
    async with asyncio.timeout(10):  # far less than max_wait: it does not wait for what cannot come
        with pytest.raises(MigrationError, match=f"{FIRST_VERSION} differs"):
            await wait_for_schema(database_url, directory=edited, max_wait=600, interval=0.05)


def test_the_init_container_command_exits_0_on_a_migrated_schema_and_1_on_a_missing_one(
    database_url, empty_database, monkeypatch
):
    monkeypatch.chdir(Path(__file__).parent)  # no .env of a developer's checkout in the way
    assert main(["--database-url", database_url, "--wait", "5"]) == 0
    assert main(["--database-url", empty_database, "--wait", "0.2"]) == 1
