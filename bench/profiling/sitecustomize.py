"""cProfile for the services of a pipeline benchmark run (`--profile DIR`), hooked in through PYTHONPATH.

Python imports `sitecustomize` at start-up from the path; the benchmark puts this directory first on
the services' PYTHONPATH and sets BENCH_PROFILE_DIR. A process started as `python -m <service>` then
profiles its main thread (the event loop) in CPU time, from the moment the benchmark sends it SIGUSR1
(its load starts: start-up and set-up stay out), and writes `<service>-<pid>.prof` when it stops,
with `<service>-<pid>.counts.json`: how many database statements and transactions, HTTP requests
(by port and path) and AMQP publishes it made meanwhile.
Profiling slows a service down: such runs find where the time goes, they are not for figures.
"""

from __future__ import annotations

import os
import signal
import sys

_SERVICES = {"webhook", "funding", "provisioning", "notify", "reconcile"}


def _start(directory: str, name: str) -> None:
    import cProfile
    import time

    # CPU time, not wall time: an event loop waiting in epoll would otherwise dominate every profile.
    profile = cProfile.Profile(time.process_time)
    path = os.path.join(directory, f"{name}-{os.getpid()}.prof")
    counts: dict[str, int] = {}
    _count_calls(counts)
    written = False

    def write() -> None:
        nonlocal written
        if not written:
            written = True
            profile.disable()
            profile.dump_stats(path)
            import json

            with open(path.removesuffix(".prof") + ".counts.json", "w") as f:
                json.dump(counts, f, indent=1, sort_keys=True)

    def on_term(signum: int, frame: object) -> None:
        # uvicorn installs its own handlers and, once shut down, restores this one and re-raises the
        # signal: the profile is written here, then the process ends as SIGTERM would have ended it.
        write()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    def on_reset(signum: int, frame: object) -> None:
        # The benchmark sends SIGUSR1 as its load starts: start-up and set-up stay out of the profile.
        profile.disable()
        profile.clear()
        counts.clear()
        profile.enable()

    import atexit

    atexit.register(write)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_reset)
    profile.enable()


def _count_calls(counts: dict[str, int]) -> None:
    """Count what the service asks of its dependencies: database statements and transactions, HTTP
    requests by host and path, AMQP publishes. Wraps the client libraries, not our code."""
    import functools
    from urllib.parse import urlsplit

    import aio_pika
    import asyncpg.connection
    import asyncpg.transaction
    import httpx

    def counted(owner: type, method: str, key) -> None:  # type: ignore[no-untyped-def]
        original = getattr(owner, method)

        @functools.wraps(original)
        async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            name = key(*args, **kwargs)
            counts[name] = counts.get(name, 0) + 1
            return await original(*args, **kwargs)

        setattr(owner, method, wrapper)

    def db_key(connection: object, query: object = "", *a: object, **k: object) -> str:
        text = str(query).lstrip().upper()
        if text.startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            return "db round trip: BEGIN/COMMIT"
        if text.startswith("SELECT PG_ADVISORY_UNLOCK_ALL"):  # asyncpg's reset when a pool takes it back
            return "db round trip: pool reset on release"
        return "db round trip: statement"

    for method in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        counted(asyncpg.connection.Connection, method, db_key)
    counted(asyncpg.transaction.Transaction, "start", lambda *a, **k: "db transaction (explicit)")

    def http_key(client: object, request: httpx.Request, *a: object, **k: object) -> str:
        parts = urlsplit(str(request.url))
        path = "/".join(parts.path.split("/")[:4])  # /v1/esim/purchases, not the id after it
        return f"http {request.method} :{parts.port}{path}"

    counted(httpx.AsyncClient, "send", http_key)
    counted(aio_pika.Exchange, "publish", lambda *a, **k: "amqp publish")


def _module_name() -> str | None:
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv:
        index = argv.index("-m") + 1
        if index < len(argv):
            return argv[index]
    return None


_directory = os.environ.get("BENCH_PROFILE_DIR")
_name = _module_name()
if _directory and _name in _SERVICES:
    _start(_directory, _name)
