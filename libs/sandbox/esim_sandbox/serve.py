"""Run an emulator's ASGI app on loopback, either in the foreground or in a background thread.

Tests and `python -m esim_sandbox` both use this, so an emulator behaves the same in both.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

LOOPBACK = "127.0.0.1"
# How long a background server may take to start listening before we call it broken.
STARTUP_TIMEOUT_SECONDS = 10.0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free ports. Asked for one at a time, the OS may hand the same port out twice
    (it is free again as soon as the probe closes), and two processes of a stack then fight over it."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            sock = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))  # held open until every port is chosen: all distinct
            ports.append(int(sock.getsockname()[1]))
        return ports


@dataclass
class ServerHandle:
    """A running background server: its base URL and a way to stop it."""

    url: str
    port: int
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)


def serve_in_thread(app: object, *, host: str = LOOPBACK, port: int = 0) -> ServerHandle:
    """Start `app` with uvicorn in a daemon thread and wait until it accepts connections."""
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"sandbox-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"sandbox server on {host}:{port} did not start")
        time.sleep(0.02)
    return ServerHandle(url=f"http://{host}:{port}", port=port, _server=server, _thread=thread)


def serve_forever(app: object, *, host: str = LOOPBACK, port: int) -> None:
    """Run `app` in the foreground until interrupted (the `python -m` entry points)."""
    uvicorn.run(app, host=host, port=port, log_level="info")  # type: ignore[arg-type]
