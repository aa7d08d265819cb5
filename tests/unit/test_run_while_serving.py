"""Background loops run between a service's start-up and shutdown; one that ends is never silent."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI

from esim_common.service import run_while_serving


async def test_a_loop_runs_while_serving_and_is_cancelled_at_shutdown(caplog):
    ran, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        ran.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    app = FastAPI()
    run_while_serving(app, forever)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(ran.wait(), 2)
        assert not cancelled.is_set()
    assert cancelled.is_set()
    assert not [r for r in caplog.records if r.getMessage() == "background loop ended"]


async def test_a_loop_that_ends_while_serving_is_logged_as_an_error(caplog):
    caplog.set_level(logging.ERROR, logger="esim.service")

    async def broken_sweep() -> None:
        raise RuntimeError("the sweep's query is wrong")

    app = FastAPI()
    run_while_serving(app, broken_sweep)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.05)
    [ended] = [r for r in caplog.records if r.getMessage() == "background loop ended"]
    assert "broken_sweep" in ended.loop and "the sweep's query is wrong" in ended.error
