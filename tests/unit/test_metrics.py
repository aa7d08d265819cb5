"""Provider calls are counted by outcome and timed; the shared metrics survive a second import."""

from __future__ import annotations

import importlib
import math
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY

from esim_common import metrics
from esim_common.errors import PermanentError, TransientError
from esim_common.metrics import (
    legacy_gauge_values,
    metrics_asgi_app,
    observe_provider_call,
    set_legacy_gauges,
)


class ZenditTimeout(TransientError):
    pass


class CardDeclined(PermanentError):
    pass


class BrokenPipe(ConnectionError):
    pass


def calls(endpoint: str, outcome: str) -> float:
    labels = {"provider": "zendit", "endpoint": endpoint, "outcome": outcome}
    return REGISTRY.get_sample_value("esim_provider_calls_total", labels) or 0.0


def timed(endpoint: str) -> float:
    labels = {"provider": "zendit", "endpoint": endpoint}
    return REGISTRY.get_sample_value("esim_provider_call_seconds_count", labels) or 0.0


@pytest.fixture
def endpoint() -> str:
    """A fresh endpoint label per test, so counts start at zero whatever ran before."""
    return f"/test/{uuid.uuid4().hex[:8]}"


def test_a_successful_call_counts_as_ok_and_is_timed(endpoint: str) -> None:
    with observe_provider_call("zendit", endpoint):
        pass

    assert calls(endpoint, "ok") == 1
    assert calls(endpoint, "transient_error") == 0
    assert timed(endpoint) == 1


def test_errors_are_counted_by_class_and_re_raised(endpoint: str) -> None:
    for error in (ZenditTimeout(), BrokenPipe(), TimeoutError(), CardDeclined(), KeyError("offer")):
        with pytest.raises(type(error)), observe_provider_call("zendit", endpoint):
            raise error

    assert calls(endpoint, "transient_error") == 3
    assert calls(endpoint, "permanent_error") == 2
    assert calls(endpoint, "ok") == 0
    assert timed(endpoint) == 5


def test_a_custom_classifier_decides_what_is_transient(endpoint: str) -> None:
    with pytest.raises(KeyError), observe_provider_call("zendit", endpoint, is_transient=lambda e: True):
        raise KeyError("rate limited")

    assert calls(endpoint, "transient_error") == 1


async def test_the_decorator_observes_each_call_of_an_async_function(endpoint: str) -> None:
    @observe_provider_call("zendit", endpoint)
    async def purchase(fail: bool) -> str:
        if fail:
            raise ZenditTimeout
        return "done"

    assert await purchase(False) == "done"
    assert await purchase(False) == "done"
    with pytest.raises(ZenditTimeout):
        await purchase(True)

    assert calls(endpoint, "ok") == 2
    assert calls(endpoint, "transient_error") == 1


def test_the_decorator_works_on_sync_functions(endpoint: str) -> None:
    @observe_provider_call("zendit", endpoint)
    def balance() -> int:
        return 42

    assert balance() == 42
    assert calls(endpoint, "ok") == 1


def test_cancellation_is_not_blamed_on_the_provider(endpoint: str) -> None:
    with pytest.raises(KeyboardInterrupt), observe_provider_call("zendit", endpoint):
        raise KeyboardInterrupt

    assert timed(endpoint) == 0


def test_importing_the_module_again_reuses_the_registered_metrics() -> None:
    before = metrics.provider_calls_total
    reloaded = importlib.reload(metrics)

    assert reloaded.provider_calls_total is before


def test_legacy_gauges_keep_the_seeds_names() -> None:
    values = legacy_gauge_values(
        delivered=9, failed=1, topup_failures=2, refunds_issued=1, total_issue_ms=9 * 1500.0
    )
    set_legacy_gauges(values)

    assert REGISTRY.get_sample_value("esim_success_rate") == 90.0
    assert REGISTRY.get_sample_value("zendit_topup_failures") == 2.0
    assert REGISTRY.get_sample_value("stripe_refunds_issued") == 1.0
    assert REGISTRY.get_sample_value("average_time_to_issue_esim_ms") == 1500.0


def test_legacy_ratios_are_undefined_before_any_order_finishes() -> None:
    values = legacy_gauge_values(delivered=0, failed=0, topup_failures=0, refunds_issued=0, total_issue_ms=0)

    assert math.isnan(values["esim_success_rate"])
    assert math.isnan(values["average_time_to_issue_esim_ms"])


async def test_the_asgi_app_serves_the_shared_metrics(endpoint: str) -> None:
    with observe_provider_call("zendit", endpoint):
        pass
    transport = httpx.ASGITransport(app=metrics_asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as client:
        response = await client.get("/")

    assert response.status_code == 200
    assert (
        f'provider_calls_total{{endpoint="{endpoint}",outcome="ok",provider="zendit"}} 1.0' in response.text
    )
