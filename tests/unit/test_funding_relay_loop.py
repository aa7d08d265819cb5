"""The announcement relay's loop outlives a failed round: it logs it and runs the next one."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from funding import relay as relay_module
from funding.relay import AnnouncementRelay


async def test_a_failed_round_is_logged_and_the_next_round_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(relay_module, "RELAY_INTERVAL_SECONDS", 0.0)
    relay = AnnouncementRelay(pool=lambda: None, publisher=None)  # run_once is replaced: neither is used
    rounds: list[int] = []
    second_round = asyncio.Event()

    async def run_once() -> int:
        rounds.append(len(rounds) + 1)
        if len(rounds) == 1:
            raise ConnectionError("database away")
        second_round.set()
        return 0

    monkeypatch.setattr(relay, "run_once", run_once)
    caplog.set_level(logging.ERROR, logger="esim.funding.relay")

    task = asyncio.create_task(relay.run_forever())
    try:
        await asyncio.wait_for(second_round.wait(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert rounds[:2] == [1, 2]
    [failed] = [r for r in caplog.records if r.name == "esim.funding.relay"]
    assert failed.levelname == "ERROR" and failed.__dict__["error"] == "ConnectionError: database away"
