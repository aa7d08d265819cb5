"""No card number, CVC or secret reaches a log line, however it gets there; every line is JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from esim_common.logging import (
    RedactingFilter,
    bind_transaction_id,
    configure_logging,
    redact,
    register_secret,
)

CANARY_PANS = ("4242424242424242", "4000 0566 5566 5556", "4000-0566-5566-5556")
CANARY_CVC = "987"
CANARY_SECRET = "zendit-canary-key-7f3a9c"
NOT_A_PAN = "1234567812345678"  # 16 digits that fail Luhn: an order number, say
TXN = "5f0c7c1e-9a8b-4c3d-8e2f-1a2b3c4d5e6f"


class Captured:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging(service="test", level="DEBUG", secrets=[CANARY_SECRET], stream=stream)
    yield Captured(stream)
    root.removeHandler(handler)
    root.setLevel(level)


def assert_no_canary(text: str) -> None:
    for pan in CANARY_PANS:
        assert pan not in text
        assert pan.replace(" ", "").replace("-", "") not in text
    assert CANARY_SECRET not in text
    for form in (f'"{CANARY_CVC}"', f"'{CANARY_CVC}'", f"={CANARY_CVC}", f": {CANARY_CVC}"):
        assert form not in text


def test_canaries_in_message_args_and_extra_never_reach_the_log(captured: Captured) -> None:
    log = logging.getLogger("esim.test")
    log.info(
        "charging card %s cvc=%s with key %s",
        CANARY_PANS[0],
        CANARY_CVC,
        CANARY_SECRET,
        extra={"card": {"number": CANARY_PANS[1], "cvc": CANARY_CVC}, "pan_int": int(CANARY_PANS[0])},
    )

    assert_no_canary(captured.text)
    [line] = captured.lines()
    assert line["msg"] == "charging card [REDACTED PAN] cvc=[REDACTED] with key [REDACTED]"
    assert line["card"] == {"number": "[REDACTED PAN]", "cvc": "[REDACTED]"}
    assert line["pan_int"] == "[REDACTED PAN]"


def test_an_exception_traceback_is_redacted(captured: Captured) -> None:
    log = logging.getLogger("esim.test")
    try:
        raise RuntimeError(
            f"issuing said: {{'number': '{CANARY_PANS[1]}', 'cvc': '{CANARY_CVC}'}} auth {CANARY_SECRET}"
        )
    except RuntimeError:
        log.exception("card creation failed")

    assert_no_canary(captured.text)
    [line] = captured.lines()
    assert "Traceback" in line["exc"]
    assert "RuntimeError: issuing said: {'number': '[REDACTED PAN]', 'cvc': '[REDACTED]'}" in line["exc"]


def test_a_number_that_fails_luhn_is_left_alone(captured: Captured) -> None:
    logging.getLogger("esim.test").info("order %s paid at %s", NOT_A_PAN, 1712345678)

    assert captured.lines()[0]["msg"] == f"order {NOT_A_PAN} paid at 1712345678"


def test_every_line_inside_bind_transaction_id_carries_it(captured: Captured) -> None:
    log = logging.getLogger("esim.test")
    log.info("before")
    with bind_transaction_id(TXN):
        log.info("one")
        logging.getLogger("esim.other").warning("two")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("three")
    log.info("after")

    lines = captured.lines()
    assert [line["transaction_id"] for line in lines] == [None, TXN, TXN, TXN, None]
    assert {line["service"] for line in lines} == {"test"}
    assert all(line["ts"].endswith("Z") and "T" in line["ts"] for line in lines)
    assert [line["level"] for line in lines] == ["INFO", "INFO", "WARNING", "ERROR", "INFO"]


def test_configuring_twice_keeps_one_handler(captured: Captured) -> None:
    stream = io.StringIO()
    handler = configure_logging(service="again", stream=stream)
    try:
        logging.getLogger("esim.test").warning("once")
        assert captured.text == ""
        assert len(stream.getvalue().splitlines()) == 1
    finally:
        logging.getLogger().removeHandler(handler)


def test_noisy_libraries_are_quiet_but_still_redacted(captured: Captured) -> None:
    logging.getLogger("aio_pika.robust_connection").info("reconnecting")
    logging.getLogger("httpx").warning("POST https://example/v1 Authorization: Bearer %s", CANARY_SECRET)

    [line] = captured.lines()
    assert line["msg"] == "POST https://example/v1 Authorization: Bearer [REDACTED]"


def test_a_secret_registered_after_configuration_is_redacted(captured: Captured) -> None:
    late = "late-loaded-webhook-secret-91b2"
    register_secret(late)
    logging.getLogger("esim.test").info("settings loaded: %s", late)

    assert late not in captured.text


def test_redacting_filter_protects_a_handler_with_its_own_formatter() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("uvicorn.test-redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError(f"card {CANARY_PANS[0]}")
        except ValueError:
            log.exception("request failed for %s", CANARY_PANS[2])
    finally:
        log.removeHandler(handler)

    assert_no_canary(stream.getvalue())
    assert "ValueError: card [REDACTED PAN]" in stream.getvalue()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"cvc": "123", "cvc_check": "pass"}', '{"cvc": "[REDACTED]", "cvc_check": "pass"}'),
        ("{'cvv': '1234', 'exp_month': 12}", "{'cvv': '[REDACTED]', 'exp_month': 12}"),
        ("card[cvc]=123&card[exp_year]=2030", "card[cvc]=[REDACTED]&card[exp_year]=2030"),
        ("CVC2: 123, security_code=4567", "CVC2: [REDACTED], security_code=[REDACTED]"),
        ("card revealed cvc 047, CVV2 1234", "card revealed cvc [REDACTED], CVV2 [REDACTED]"),
        ("the cvc 12345 check and cvc check", "the cvc 12345 check and cvc check"),  # not a CVC's shape
        ("key sk_live_51Hxyzabc123 and rk_test_51Habcdef", "key [REDACTED] and [REDACTED]"),
        ("signing secret whsec_0a1b2c3d4e5f", "signing secret [REDACTED]"),
        ("Authorization: Bearer eyJhbGciOi.x-y_z==", "Authorization: Bearer [REDACTED]"),
        ("amqp://esim:s3cretpass@127.0.0.1:5672/", "amqp://esim:[REDACTED]@127.0.0.1:5672/"),
        ("pan 4242424242424242 12/34", "pan [REDACTED PAN] 12/34"),
        ("4000 0566 5566 5556 12 34", "[REDACTED PAN] 12 34"),
        (f"transaction {TXN}", f"transaction {TXN}"),
        (f"order {NOT_A_PAN}, at 2025-01-01 12:00", f"order {NOT_A_PAN}, at 2025-01-01 12:00"),
    ],
)
def test_redact_recognises_the_usual_shapes(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_removes_given_secrets_but_not_short_ones() -> None:
    assert redact("token abcdef123 user guest", secrets=["abcdef123", "guest"]) == (
        "token [REDACTED] user guest"
    )


def test_the_fast_path_redacts_exactly_what_every_rule_would():
    """`redact` skips its shape rules for text none of them could match; on thousands of generated
    strings built from the pieces those rules look for, it must give what running every rule gives."""
    import random

    from esim_common import logging as esim_logging

    fragments = [
        "4242", "4242424242424242", "4222222222222", "4222 222 222222", "4000 0566 5566 5556",
        "4000-0566-5566-5556", "1234567812345",
        " ", "-", "  ", "--", "cvc", "CVV2", "security code", "security_code", "=", ": ", "\"", "'", "047",
        "sk_test_", "rk_live_", "whsec_", "abcdef123", "Bearer ", "bearer", "postgres://u:pw@h/db",
        "://", "@", "order", TXN, "txn_", "0", "12", "x", ",", "{", "}", "[", "]",
    ]  # fmt: skip
    rng = random.Random(20261130)
    secrets = esim_logging._secrets_pattern(esim_logging.registered_secrets())
    took_fast_path = 0
    for _ in range(5000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 12)))
        expected = esim_logging._redact_shapes(secrets.sub("[REDACTED]", text) if secrets else text)
        assert redact(text) == expected, text
        took_fast_path += redact(text) == text and esim_logging._MAYBE_SENSITIVE.search(text) is None
    assert took_fast_path > 500  # the generator exercises both paths
