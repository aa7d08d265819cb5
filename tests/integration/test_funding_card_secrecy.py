"""A canary PAN/CVC never appears in logs, messages, exceptions or the database (scorecard R12, card half).

The Stripe emulator is told to issue the next card with a canary number and CVC
(`POST /_sandbox/issuing/next_card`); a short wallet makes the funding service create that card, reveal
it and hand it to the top-up gateway, once for each way a top-up can go. Everything the service leaves
behind is captured and searched for the canary:

- every log record of every logger, raw (caplog at DEBUG: the message, its arguments, every `extra=`
  field, the traceback formatted from the exception itself), and the JSON log lines the service writes;
- every message the service publishes (a tap on its broker's `publish`: events, retry-tier and DLQ
  copies with their headers), everything routed by the test's exchange (a catch-all `#` queue), and
  what is left in every queue of the test's topology (work, retry tiers, DLQs), headers included;
- the text of every exception the consumer settles a message with, with its causes and contexts
  (taken before the consumer redacts it for a header or a log field);
- a dump of every table in the test database, each row cast to text.

The PAN leaks when any 12-digit run of it shows up (digit groups joined first: "4000 1234 ..." counts),
the CVC when it stands as a token of its own: quoted, bare, or after the word cvc/cvv/security code.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import pytest

import esim_common.consumer
from esim_common.logging import JsonFormatter
from esim_common.providers.stripe import BillingAddress
from esim_common.settings import Settings
from esim_common.topology import LAST_ERROR_HEADER
from esim_sandbox.stripe_emulator.ids import luhn_check_digit
from tests.fixtures.funding import (
    Funding,
    S,
    approved_charges,
    cards_for,
    pay_for_order,
    rows,
    running,
    set_wallet,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

SHORT_WALLET = 1_000  # the seed offer costs 24.15: one top-up with the canary card
PAN_FRAGMENT_DIGITS = 12  # a run this long of the PAN is a leak (it is more than a last4 or a BIN)


# ------------------------------------------------------------------------------------ the canary


@dataclass(frozen=True)
class Canary:
    number: str = field(repr=False)
    cvc: str = field(repr=False)

    @classmethod
    def new(cls) -> Canary:
        # A fresh Luhn-valid Visa-shaped number per test (the emulator refuses a number issued before);
        # a CVC with a leading zero, which no status code, amount or line number looks like.
        partial = "4000" + "".join(secrets.choice("0123456789") for _ in range(11))
        return cls(number=partial + luhn_check_digit(partial), cvc="0" + f"{secrets.randbelow(90) + 10}")

    def leaks(self, text: str) -> list[str]:
        """What of the canary `text` gives away: [], ["PAN"], ["CVC"] or both."""
        found = []
        joined = _BETWEEN_DIGITS.sub("", text)
        n = PAN_FRAGMENT_DIGITS
        if any(self.number[i : i + n] in joined for i in range(len(self.number) - n + 1)):
            found.append("PAN")
        cvc = re.escape(self.cvc)
        if (
            re.search(rf"(?i)(?<![a-z0-9])(?:cvc2?|cvv2?|security[_ ]?code)[^0-9\n]{{0,12}}{cvc}(?!\d)", text)
            or re.search(rf"[\"']{cvc}[\"']", text)
            or re.search(rf"(?<![\w.:/+-]){cvc}(?![\w:/+-]|\.\d)", text)
        ):
            found.append("CVC")
        return found


_BETWEEN_DIGITS = re.compile(r"(?<=\d)[ .\-_/]+(?=\d)")


def arm(stripe_emulator, canary: Canary) -> None:
    body = {"number": canary.number, "cvc": canary.cvc}
    response = httpx.post(f"{stripe_emulator.url}/_sandbox/issuing/next_card", json=body)
    response.raise_for_status()
    assert response.json() == {"armed": True, "last4": canary.number[-4:]}
    assert canary.leaks(response.text) == []  # the answer names the last4 only


def disarm(stripe_emulator) -> None:
    httpx.delete(f"{stripe_emulator.url}/_sandbox/issuing/next_card").raise_for_status()


async def test_the_next_card_control_arms_one_card_and_refuses_numbers_it_cannot_issue(
    stripe_emulator, stripe_gateway
):
    url = f"{stripe_emulator.url}/_sandbox/issuing/next_card"
    canary = Canary.new()
    not_luhn = canary.number[:-1] + str((int(canary.number[-1]) + 1) % 10)
    for refused in ({"number": not_luhn, "cvc": canary.cvc}, {"number": canary.number, "cvc": "12"}):
        response = httpx.post(url, json=refused)
        assert response.status_code == 400 and canary.leaks(response.text) == []
    holder = await stripe_gateway.ensure_cardholder(
        name="Canary Test",
        email="canary@example.com",
        billing_address=BillingAddress(line1="1 Main St", city="Austin", postal_code="78701", country="US"),
    )

    async def new_card(topup_id: str) -> str:
        card = await stripe_gateway.create_single_use_card(
            topup_id=topup_id, cardholder_id=holder.id, amount=500, currency="USD"
        )
        return card.id

    arm(stripe_emulator, canary)
    armed, after = await new_card("tu_canary-1"), await new_card("tu_canary-2")
    cards = stripe_emulator.state.card_secrets
    assert (cards[armed].number, cards[armed].cvc) == (canary.number, canary.cvc)
    assert cards[after].number != canary.number  # once only
    response = httpx.post(url, json={"number": canary.number, "cvc": canary.cvc})
    assert response.status_code == 400 and canary.leaks(response.text) == []  # issued already

    other = Canary.new()
    arm(stripe_emulator, other)
    disarm(stripe_emulator)
    assert cards[await new_card("tu_canary-3")].number != other.number


# ------------------------------------------------------------------------------------ capture


@dataclass
class Capture:
    """Everything the service said, sent, raised and stored, as (where, text) pairs."""

    caplog: pytest.LogCaptureFixture
    json_lines: io.StringIO = field(default_factory=io.StringIO)
    published: list[str] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    tables: dict[str, list[str]] = field(default_factory=dict)

    def texts(self) -> Iterator[tuple[str, str]]:
        for record in self.caplog.records:
            yield f"log record {record.name}", _record_text(record)
        yield "JSON log output", self.json_lines.getvalue()
        for text in self.published:
            yield "published message", text
        for text in self.queued:
            yield "queued message", text
        for text in self.raised:
            yield "exception", text
        for table, dumped in self.tables.items():
            for row in dumped:
                yield f"table {table}", row

    def leaks(self, canary: Canary) -> list[str]:
        """Where the canary showed up, once per place (`what in where`)."""
        found = [f"{what} in {where}" for where, text in self.texts() for what in canary.leaks(text)]
        return list(dict.fromkeys(found))


def _record_text(record: logging.LogRecord) -> str:
    """The record as it was logged, before any formatter or filter redacted it."""
    parts = [repr({k: v for k, v in record.__dict__.items() if k not in ("exc_info", "exc_text")})]
    try:
        parts.append(record.getMessage())
    except Exception as exc:  # a bad format string is a bug of its own, but not this test's
        parts.append(f"<unformattable: {exc}>")
    if record.exc_info and record.exc_info[1] is not None:
        parts.extend(_exception_texts(record.exc_info[1]))
    return "\n".join(parts)


def _exception_texts(exc: BaseException) -> list[str]:
    """The traceback as Python prints it, plus every cause and context, suppressed ones included."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current} {current.args!r}")
        current = current.__cause__ or current.__context__
    return texts


