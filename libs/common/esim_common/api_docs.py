"""The API documents under `docs/api/`: AsyncAPI per service (its messages) and OpenAPI per service (HTTP).

    python -m esim_common.api_docs            # write docs/api/{asyncapi,openapi}/<service>.json
    python -m esim_common.api_docs --check    # exit 1 and name the stale files (CI)

Each service's app is built by its own `create_app` from the settings' defaults (the environment and
`.env` are ignored, so the output is the same on every machine); nothing connects. The output is JSON
with sorted keys and no timestamps, so a test can regenerate it and compare with what is committed.

AsyncAPI, per service: what FastStream knows about the app (its subscribers: queue, handler title and
docstring) plus what it cannot know. Our consumers take the raw message (they route poison to the DLQ
themselves), so each queue's payload is the event of the routing key the topology binds it to; and
services publish through `EventPublisher` or the outbox, not through FastStream publisher objects, so
`PUBLISHES` lists what each one sends (`tests/unit/test_api_docs_fresh.py` checks it against the
events each service builds). Both are rebuilt here on a documentation-only broker that never starts.

This is the one module in `esim_common` that looks at the services: it imports them by name, for
documentation only; nothing at run time imports it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Callable, Coroutine, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.schemas import ExchangeType
from faststream.rabbit.subscriber import RabbitSubscriber
from faststream.specification import AsyncAPI
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from esim_common.events import (
    ALL_EVENTS,
    Event,
    OperatorAlert,
    OrderDelivered,
    OrderFailed,
    OrderFunded,
    OrderPaid,
    OrderProvisioned,
    OrderRefunded,
    PurchaseUpdateHint,
)
from esim_common.publisher import EVENT_TYPE_HEADER, SCHEMA_VERSION_HEADER
from esim_common.settings import Settings
from esim_common.topology import ATTEMPT_HEADER, LAST_ERROR_HEADER, Topology

SERVICES: tuple[str, ...] = ("webhook", "funding", "provisioning", "notify", "reconcile")
DEFAULT_OUT = Path("docs/api")
COMMAND = "python -m esim_common.api_docs"

# What each service publishes to the topic exchange (`EventPublisher.publish`, directly or via the
# outbox). OrderRefunded/OrderFailed come with `compensation.fail_and_refund` wherever it is used.
PUBLISHES: Mapping[str, tuple[type[Event], ...]] = {
    "webhook": (OrderPaid, PurchaseUpdateHint),
    "funding": (OrderFunded, OperatorAlert, OrderFailed, OrderRefunded),
    "provisioning": (OrderProvisioned, OrderPaid, OperatorAlert, OrderFailed, OrderRefunded),
    "notify": (OrderDelivered, OrderFailed),
    "reconcile": (OrderPaid, OrderFunded, OrderProvisioned, OrderFailed, OrderRefunded),
}

# The server as docker-compose.yml names it (a real deployment sets AMQP_URL).
DOCUMENTED_AMQP_URL = "amqp://rabbitmq:5672/"

ASYNCAPI_DESCRIPTION = """\
Events travel on the durable topic exchange `esim.events`, by routing key. Every message is persistent
JSON with `message_id` = the event's `event_id` and `correlation_id` = its `transaction_id`; publishes
are mandatory and confirmed. Each consumer queue is a quorum queue bound to one routing key. A transient
failure copies the message to `<queue>.retry.1s|3s|10s` (back to the queue when its TTL expires, with
`x-esim-attempt` counted up); a permanent one runs the compensation; after the last retry, a poison
message or a bug, it goes to `<queue>.dlq` through the direct exchange `esim.dead-letters` (which also
hands reconcile a copy for its history); the reconcile admin API can peek, replay or discard it there.
"""

# A queue that observes dead letters is bound on the dead-letter exchange under every other queue's
# DLQ name (`Topology.dead_letter_bindings`); one channel stands for all of them.
DEAD_LETTER_KEY = "<queue>.dlq"
DEAD_LETTER_OBSERVER = (
    "Bound to the dead-letter exchange under the name of every other queue's DLQ: a copy of each dead "
    "letter, body as it failed (an event, or the poison that could not be read), with the "
    "`x-esim-origin-queue`, `x-esim-last-error` and `x-esim-failed-at` headers, and the dead-letter "
    "stamp that the observer's own retries (counted in `x-esim-observer-attempt`) and a replay leave "
    "alone: `x-esim-dead-letter-queue`, `x-esim-dead-letter-error`, `x-esim-dead-lettered-at`, "
    "`x-esim-dead-letter-attempt`."
)

# Our AMQP headers (esim_common.publisher, esim_common.consumer); the viewer shows them per message.
MESSAGE_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        SCHEMA_VERSION_HEADER: {"type": "integer", "description": "The event's schema_version."},
        EVENT_TYPE_HEADER: {"type": "string", "description": "The event's class name, e.g. OrderPaid."},
        ATTEMPT_HEADER: {
            "type": "integer",
            "description": "Set on copies sent through a retry tier: 2 for the first retry.",
        },
        LAST_ERROR_HEADER: {
            "type": "string",
            "description": "On retry and DLQ copies: the last error, short and redacted.",
        },
    },
}


class _DefaultSettings(Settings):
    """The settings' defaults only: documents must not depend on who generates them, or where."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *_: Any, **__: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def build_app(service: str) -> FastAPI:
    create_app: Callable[[Settings], FastAPI] = importlib.import_module(f"{service}.main").create_app
    return create_app(_DefaultSettings())


