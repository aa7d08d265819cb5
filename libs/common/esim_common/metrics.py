"""The shared Prometheus metrics, declared once, with bounded labels only.

Labels are drawn from small fixed sets (provider, endpoint template, queue, state, outcome), never ids
or emails: every distinct label value is a time series kept forever.

    esim_provider_calls_total{provider,endpoint,outcome}  outcome: ok | transient_error | permanent_error
    esim_provider_call_seconds{provider,endpoint}
    esim_messages_processed_total{queue,outcome}          outcome: ok | retried | deferred | dead_lettered |
                                                                   failed_permanently | rejected_to_dlq
    esim_message_handling_seconds{queue}
    esim_illegal_transitions_total{from_state,to_state}
    esim_order_transitions_total{to_state}
    esim_order_step_seconds{step}                         step: the state an order left (time spent in it)
    esim_refunds_total{step}                              refunds given, by the failed step that caused them

(The Python names drop the `esim_` prefix.)

plus the seed's dashboard gauges (`esim_success_rate`, …), which only the service that computes them
exposes: see `set_legacy_gauges`. Broker metrics come from FastStream's Prometheus middleware.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, cast, get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_asgi_app, start_http_server
from prometheus_client.registry import Collector

from esim_common.errors import TransientError
from esim_common.events import FailedStep
from esim_common.order_states import TERMINAL_STATES, OrderStatus

__all__ = [
    "LEGACY_GAUGES",
    "illegal_transitions_total",
    "is_transient_error",
    "legacy_gauge_values",
    "message_handling_seconds",
    "messages_processed_total",
    "metrics_asgi_app",
    "observe_provider_call",
    "order_step_seconds",
    "orders_transitions_total",
    "provider_call_seconds",
    "provider_calls_total",
    "refunds_total",
    "set_legacy_gauges",
    "start_metrics_server",
]

ProviderOutcome = Literal["ok", "transient_error", "permanent_error"]
MessageOutcome = Literal[
    "ok", "retried", "deferred", "dead_lettered", "failed_permanently", "rejected_to_dlq"
]

# Provider calls are HTTP round trips to Stripe/Zendit: tens of ms to the 10-30 s client timeouts.
PROVIDER_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A handler does a few DB writes and at most one provider call, so the same range fits.
HANDLING_BUCKETS = PROVIDER_BUCKETS
# Time an order spends in one state: sub-second hand-offs between services, a Zendit purchase's ~15 s,
# up to the hours an order may wait for funds or for Zendit (pending_payment: the customer at checkout).
STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

C = TypeVar("C", bound=Collector)


def _get_or_create(kind: type[C], name: str, documentation: str, labels: tuple[str, ...], **kw: Any) -> C:
    """Register a metric on the default registry, or return the one already there.

    Importing this module twice (a reload, or two import paths in a test run) would otherwise fail
    with "Duplicated timeseries in CollectorRegistry".
    """
    try:
        return kind(name, documentation, labels, **kw)  # type: ignore[call-arg]
    except ValueError:
        existing = REGISTRY._names_to_collectors.get(name)  # no public lookup by name exists
        if not isinstance(existing, kind):
            raise
        return existing


provider_calls_total = _get_or_create(
    Counter,
    "esim_provider_calls_total",
    "Calls to external providers by outcome.",
    ("provider", "endpoint", "outcome"),
)
provider_call_seconds = _get_or_create(
    Histogram,
    "esim_provider_call_seconds",
    "Duration of calls to external providers.",
    ("provider", "endpoint"),
    buckets=PROVIDER_BUCKETS,
)
messages_processed_total = _get_or_create(
    Counter,
    "esim_messages_processed_total",
    "Messages consumed, by how they were settled.",
    ("queue", "outcome"),
)
message_handling_seconds = _get_or_create(
    Histogram,
    "esim_message_handling_seconds",
    "Time from delivery to settling a message.",
    ("queue",),
    buckets=HANDLING_BUCKETS,
)
illegal_transitions_total = _get_or_create(
    Counter,
    "esim_illegal_transitions_total",
    "Order state changes refused by the state machine.",
    ("from_state", "to_state"),
)
orders_transitions_total = _get_or_create(
    Counter,
    "esim_order_transitions_total",
    "Orders entering each state.",
    ("to_state",),
)
order_step_seconds = _get_or_create(
    Histogram,
    "esim_order_step_seconds",
    "Seconds an order spent in a state (step), observed when it moves on.",
    ("step",),
    buckets=STEP_BUCKETS,
)
refunds_total = _get_or_create(
    Counter,
    "esim_refunds_total",
    "Orders refunded (or their uncaptured payment released) by the compensation, by the failed step.",
    ("step",),
)

# Every label value of the order series exists from start-up at 0. A series born at its first event,
# already at 1, hides that event from increase()/rate() (no earlier sample to compare with), so the first
# delivery after a restart would never reach the dashboard's ratios or the alert rules. Bounded sets.
for _state in OrderStatus:
    orders_transitions_total.labels(to_state=_state.value)
    if _state not in TERMINAL_STATES:
        order_step_seconds.labels(step=_state.value)
for _step in get_args(FailedStep):
    refunds_total.labels(step=_step)


# --------------------------------------------------------------------------- provider calls


def is_transient_error(exc: BaseException) -> bool:
    """Default classifier: our `TransientError` tree (every provider client maps into it).

    Built-in timeouts and connection errors count as transient too, for calls observed before the
    client has mapped them into its own exception tree.
    """
    return isinstance(exc, TransientError | TimeoutError | ConnectionError)


P = ParamSpec("P")
R = TypeVar("R")


# Lower-case because it reads as a function at the call site (like contextlib.suppress).
class observe_provider_call:
    """Count and time one provider call: `with observe_provider_call("zendit", "/topups"): ...`.

    Also a decorator for sync and async functions (each call is observed separately). `endpoint`
    must be a template (`/esim/purchases/{id}`), not a URL with ids in it. An exception's outcome
    is `transient_error` when `is_transient(exc)` says so, else `permanent_error`; it is re-raised.
    Cancellation (a BaseException that is not an Exception) is not the provider's doing and is not
    counted.
    """

    def __init__(
        self,
        provider: str,
        endpoint: str,
        *,
        is_transient: Callable[[BaseException], bool] = is_transient_error,
    ) -> None:
        self.provider = provider
        self.endpoint = endpoint
        self.is_transient = is_transient
        self._started = 0.0

    def __enter__(self) -> observe_provider_call:
        self._started = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        outcome: ProviderOutcome
        if exc is None:
            outcome = "ok"
        elif not isinstance(exc, Exception):
            return
        else:
            outcome = "transient_error" if self.is_transient(exc) else "permanent_error"
        provider_calls_total.labels(provider=self.provider, endpoint=self.endpoint, outcome=outcome).inc()
        provider_call_seconds.labels(provider=self.provider, endpoint=self.endpoint).observe(
            time.perf_counter() - self._started
        )

    def _fresh(self) -> observe_provider_call:
        return observe_provider_call(self.provider, self.endpoint, is_transient=self.is_transient)

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(func):
            async_func = cast(Callable[P, Awaitable[Any]], func)

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self._fresh():
                    return await async_func(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._fresh():
                return func(*args, **kwargs)

        return wrapper


# --------------------------------------------------------------------------- the seed's gauges

# Names the seed's dashboards already use; they are gauges (not counters) so the names stay exactly
# these, without the `_total` prometheus_client would append to a counter.
LEGACY_GAUGES: Mapping[str, str] = {
    "esim_success_rate": "Percentage of paid orders that ended with an eSIM delivered.",
    "zendit_topup_failures": "Zendit wallet top-ups that failed for good.",
    "stripe_refunds_issued": "Refunds issued because fulfilment failed.",
    "average_time_to_issue_esim_ms": "Mean time from payment to eSIM delivery, in milliseconds.",
}
_legacy_lock = threading.Lock()


def legacy_gauge_values(
    *, delivered: int, failed: int, topup_failures: int, refunds_issued: int, total_issue_ms: float
) -> dict[str, float]:
    """The seed's gauges from order counts. `total_issue_ms` is summed over the delivered orders.

    Undefined ratios (no finished order yet) are NaN rather than 0 or 100, so an alert such as
    `esim_success_rate < 95` neither fires nor falsely reassures before there is data.
    """
    finished = delivered + failed
    return {
        "esim_success_rate": 100.0 * delivered / finished if finished else float("nan"),
        "zendit_topup_failures": float(topup_failures),
        "stripe_refunds_issued": float(refunds_issued),
        "average_time_to_issue_esim_ms": total_issue_ms / delivered if delivered else float("nan"),
    }


def set_legacy_gauges(values: Mapping[str, float]) -> None:
    """Publish `legacy_gauge_values(...)`. The gauges are registered on first use, so only the
    service that computes them (reconcile) exposes them and dashboards see one series, not five."""
    with _legacy_lock:
        for name, value in values.items():
            if name not in LEGACY_GAUGES:
                raise ValueError(f"not a legacy gauge: {name}")
            _get_or_create(Gauge, name, LEGACY_GAUGES[name], ()).set(value)


# --------------------------------------------------------------------------- exposition


def metrics_asgi_app() -> Callable[..., Awaitable[None]]:
    """Mount at `/metrics` on a service's ASGI app."""
    return cast(Callable[..., Awaitable[None]], make_asgi_app(registry=REGISTRY))


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> None:
    """Serve `/metrics` from a background thread, for services without an HTTP app of their own.

    Loopback by default; pass `addr="0.0.0.0"` where Prometheus scrapes from another host.
    """
    start_http_server(port, addr=addr, registry=REGISTRY)