def _message_text(body: bytes, headers: Any, **properties: Any) -> str:
    return f"{body.decode(errors='replace')}\nheaders={headers!r}\nproperties={properties!r}"


@contextmanager
def json_log_output(buffer: io.StringIO) -> Iterator[None]:
    """Point the service's JSON log handler (installed by `configure_logging`) at `buffer`."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert handlers, "the service installed no JSON log handler"
    previous = [h.setStream(buffer) for h in handlers]  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, previous, strict=True):
            handler.setStream(stream)  # type: ignore[attr-defined]


def tap_publishes(funding: Funding, monkeypatch: pytest.MonkeyPatch, into: list[str]) -> None:
    """Record every publish of the service's broker (events, retry and DLQ copies) as it is sent."""
    broker = funding.ctx.broker
    publish = broker.publish

    async def tapped(body: Any = None, *args: Any, **kwargs: Any) -> Any:
        raw = body if isinstance(body, bytes) else str(body).encode()
        properties = {k: v for k, v in kwargs.items() if k != "headers"}
        into.append(_message_text(raw, kwargs.get("headers"), args=args, **properties))
        return await publish(body, *args, **kwargs)

    monkeypatch.setattr(broker, "publish", tapped)


def tap_exceptions(monkeypatch: pytest.MonkeyPatch, into: list[str]) -> None:
    """Every exception a consumer settles a message with goes through `error_summary`: keep it raw."""
    summary = esim_common.consumer.error_summary

    def tapped(exc: BaseException) -> str:
        into.extend(_exception_texts(exc))
        return summary(exc)

    monkeypatch.setattr(esim_common.consumer, "error_summary", tapped)


