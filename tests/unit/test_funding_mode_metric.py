"""esim_funding_mode{mode}: the funding mode in force, exported at start-up for the alert rules."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from esim_common.settings import Settings
from funding.main import create_app


def exported_modes() -> dict[str, float | None]:
    return {
        m: REGISTRY.get_sample_value("esim_funding_mode", {"mode": m}) for m in ("prefunded", "issuing_card")
    }


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ({"funding_mode": "prefunded"}, {"prefunded": 1.0, "issuing_card": 0.0}),
        ({"funding_mode": "issuing_card"}, {"prefunded": 0.0, "issuing_card": 1.0}),
        # STRIPE_ISSUING_AVAILABLE=false forces prefunded: the series says what the service runs.
        (
            {"funding_mode": "issuing_card", "stripe_issuing_available": False},
            {"prefunded": 1.0, "issuing_card": 0.0},
        ),
    ],
)
def test_the_mode_in_force_is_1_and_the_other_0(
    configured: dict[str, object], expected: dict[str, float]
) -> None:
    create_app(Settings(**configured))  # builds the service; nothing connects until it starts

    assert exported_modes() == expected
