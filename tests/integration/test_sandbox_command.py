"""`python -m esim_sandbox` — what `make run` starts — serves every emulator and stops cleanly."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage

import httpx

from esim_sandbox.serve import free_port
from esim_sandbox.storage_emulator import DEFAULT_SERVICE_ROLE_KEY

STARTUP_SECONDS = 20


def test_the_sandbox_command_serves_every_emulator_and_stops_on_sigterm(tmp_path):
    stripe_port, zendit_port, smtp_port = free_port(), free_port(), free_port()
    storage_port = free_port()
    mail_dir = tmp_path / "mail"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "esim_sandbox",
            f"--stripe-port={stripe_port}",
            f"--zendit-port={zendit_port}",
            f"--storage-port={storage_port}",
            f"--smtp-port={smtp_port}",
            f"--mail-dir={mail_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + STARTUP_SECONDS
        while not any("Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        banner = "".join(lines)
        assert f"http://127.0.0.1:{stripe_port}" in banner
        assert f"http://127.0.0.1:{zendit_port}/v1" in banner
        assert f"127.0.0.1:{smtp_port}" in banner
        assert f"http://127.0.0.1:{storage_port}" in banner

        balance = httpx.get(
            f"http://127.0.0.1:{stripe_port}/v1/balance", headers={"Authorization": "Bearer sk_test_x"}
        )
        assert balance.status_code == 200 and balance.json()["object"] == "balance"
        offers = httpx.get(
            f"http://127.0.0.1:{zendit_port}/v1/esim/offers",
            params={"_limit": 5, "_offset": 0},
            headers={"Authorization": "Bearer sand_test_key"},
        )
        assert offers.status_code == 200 and len(offers.json()["list"]) == 5
        bucket = httpx.get(
            f"http://127.0.0.1:{storage_port}/storage/v1/bucket/esim-qrcodes",
            headers={"Authorization": f"Bearer {DEFAULT_SERVICE_ROLE_KEY}"},
        )
        assert bucket.status_code == 200 and bucket.json()["public"] is False

        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = "shop@example.com", "ada@example.com", "hello"
        mail.set_content("hi")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=5) as smtp:
            smtp.send_message(mail)
        assert len(list(mail_dir.glob("*.eml"))) == 1

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "sandbox stopped." in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
