"""Apply the SQL files under `deploy/migrations/` in name order, each exactly once.

    esim-migrate                      # DATABASE_URL from the environment / .env
    esim-migrate --database-url URL --create-database
    esim-migrate --wait 600           # change nothing: wait until another migrator has applied them all

Each file runs in its own transaction together with the row that records it, so a failed file leaves
nothing behind and is retried next time. An advisory lock serialises concurrent migrators (several
replicas starting at once). A file that changed after it was applied is refused: migrations are
append-only, fix forward with a new file.

`--wait` is for a Kubernetes pod's init container: the migration Job changes the schema, and a new pod
starts only once every migration its image carries is applied (read-only; no lock, works through a
transaction pooler).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("esim.migrate")

# Arbitrary constant shared by every migrator: "the esim schema is being changed".
MIGRATION_LOCK_ID = 7_301_945_112
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "deploy" / "migrations"

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {directory}")
    return [Migration(version=path.stem, sql=path.read_text()) for path in files]


async def apply_migrations(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    """Apply what is missing; returns the versions applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(CREATE_LEDGER)
        applied = {r["version"]: r["checksum"] for r in await conn.fetch("SELECT * FROM schema_migrations")}
        done_now: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            log.info("migration applied", extra={"version": migration.version})
            done_now.append(migration.version)
        return done_now
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def pending_migrations(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    """The versions not applied yet, read without taking the lock. An applied file that changed is an
    error, not something to wait for."""
    applied: dict[str, str] = {}
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        applied = {r["version"]: r["checksum"] for r in await conn.fetch("SELECT * FROM schema_migrations")}
    for migration in migrations:
        if applied.get(migration.version, migration.checksum) != migration.checksum:
            raise MigrationError(f"migration {migration.version} differs from the one applied")
    return [m.version for m in migrations if m.version not in applied]


async def wait_for_schema(
    dsn: str, *, directory: Path = DEFAULT_MIGRATIONS_DIR, max_wait: float, interval: float = 2.0
) -> None:
    """Return once every migration in `directory` is applied; MigrationError after `max_wait` seconds.
    An unreachable database counts as "not yet": the pod may start before the database answers."""
    migrations = load_migrations(directory)
    deadline = asyncio.get_running_loop().time() + max_wait
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=10, statement_cache_size=0)  # fine behind a pooler
            try:
                missing = await pending_migrations(conn, migrations)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            waiting_for = f"the database ({type(exc).__name__})"
        else:
            if not missing:
                return
            waiting_for = "migrations " + ", ".join(missing)
        if asyncio.get_running_loop().time() >= deadline:
            raise MigrationError(
                f"schema not up to date after {max_wait:g} s: still waiting for {waiting_for}"
            )
        log.info("waiting for the schema", extra={"waiting_for": waiting_for})
        await asyncio.sleep(interval)


def _split_database(dsn: str) -> tuple[str, str]:
    """(dsn of the maintenance database `postgres`, name of the target database)."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name:
        raise MigrationError("DATABASE_URL names no database")
    return urlunsplit(parts._replace(path="/postgres")), name


async def create_database_if_missing(dsn: str) -> bool:
    admin_dsn, name = _split_database(dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        # Identifiers cannot be bound as parameters; quote it the way Postgres does.
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await conn.close()


async def migrate(
    dsn: str, *, directory: Path = DEFAULT_MIGRATIONS_DIR, create_database: bool = False
) -> list[str]:
    if create_database and await create_database_if_missing(dsn):
        log.info("database created")
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn, load_migrations(directory))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    from esim_common.logging import configure_logging
    from esim_common.settings import load_settings

    parser = argparse.ArgumentParser(prog="esim-migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="defaults to DATABASE_URL")
    parser.add_argument("--migrations-dir", type=Path, help="defaults to MIGRATIONS_DIR or deploy/migrations")
    parser.add_argument("--create-database", action="store_true", help="create the database if missing")
    parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="apply nothing: wait up to SECONDS until every migration is applied (by another migrator)",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(service="migrate", level=settings.log_level, secrets=settings.secret_values().values())
    dsn = args.database_url or settings.database_url
    directory = args.migrations_dir or Path(settings.migrations_dir or DEFAULT_MIGRATIONS_DIR)
    if args.wait is not None:
        try:
            asyncio.run(wait_for_schema(dsn, directory=directory, max_wait=args.wait))
        except MigrationError as exc:
            log.error("schema not ready", extra={"error": str(exc)})
            return 1
        log.info("schema up to date")
        return 0
    try:
        applied = asyncio.run(migrate(dsn, directory=directory, create_database=args.create_database))
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        log.error("migration failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        return 1
    log.info("schema up to date", extra={"applied_now": applied})
    return 0


if __name__ == "__main__":
    sys.exit(main())
