"""Event contracts and settings: what every service relies on without I/O."""

import re
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from esim_common.events import ALL_EVENTS, OrderFailed, OrderPaid
from esim_common.money import Money
from esim_common.settings import FundingMode, Settings, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_event_has_its_own_routing_key_under_order():
    keys = [event.routing_key for event in ALL_EVENTS]
    assert len(set(keys)) == len(keys)
    assert all(key.startswith("order.") for key in keys)


def test_an_event_round_trips_through_json_unchanged():
    event = OrderPaid(
        transaction_id="txn_1", offer_id="ESIM-US-7D-1GB", price=Money(1299, "USD"), payment_intent_id="pi_1"
    )
    assert OrderPaid.model_validate_json(event.model_dump_json()) == event
    assert isinstance(event.event_id, uuid.UUID) and event.schema_version == 1


def test_events_refuse_unknown_fields_so_card_data_cannot_ride_along():
    with pytest.raises(ValidationError):
        OrderFailed(transaction_id="txn_1", step="funding", reason="declined", card_number="4242424242424242")


def test_events_are_immutable():
    event = OrderFailed(transaction_id="txn_1", step="funding", reason="declined")
    with pytest.raises(ValidationError):
        event.reason = "other"


def test_a_newer_schema_version_is_refused_rather_than_misread():
    payload = OrderFailed(transaction_id="txn_1", step="funding", reason="x").model_dump(mode="json")
    payload["schema_version"] = 2
    with pytest.raises(ValidationError):
        OrderFailed.model_validate(payload)


def test_every_setting_is_documented_in_the_readme_with_its_default():
    readme = README.read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    expected = {name.upper() for name in Settings.model_fields}
    assert expected - documented == set(), "add these to the README's configuration table"
    assert documented - expected == set(), "the README documents settings that do not exist"


def test_webhook_secrets_accept_a_comma_separated_list_for_rotation(monkeypatch):
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", "whsec_old, whsec_new")
    settings = load_settings()
    assert [s.get_secret_value() for s in settings.stripe_webhook_secrets] == ["whsec_old", "whsec_new"]


def test_seed_flag_issuing_unavailable_forces_prefunded_mode(monkeypatch):
    monkeypatch.setenv("STRIPE_ISSUING_AVAILABLE", "false")
    assert load_settings().effective_funding_mode is FundingMode.PREFUNDED


def test_production_refuses_to_start_with_sandbox_secrets_and_does_not_echo_them():
    with pytest.raises(ValidationError) as info:
        load_settings(environment="production", stripe_api_key="sk_live_realkey123456")
    message = str(info.value)
    assert "zendit_api_key" in message and "admin_api_token" in message
    assert "stripe_api_key" not in message
    assert "sk_live_realkey123456" not in message
