"""Crash points: refused outside the sandbox, inert when nothing is armed, abrupt when armed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from esim_common import crash_points
from esim_common.crash_points import CRASH_EXIT_STATUS, crash_here
from esim_common.settings import Settings
from tests.unit.test_events_and_settings import PRODUCTION_SECRETS

POINT = "funding.after_card_created"


@pytest.fixture(autouse=True)
def _nothing_armed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CRASH_POINTS", raising=False)
    crash_points.arm([])
    yield
    crash_points.arm([])


def test_production_settings_with_crash_points_are_refused_without_echoing_secrets():
    assert Settings(**PRODUCTION_SECRETS).crash_points == []  # the same settings are fine without them
    with pytest.raises(ValidationError) as info:
        Settings(**PRODUCTION_SECRETS, crash_points=[POINT])
    message = str(info.value)
    assert "CRASH_POINTS" in message and "ENVIRONMENT=production" in message
    assert all(secret not in message for secret in PRODUCTION_SECRETS.values() if secret != "production")


def test_crash_points_from_the_environment_are_refused_in_production_and_split_in_the_sandbox(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("CRASH_POINTS", f"{POINT}, funding.before_ack")
    with pytest.raises(ValidationError, match="CRASH_POINTS"):
        Settings(**PRODUCTION_SECRETS)
    assert Settings().crash_points == [POINT, "funding.before_ack"]


def test_crash_here_returns_when_nothing_is_armed_or_another_point_is():
    assert crash_here(POINT) is None
    crash_points.arm(["funding.before_ack"])
    assert crash_here(POINT) is None


# The child passes one point that is not armed, then dies at the armed one: no `finally`, no atexit,
# no flush of buffered output — what a SIGKILL does at that instant.
CHILD = f"""
import atexit, sys
from esim_common.crash_points import arm, crash_here
atexit.register(lambda: print("atexit ran", flush=True))
arm([{POINT!r}])
crash_here("funding.before_ack")
print("passed an unarmed point", flush=True)
sys.stdout.write("buffered, never flushed")
try:
    crash_here({POINT!r})
    print("went past the armed point", flush=True)
finally:
    print("finally ran", flush=True)
"""


def test_an_armed_crash_point_ends_the_process_abruptly_with_status_137():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "CRASH_POINTS")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == CRASH_EXIT_STATUS == 137, done.stderr
    assert done.stdout == "passed an unarmed point\n"
    assert f"crash point {POINT}: exiting abruptly" in done.stderr
