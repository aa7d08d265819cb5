"""The webhook route logs each delivery itself; uvicorn's access line for it is dropped, and only it."""

from __future__ import annotations

import logging

import pytest

from webhook.stripe_webhooks import SkipDeliveryAccessLines


def access_record(method: str, path: str, status: int = 200) -> logging.LogRecord:
    """A record shaped like uvicorn's access log line (h11 and httptools implementations alike)."""
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:40000", method, path, "1.1", status),
        None,
    )


@pytest.mark.parametrize("path", ["/api/webhooks/stripe", "/api/webhooks/stripe?attempt=2"])
def test_the_access_line_of_a_stripe_delivery_is_dropped(path: str):
    assert SkipDeliveryAccessLines().filter(access_record("POST", path, 503)) is False


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/api/webhooks/stripe/issuing-authorization"),
        ("POST", "/api/webhooks/zendit"),
        ("POST", "/api/create-checkout-session"),
        ("GET", "/api/webhooks/stripe"),
        ("GET", "/healthz"),
    ],
)
def test_every_other_access_line_is_kept(method: str, path: str):
    assert SkipDeliveryAccessLines().filter(access_record(method, path)) is True


def test_a_record_that_is_not_an_access_line_is_kept():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "plain message", None, None)
    assert SkipDeliveryAccessLines().filter(record) is True
