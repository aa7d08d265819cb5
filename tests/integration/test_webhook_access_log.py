"""The Stripe webhook route's access-log filter is installed by the app's own lifespan, and removed by it."""

from __future__ import annotations

import logging

import pytest

from webhook.main import create_app
from webhook.stripe_webhooks import ACCESS_LOGGER, SkipDeliveryAccessLines

pytestmark = [pytest.mark.broker, pytest.mark.db]


def installed() -> bool:
    return any(isinstance(f, SkipDeliveryAccessLines) for f in logging.getLogger(ACCESS_LOGGER).filters)


async def test_the_filter_is_active_exactly_while_the_app_runs(service_settings):
    app = create_app(service_settings)
    assert not installed()
    async with app.router.lifespan_context(app):
        assert installed()
    assert not installed()