@asynccontextmanager
async def catch_all_queue(funding: Funding) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A queue bound with `#` to the test's exchange: a copy of every event routed through it."""
    connection = await aio_pika.connect(funding.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{funding.settings.topology_prefix}canary-tap", exclusive=True)
        await queue.bind(funding.ctx.topology.exchange, routing_key="#")
        yield queue


async def drain(queue: aio_pika.abc.AbstractQueue) -> list[str]:
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(
            _message_text(
                message.body,
                message.headers,
                routing_key=message.routing_key,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
            )
        )
    return taken


async def drain_topology(funding: Funding) -> list[str]:
    """Whatever is left in every work queue, retry tier and DLQ of the test's topology."""
    topology = funding.ctx.topology
    connection = await aio_pika.connect(funding.amqp_url)
    taken: list[str] = []
    async with connection:
        channel = await connection.channel()
        for queue in topology.queues:
            names = [queue.name, queue.dlq, *(queue.retry_tier(d) for d in topology.retry_delays)]
            for name in names:
                taken.extend(await drain(await channel.get_queue(name, ensure=False)))
    return taken


async def dump_database(funding: Funding) -> dict[str, list[str]]:
    tables = await funding.pool.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
    )
    dump = {}
    for table in tables:
        name = table["table_name"]
        dump[name] = [
            r["row"] for r in await funding.pool.fetch(f'SELECT t::text AS row FROM public."{name}" t')
        ]
    return dump


# ------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    settings: dict[str, Any] = field(default_factory=dict)
    gateway_fault: dict[str, Any] | None = None
    ends: S = S.FUNDED
    settled: str = "ok"  # the consumer outcome of the delivery that finished the order
    handovers: int = 1  # times the revealed card went to the gateway (`wallet_topups.attempts`)
    authorizations: int = 1  # times the gateway charged it through the card network
    approved: int = 1
    within: float = 30.0


