"""Event contracts and settings: what every service relies on without I/O."""

import json
import re
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from esim_common.events import ALL_EVENTS, OrderFailed, OrderPaid
from esim_common.money import Money
from esim_common.settings import FundingMode, Settings, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_event_has_its_own_routing_key_under_order_zendit_or_operator():
    keys = [event.routing_key for event in ALL_EVENTS]
    assert len(set(keys)) == len(keys)
    assert all(key.split(".")[0] in {"order", "zendit", "operator"} for key in keys)


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


def _readme_default(value: object) -> str:
    """How the README's configuration table writes a default."""
    if value is None or value == []:
        return "(unset)"
    if isinstance(value, list):
        return "`" + ",".join(getattr(item, "get_secret_value", lambda i=item: i)() for item in value) + "`"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def test_every_setting_is_documented_in_the_readme_with_its_default():
    readme = README.read_text()
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", readme, flags=re.MULTILINE))
    defaults = Settings.model_construct()  # field defaults, no environment or .env
    expected = {name.upper(): _readme_default(getattr(defaults, name)) for name in Settings.model_fields}
    assert set(expected) - set(rows) == set(), "add these to the README's configuration table"
    assert set(rows) - set(expected) == set(), "the README documents settings that do not exist"
    wrong = {
        name: (rows[name].strip(), default)
        for name, default in expected.items()
        if rows[name].strip() != default
    }
    assert wrong == {}, "README default differs from the code: (README, code)"


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


def test_production_refuses_the_storage_emulators_service_role_key():
    from esim_sandbox.storage_emulator.app import DEFAULT_SERVICE_ROLE_KEY

    with pytest.raises(ValidationError) as info:
        load_settings(
            environment="production",
            supabase_url="https://project.supabase.co",
            supabase_service_role_key=DEFAULT_SERVICE_ROLE_KEY,
        )
    assert "supabase_service_role_key" in str(info.value)
    assert DEFAULT_SERVICE_ROLE_KEY not in str(info.value)


@pytest.mark.parametrize("amount", [1299.0, "1299", True, 0, -5])
def test_event_money_must_be_a_positive_whole_number_of_minor_units(amount):
    payload = {
        "transaction_id": "txn_1",
        "offer_id": "ESIM-US-7D-1GB",
        "price": {"amount": amount, "currency": "USD"},
        "payment_intent_id": "pi_1",
    }
    with pytest.raises(ValidationError, match="amount"):
        OrderPaid.model_validate(payload)
    with pytest.raises(ValidationError, match="amount"):
        OrderPaid.model_validate_json(json.dumps(payload))


def test_database_and_broker_passwords_are_secrets_and_stay_out_of_repr(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://esim:db-pass-123456@db:5432/esim")
    monkeypatch.setenv("AMQP_URL", "amqp://esim:mq-pass-123456@mq:5672/")
    settings = load_settings()
    assert {"db-pass-123456", "mq-pass-123456"} <= set(settings.secret_values().values())
    assert "pass-123456" not in repr(settings)


# Real-looking values for every secret the sandbox check refuses, so only the secret under test is weak.
PRODUCTION_SECRETS = {
    "environment": "production",
    "stripe_api_key": "sk_live_realkey123456",
    "zendit_api_key": "zendit-live-key-0123456789",
    "zendit_topup_api_key": "topup-live-key-0123456789",
    "admin_api_token": "admin-token-0123456789abcdef",
    "stripe_webhook_secrets": "whsec_live_0123456789abcdef",
    "zendit_webhook_secret": "zendit-hook-0123456789abcdef",
}


def test_production_starts_with_long_enough_webhook_secrets():
    settings = load_settings(**PRODUCTION_SECRETS, stripe_issuing_webhook_secrets="whsec_issuing_0123456789")
    assert settings.zendit_webhook_secret.get_secret_value() == "zendit-hook-0123456789abcdef"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"zendit_webhook_secret": ""}, "zendit_webhook_secret"),
        ({"zendit_webhook_secret": "fifteen-chars!!"}, "zendit_webhook_secret"),
        ({"stripe_webhook_secrets": "whsec_live_0123456789abcdef,whsec_short"}, "stripe_webhook_secrets[1]"),
        ({"stripe_webhook_secrets": ""}, "stripe_webhook_secrets"),
        ({"stripe_issuing_webhook_secrets": "whsec_tiny"}, "stripe_issuing_webhook_secrets[0]"),
    ],
    ids=["zendit-empty", "zendit-15-chars", "stripe-short", "stripe-none", "issuing-short"],
)
def test_production_refuses_empty_or_short_webhook_secrets_naming_them_only(override, named):
    with pytest.raises(ValidationError) as info:
        load_settings(**(PRODUCTION_SECRETS | override))
    message = str(info.value)
    assert named in message and "shorter than 16 characters" in message
    for value in override.values():
        for secret in filter(None, value.split(",")):
            assert secret not in message


def test_the_sandbox_accepts_short_webhook_secrets():
    settings = load_settings(zendit_webhook_secret="short", stripe_webhook_secrets="whsec_x")
    assert settings.zendit_webhook_secret.get_secret_value() == "short"


def test_the_issuing_endpoint_falls_back_to_the_webhook_secrets_unless_it_has_its_own(monkeypatch):
    def issuing_secrets(settings: Settings) -> list[str]:
        return [secret.get_secret_value() for secret in settings.issuing_webhook_secrets]

    monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", "whsec_old,whsec_new")
    assert issuing_secrets(load_settings()) == ["whsec_old", "whsec_new"]
    monkeypatch.setenv("STRIPE_ISSUING_WEBHOOK_SECRETS", "")  # empty is unset
    assert issuing_secrets(load_settings()) == ["whsec_old", "whsec_new"]
    monkeypatch.setenv("STRIPE_ISSUING_WEBHOOK_SECRETS", "whsec_issuing_a, whsec_issuing_b")
    settings = load_settings()
    assert issuing_secrets(settings) == ["whsec_issuing_a", "whsec_issuing_b"]
    # Registered for log redaction like every other secret.
    assert {"whsec_issuing_a", "whsec_issuing_b"} <= set(settings.secret_values().values())