def _event_handler(event: type[Event]) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """A typed stand-in for the real handler, so that FastStream documents the event as the payload."""

    async def handler(body: Any) -> None:
        """Documentation only."""

    # Set, not written in the signature: this module's annotations are strings (PEP 563), which would
    # be resolved later, in the wrong scope.
    handler.__annotations__ = {"body": event, "return": None}
    handler.__name__ = event.__name__
    return handler


async def _dead_letter_handler(body: dict[str, Any]) -> None:
    """Documentation only: a dead letter's body is whatever failed, an event or not (poison)."""


def _text(doc: str | None) -> str | None:
    return inspect.cleandoc(doc) if doc else None


def asyncapi_document(service: str, app: FastAPI) -> dict[str, Any]:
    ctx = app.state.ctx
    topology: Topology = ctx.topology
    by_routing_key = {event.routing_key: event for event in ALL_EVENTS}
    exchange = RabbitExchange(topology.exchange, type=ExchangeType.TOPIC, durable=True)
    dead_letters = RabbitExchange(topology.dead_letter_exchange, type=ExchangeType.DIRECT, durable=True)
    docs = RabbitBroker(DOCUMENTED_AMQP_URL, description="RabbitMQ (AMQP_URL).")

    consumed = [s for s in ctx.broker.subscribers if isinstance(s, RabbitSubscriber)]
    for subscriber in sorted(consumed, key=lambda s: s.queue.name):
        queue = topology.queue(subscriber.queue.name)
        title = subscriber.specification.name
        description = _text(subscriber.specification.description)
        if queue.observes_dead_letters:
            docs.subscriber(
                RabbitQueue(queue.name, routing_key=DEAD_LETTER_KEY, durable=True, declare=False),
                dead_letters,
                title=title,
                description=f"{description or ''}\n\n{DEAD_LETTER_OBSERVER}".strip(),
            )(_dead_letter_handler)
        for routing_key in queue.routing_keys:
            event = by_routing_key[routing_key]
            docs.subscriber(
                RabbitQueue(queue.name, routing_key=routing_key, durable=True, declare=False),
                exchange,
                # One channel per binding: a queue bound to several keys would otherwise share a name.
                title=title if len(queue.routing_keys) == 1 else f"{title}:{routing_key}",
                description=description,
            )(_event_handler(event))

    for event in PUBLISHES[service]:
        docs.publisher(
            routing_key=event.routing_key,
            exchange=exchange,
            title=f"{event.routing_key}:{event.__name__}",
            description=_text(event.__doc__),
            schema=event,
            persist=True,
            mandatory=True,
        )

    spec = AsyncAPI(
        docs,
        title=f"esim {service}",
        version=version(f"esim-{service}"),
        description=ASYNCAPI_DESCRIPTION,
        schema_version="3.0.0",
    ).to_specification()
    document: dict[str, Any] = spec.to_jsonable()
    for message in document.get("components", {}).get("messages", {}).values():
        message["headers"] = MESSAGE_HEADERS
        message["contentType"] = "application/json"
    return document


def render(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """Every document, by its path under docs/api/."""
    files: dict[str, str] = {}
    for service in SERVICES:
        app = build_app(service)
        files[f"asyncapi/{service}.json"] = render(asyncapi_document(service, app))
        files[f"openapi/{service}.json"] = render(app.openapi())
    return files


def stale_files(out: Path, files: Mapping[str, str]) -> list[str]:
    """Paths under `out` that differ from `files`, are missing, or should not be there."""
    present = {p.relative_to(out).as_posix() for p in out.glob("*api/*.json")}
    wrong = [
        path
        for path, text in files.items()
        if not (out / path).is_file() or (out / path).read_text(encoding="utf-8") != text
    ]
    return sorted({*wrong, *(present - set(files))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: docs/api")
    parser.add_argument("--check", action="store_true", help="only report stale documents (exit 1)")
    args = parser.parse_args(argv)
    files = generate()
    stale = stale_files(args.out, files)
    if args.check:
        for path in stale:
            print(f"stale: {args.out / path}", file=sys.stderr)
        if stale:
            print(f"run `{COMMAND}` and commit", file=sys.stderr)
        return 1 if stale else 0
    for path in {p.relative_to(args.out).as_posix() for p in args.out.glob("*api/*.json")} - set(files):
        (args.out / path).unlink()
    for path, text in files.items():
        (args.out / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out / path).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} documents under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