SCENARIOS = {
    "topped_up": Scenario(),
    # The gateway charged the card, then its answer was lost: retried with the same reference.
    "gateway_503_then_ok": Scenario(gateway_fault={"status": 503, "when": "after"}, handovers=2),
    # The gateway never answers: retry tiers (1 s + 3 s + 10 s), then the DLQ and a refund.
    "gateway_503_until_dlq": Scenario(
        gateway_fault={"status": 503, "when": "before", "count": 10},
        ends=S.REFUNDED,
        settled="dead_lettered",
        handovers=4,
        authorizations=0,
        approved=0,
        within=45.0,
    ),
    # Stripe declines the charge (the merchant is outside the card's allow-list): refunded.
    "declined": Scenario(
        settings={"stripe_issuing_allowed_merchant_countries": ["GB"]},
        ends=S.REFUNDED,
        settled="failed_permanently",
        approved=0,
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
async def test_a_canary_card_leaves_no_trace_in_logs_messages_exceptions_or_the_database(
    scenario: Scenario,
    service_settings: Settings,
    amqp_url,
    stripe_gateway,
    stripe_emulator,
    zendit_emulator,
    caplog,
    monkeypatch,
):
    canary = Canary.new()
    # The scanner finds the canary in the shapes a careless line would give it.
    grouped = " ".join(canary.number[i : i + 4] for i in range(0, 16, 4))
    assert canary.leaks(f"card {grouped} exp 12/30") == ["PAN"]
    assert canary.leaks(json.dumps({"cvc": canary.cvc})) == ["CVC"]
    assert canary.leaks(f"CardDetails(number='{canary.number}', cvc='{canary.cvc}')") == ["PAN", "CVC"]

    caplog.set_level(logging.DEBUG)
    capture = Capture(caplog=caplog)
    settings = service_settings.model_copy(update={"log_level": "DEBUG", **scenario.settings})
    set_wallet(zendit_emulator, SHORT_WALLET)
    if scenario.gateway_fault is not None:
        zendit_emulator.control("POST", "faults", {"endpoint": "wallet_topup", **scenario.gateway_fault})
    arm(stripe_emulator, canary)
    try:
        async with (
            running(settings, amqp_url) as funding,
            catch_all_queue(funding) as routed,
        ):
            with json_log_output(capture.json_lines):
                tap_publishes(funding, monkeypatch, capture.published)
                tap_exceptions(monkeypatch, capture.raised)
                event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
                txn = event.transaction_id

                await funding.deliver(event)
                await funding.wait_status(txn, scenario.ends, within=scenario.within)
                await eventually(
                    lambda: funding.handled(scenario.settled) >= 1, within=10, what=scenario.settled
                )

                [topup] = await rows(funding.pool, "SELECT id, card_id, attempts FROM wallet_topups")
                capture.queued = await drain(routed) + await drain_topology(funding)
                capture.tables = await dump_database(funding)
    finally:
        disarm(stripe_emulator)

    # It was the canary card that the service revealed and handed over.
    [card] = cards_for(stripe_emulator, topup["id"])
    assert card["id"] == topup["card_id"]
    secret = stripe_emulator.state.card_secrets[card["id"]]
    assert (secret.number, secret.cvc) == (canary.number, canary.cvc)
    assert card["last4"] == canary.number[-4:]
    assert topup["attempts"] == scenario.handovers
    assert (
        len(stripe_emulator.state.find("issuing.authorization", card=card["id"])) == scenario.authorizations
    )
    assert len(approved_charges(stripe_emulator, card["id"])) == scenario.approved

    # The capture is not empty: it saw the service work on this order.
    messages = [r.getMessage() for r in caplog.records]
    assert "single-use card created" in messages
    assert any(txn in text for text in capture.published)
    assert any(txn in text for text in capture.queued)
    assert any(card["id"] in row for row in capture.tables["issuing_cards"])
    assert txn in capture.json_lines.getvalue()
    if scenario.gateway_fault is not None:  # a retry-tier copy, with the error in its headers
        assert any(LAST_ERROR_HEADER in text and ".retry." in text for text in capture.published)
    if scenario.settled == "dead_lettered":  # the DLQ copy, still in its queue, headers and all
        assert any(LAST_ERROR_HEADER in text for text in capture.queued)
    if scenario.settled != "ok":
        assert capture.raised, "no exception was captured on a failure path"

    leaks = capture.leaks(canary)
    assert not leaks, "the canary card leaked:\n" + "\n".join(leaks)
