"""The whole system as real processes on loopback: the sandbox emulators and the five services.

`make run` (`python -m esim_sandbox.demo`) and the end-to-end tests both start it through `Stack`, so
what the tests prove is what an operator runs. Each process gets its settings through environment
variables (the same names as in production), its own HTTP port, and its output in a log file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from esim_common.settings import Settings
from esim_common.topology import delete_from_url, esim_topology
from esim_sandbox import storage_emulator
from esim_sandbox.serve import LOOPBACK, free_ports

SERVICES = ("webhook", "funding", "provisioning", "notify", "reconcile")
DEFAULT_PORTS = {"webhook": 8080, "funding": 8081, "provisioning": 8082, "notify": 8083, "reconcile": 8084}
SANDBOX_PORTS = {"stripe": 12111, "zendit": 12112, "storage": 12113, "smtp": 1025}
# Where provisioning keeps QR codes: a local directory (the default) or the Supabase Storage emulator.
QR_STORAGES = ("local", "supabase")
ZENDIT_WEBHOOK_PATH = "/api/webhooks/zendit"
ISSUING_AUTHORIZATION_PATH = "/api/webhooks/stripe/issuing-authorization"
# Services wait up to 30 s for Postgres/RabbitMQ themselves; a stack that is not healthy after this
# long is broken, not slow.
STARTUP_TIMEOUT_SECONDS = 45.0
STOP_TIMEOUT_SECONDS = 10.0


@dataclass
class Process:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(  # noqa: S603 (our own interpreter and modules)
            self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if not self.running:
            return
        assert self.popen is not None
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (no cleanup, unacked messages return to their queues)."""
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    """Configuration of one running system; `start()` launches it, `stop()` ends every process."""

    database_url: str
    amqp_url: str
    workdir: Path
    topology_prefix: str = ""
    use_default_ports: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # "supabase": the sandbox's Storage emulator with its service-role key; its bucket is public when
    # extra_env sets SUPABASE_SIGNED_URL_SECONDS=0 (public URLs), private otherwise.
    storage: str = "local"

    def __post_init__(self) -> None:
        if self.storage not in QR_STORAGES:
            raise ValueError(f"storage must be one of {QR_STORAGES}, not {self.storage!r}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = (*SANDBOX_PORTS, *SERVICES)
        chosen = free_ports(len(names))
        for name, free in zip(names, chosen, strict=True):
            default = SANDBOX_PORTS.get(name) or DEFAULT_PORTS[name]
            self.ports[name] = default if self.use_default_ports else free

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self.ports[name]}"

    @property
    def mail_dir(self) -> Path:
        return self.workdir / "mail"

    @property
    def qr_dir(self) -> Path:
        return self.workdir / "qrcodes"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def storage_bucket(self) -> str:
        return self.extra_env.get("SUPABASE_BUCKET", "").strip() or storage_emulator.DEFAULT_BUCKET

    @property
    def signed_url_seconds(self) -> int:
        given = self.extra_env.get("SUPABASE_SIGNED_URL_SECONDS", "").strip()
        default: int = Settings.model_fields["supabase_signed_url_seconds"].default
        return int(given) if given else default

    @property
    def public_storage_bucket(self) -> bool:
        return self.signed_url_seconds == 0

    def _storage_env(self) -> dict[str, str]:
        """Set even when empty: empty beats a SUPABASE_URL in `.env`, which would otherwise send the
        sandbox's QR codes to a real project. With the emulator, its bucket and visibility are what
        provisioning is told, so an inherited SUPABASE_BUCKET or SUPABASE_SIGNED_URL_SECONDS in `.env`
        cannot make the two disagree."""
        if self.storage != "supabase":
            return {"SUPABASE_URL": "", "SUPABASE_SERVICE_ROLE_KEY": ""}
        return {
            "SUPABASE_URL": self.url("storage"),
            "SUPABASE_SERVICE_ROLE_KEY": storage_emulator.DEFAULT_SERVICE_ROLE_KEY,
            "SUPABASE_BUCKET": self.storage_bucket,
            "SUPABASE_SIGNED_URL_SECONDS": str(self.signed_url_seconds),
        }

    def service_env(self, name: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("STRIPE_", "ZENDIT_", "SMTP_", "SUPABASE_"))
        }
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "AMQP_URL": self.amqp_url,
                "TOPOLOGY_PREFIX": self.topology_prefix,
                "HTTP_HOST": LOOPBACK,
                "HTTP_PORT": str(self.ports[name]),
                "STRIPE_API_BASE": self.url("stripe"),
                "ZENDIT_API_BASE": f"{self.url('zendit')}/v1",
                "ZENDIT_TOPUP_URL": f"{self.url('zendit')}/v1/wallet/topup",
                "SMTP_HOST": LOOPBACK,
                "SMTP_PORT": str(self.ports["smtp"]),
                "QR_STORAGE_DIR": str(self.qr_dir),
                "QR_PUBLIC_BASE_URL": f"{self.url('provisioning')}/qrcodes",
                "SHOP_BASE_URL": self.url("webhook"),
                "PYTHONUNBUFFERED": "1",
                **self._storage_env(),
            }
        )
        env.update(self.extra_env)
        return env

    def _sandbox_process(self) -> Process:
        command = [
            sys.executable,
            "-m",
            "esim_sandbox",
            f"--stripe-port={self.ports['stripe']}",
            f"--zendit-port={self.ports['zendit']}",
            f"--storage-port={self.ports['storage']}",
            f"--storage-bucket={self.storage_bucket}",
            f"--smtp-port={self.ports['smtp']}",
            f"--mail-dir={self.mail_dir}",
            f"--stripe-webhook-url={self.url('webhook')}/api/webhooks/stripe",
            # Every charge of an Issuing card asks the webhook service first, as Stripe does when the
            # real-time authorisation endpoint is configured: the sandbox proves the top-up passes it.
            f"--stripe-issuing-authorization-url={self.url('webhook')}{ISSUING_AUTHORIZATION_PATH}",
        ]
        # A stack whose webhook service verifies real-time authorisations with their own secret gets an
        # emulator signing them with it (the first one: during a rotation either is accepted).
        issuing_secrets = self.extra_env.get("STRIPE_ISSUING_WEBHOOK_SECRETS", "").split(",")
        issuing_secret = next((secret.strip() for secret in issuing_secrets if secret.strip()), None)
        if issuing_secret is not None:
            command.append(f"--stripe-issuing-authorization-secret={issuing_secret}")
        if self.public_storage_bucket:
            command.append("--storage-public-bucket")
        return Process("sandbox", command, self.service_env("webhook"), self.logs_dir / "sandbox.log")

    def _service_process(self, name: str) -> Process:
        return Process(
            name, [sys.executable, "-m", name], self.service_env(name), self.logs_dir / f"{name}.log"
        )

    def start(self) -> None:
        self.refuse_taken_ports()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.processes["sandbox"] = self._sandbox_process()
        self.processes["sandbox"].start()
        self._wait_for_http("sandbox", f"{self.url('stripe')}/_sandbox/health")
        self._wait_for_http("sandbox", f"{self.url('storage')}/_sandbox/health")
        for name in SERVICES:
            self.processes[name] = self._service_process(name)
            self.processes[name].start()
        for name in SERVICES:
            self.wait_healthy(name)
        self.configure_zendit_webhook()

    def refuse_taken_ports(self) -> None:
        """Fail before starting anything when a port is taken (another `make run` still serving): the
        health checks would otherwise be answered by the other stack's processes while ours cannot bind."""
        for name, port in self.ports.items():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((LOOPBACK, port))
                except OSError:
                    raise RuntimeError(
                        f"port {port} ({name}) is in use: another sandbox (`make run`) or program is "
                        "listening there; stop it first"
                    ) from None

    def configure_zendit_webhook(self) -> None:
        """Point the Zendit emulator's purchase webhooks at the webhook service, as an operator does in
        Zendit's console (URL, custom header name and value); the emulator checks the URL with HEAD."""
        fields = Settings.model_fields
        header = self.extra_env.get("ZENDIT_WEBHOOK_HEADER") or fields["zendit_webhook_header"].default
        secret = self.extra_env.get("ZENDIT_WEBHOOK_SECRET") or fields["zendit_webhook_secret"].default
        response = httpx.post(
            f"{self.url('zendit')}/_sandbox/webhook",
            json={
                "url": f"{self.url('webhook')}{ZENDIT_WEBHOOK_PATH}",
                "header": header,
                "secret": secret.get_secret_value() if isinstance(secret, SecretStr) else secret,
            },
            timeout=15,
        )
        if response.status_code != 200:
            raise RuntimeError(f"the Zendit emulator's webhook could not be configured: {response.text}")

    def wait_healthy(self, name: str) -> None:
        self._wait_for_http(name, f"{self.url(name)}/healthz")

    def _wait_for_http(self, name: str, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        process = self.processes[name]
        while time.monotonic() < deadline:
            if not process.running:
                raise RuntimeError(f"{name} exited during start-up:\n{process.log_tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"{name} not healthy at {url} within {STARTUP_TIMEOUT_SECONDS}s:\n{process.log_tail()}"
        )

    def restart(self, name: str) -> None:
        process = self.processes[name]
        process.stop()
        process.start()
        self.wait_healthy(name)

    def stop(self, *, delete_topology: bool = False) -> None:
        """Stop every process; with `delete_topology`, also remove this stack's (prefixed) queues, which
        would otherwise pile up on the broker run after run."""
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        if delete_topology and self.topology_prefix:
            topology = esim_topology(prefix=self.topology_prefix)
            asyncio.run(delete_from_url(self.amqp_url, topology))
