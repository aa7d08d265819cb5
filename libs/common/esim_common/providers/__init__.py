"""Provider clients built from settings (one place that reads their keys and timeouts)."""

from __future__ import annotations

from esim_common.providers.stripe import StripeGateway
from esim_common.providers.topup_gateway import TopupGatewayClient
from esim_common.providers.zendit import ZenditClient
from esim_common.settings import Settings


def stripe_gateway(settings: Settings) -> StripeGateway:
    return StripeGateway(
        api_key=settings.stripe_api_key.get_secret_value(),
        api_base=settings.stripe_api_base,
        max_network_retries=settings.stripe_max_network_retries,
        timeout_seconds=settings.stripe_timeout_seconds,
    )


def zendit_client(settings: Settings) -> ZenditClient:
    return ZenditClient(
        base_url=settings.zendit_api_base,
        api_key=settings.zendit_api_key.get_secret_value(),
        timeout=settings.zendit_timeout_seconds,
    )


def topup_gateway(settings: Settings) -> TopupGatewayClient:
    return TopupGatewayClient(
        url=settings.zendit_topup_url,
        api_key=settings.zendit_topup_api_key.get_secret_value(),
    )
