"""STRIPE_LOG=debug would make the Stripe SDK print whole response bodies (a revealed card's number and
CVC) with print(), past our logging and its redaction: our gateway switches that off."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
from stripe import _util
before = _util._console_log_level()
from esim_common.providers.stripe import StripeGateway
StripeGateway(api_key="sk_test_probe", api_base="http://127.0.0.1:9")
print(before, _util._console_log_level())
"""


def test_the_gateway_switches_off_the_sdks_console_log_even_when_stripe_log_is_set():
    env = {**os.environ, "STRIPE_LOG": "debug"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # "debug" first: the probe would see the leak without the gateway (so the test can fail).
    assert done.stdout.split() == ["debug", "None"]
