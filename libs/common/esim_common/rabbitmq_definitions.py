"""RabbitMQ definitions (the JSON a node imports at boot) generated from `esim_topology()`.

    python -m esim_common.rabbitmq_definitions            # rewrites deploy/rabbitmq/definitions.json
    python -m esim_common.rabbitmq_definitions --check    # exit 1 if the committed file is stale
    python -m esim_common.rabbitmq_definitions -o -       # print instead

The document is what `esim_common.topology.declare()` does, recorded without a broker: the broker then
holds the exchanges, every work queue, retry tier and DLQ and their bindings with exactly the arguments
the services declare at start-up (so their declares are no-ops, never PRECONDITION_FAILED), before any
service runs. Topology only: no users or passwords. A node that loads definitions at boot seeds no
default user, so whoever runs the broker supplies users apart (compose: deploy/rabbitmq/sandbox-users.json;
Kubernetes: the broker's own operator or chart).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from aio_pika.abc import AbstractChannel, ExchangeType
from aiormq.abc import FieldTable

from esim_common.topology import Topology, declare, esim_topology

DEFAULT_OUTPUT = Path(__file__).resolve().parents[3] / "deploy" / "rabbitmq" / "definitions.json"
REGENERATE = "python -m esim_common.rabbitmq_definitions"

# RabbitMQ 4.0 gave every quorum queue a default delivery limit of 20. A DLQ has no dead-letter target,
# so a dead letter returned 20 times (each peek or refused replay returns it, before 4.3) would be
# dropped silently. The limit cannot be switched off by policy (`-1` is refused by 3.x and, per the 4.x
# docs, not honoured through a policy), so the policy raises it out of reach instead: valid on 3.x
# (where it is the only limit) and on 4.x. `\.dlq$` matches the DLQs of every TOPOLOGY_PREFIX.
DLQ_POLICY_NAME = "esim-dlq-delivery-limit"
DLQ_POLICY_PATTERN = r"\.dlq$"
DLQ_DELIVERY_LIMIT = 1_000_000
# Above a catch-all policy an operator may add (a queue takes only its highest-priority policy).
DLQ_POLICY_PRIORITY = 10
# `queues`, not `quorum_queues`: that value only exists from RabbitMQ 3.12, and before it one refused
# policy aborts the whole boot-time import (no queues, no users) with nothing but a silent log line.
DLQ_POLICY_APPLY_TO = "queues"


class _Recorder:
    """Stands in for an aio-pika channel while `topology.declare()` runs: records instead of sending, so
    the definitions follow whatever the services declare (a call it does not know fails loudly)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: list[tuple[str, str, str]] = []  # (exchange, queue, routing key)

    async def declare_exchange(
        self, name: str, type: ExchangeType, *, durable: bool = False, **rest: Any
    ) -> _Declared:
        if rest:
            raise TypeError(f"declare_exchange({name!r}): {sorted(rest)} not mapped to definitions")
        self.exchanges[name] = {"type": ExchangeType(type).value, "durable": durable}
        return _Declared(self, name)

    async def declare_queue(
        self, name: str, *, durable: bool = False, arguments: FieldTable | None = None, **rest: Any
    ) -> _Declared:
        if rest:
            raise TypeError(f"declare_queue({name!r}): {sorted(rest)} not mapped to definitions")
        self.queues[name] = {"durable": durable, "arguments": dict(arguments or {})}
        return _Declared(self, name)


class _Declared:
    def __init__(self, recorder: _Recorder, name: str) -> None:
        self.recorder, self.name = recorder, name

    async def bind(self, exchange: _Declared, *, routing_key: str, **rest: Any) -> None:
        if rest:
            raise TypeError(f"bind({self.name!r}): {sorted(rest)} not mapped to definitions")
        self.recorder.bindings.append((exchange.name, self.name, routing_key))


def definitions(topology: Topology, *, vhost: str = "/") -> dict[str, Any]:
    """The definitions document for `topology` in `vhost`: what `declare()` does, in its order."""
    recorder = _Recorder()
    # The recorder never suspends, so the coroutine ends on its first step: no event loop needed, and
    # callable from inside one (async tests).
    try:
        declare(cast(AbstractChannel, recorder), topology).send(None)
    except StopIteration:
        pass
    else:  # pragma: no cover - only if declare() starts awaiting something real
        raise RuntimeError("topology.declare() suspended while being recorded")
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {"name": name, "vhost": vhost, **spec, "auto_delete": False, "internal": False, "arguments": {}}
            for name, spec in recorder.exchanges.items()
        ],
        "queues": [
            {
                "name": name,
                "vhost": vhost,
                "durable": spec["durable"],
                "auto_delete": False,
                "arguments": spec["arguments"],
            }
            for name, spec in recorder.queues.items()
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": queue,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
            for exchange, queue, routing_key in recorder.bindings
        ],
        "policies": [
            {
                "vhost": vhost,
                "name": DLQ_POLICY_NAME,
                "pattern": DLQ_POLICY_PATTERN,
                "apply-to": DLQ_POLICY_APPLY_TO,
                "definition": {"delivery-limit": DLQ_DELIVERY_LIMIT},
                "priority": DLQ_POLICY_PRIORITY,
            }
        ],
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="file to write, `-` for stdout")
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--exchange", default="esim.events", help="EXCHANGE_NAME of the deployment")
    parser.add_argument("--prefix", default="", help="TOPOLOGY_PREFIX of the deployment")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    text = render(definitions(esim_topology(exchange=args.exchange, prefix=args.prefix), vhost=args.vhost))
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    output = Path(args.output)
    if args.check:
        if not output.exists() or output.read_text() != text:
            print(f"{output} is stale: regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
