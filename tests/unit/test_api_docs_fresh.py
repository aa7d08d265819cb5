"""The committed API documents (docs/api/) are what the code generates, and say what the code does."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from esim_common import api_docs
from esim_common.events import ALL_EVENTS
from esim_common.topology import ESIM_QUEUES

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "api"
EVENT_NAMES = {event.__name__ for event in ALL_EVENTS}
# Modules that build events without publishing them: the email previews' sample data.
NOT_PUBLISHING = {"notify/samples.py"}


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return api_docs.generate()


def test_the_committed_api_documents_are_up_to_date(generated):
    stale = api_docs.stale_files(DOCS, generated)
    assert not stale, f"stale API documents {stale}: run `{api_docs.COMMAND}` and commit docs/api"


def test_generating_twice_gives_the_same_bytes(generated):
    assert api_docs.generate() == generated


def test_every_consumer_queue_is_documented_with_its_event_as_the_payload(generated):
    documented: dict[str, str] = {}
    for service in api_docs.SERVICES:
        doc = json.loads(generated[f"asyncapi/{service}.json"])
        for name, operation in doc["operations"].items():
            if operation["action"] != "receive":
                continue
            channel = doc["channels"][name]
            [message] = channel["messages"].values()
            payload = _resolve(doc, _resolve(doc, message)["payload"])
            documented[channel["bindings"]["amqp"]["queue"]["name"]] = payload
    by_key = {event.routing_key: event.__name__ for event in ALL_EVENTS}
    # Dead-letter observers get whatever failed: an object, not one event.
    observers = {queue.name for queue in ESIM_QUEUES if queue.observes_dead_letters}
    assert {name: p["title"] for name, p in documented.items() if name not in observers} == {
        queue.name: by_key[key] for queue in ESIM_QUEUES for key in queue.routing_keys
    }
    assert observers <= set(documented)
    for name in observers:
        assert (documented[name]["type"], documented[name]["additionalProperties"]) == ("object", True)


def test_every_routing_key_a_service_publishes_is_documented_with_its_schema(generated):
    for service, events in api_docs.PUBLISHES.items():
        doc = json.loads(generated[f"asyncapi/{service}.json"])
        sent = {
            doc["channels"][name]["address"]: _resolve(doc, _resolve(doc, message)["payload"])
            for name, operation in doc["operations"].items()
            if operation["action"] == "send"
            for message in doc["channels"][name]["messages"].values()
        }
        assert set(sent) == {event.routing_key for event in events}, service
        for event in events:
            schema = sent[event.routing_key]
            assert schema["title"] == event.__name__
            assert set(schema["required"]) == {n for n, f in event.model_fields.items() if f.is_required()}


def test_every_consumed_routing_key_has_a_publisher_and_every_published_one_a_consumer():
    published = {event.routing_key for events in api_docs.PUBLISHES.values() for event in events}
    consumed = {key for queue in ESIM_QUEUES for key in queue.routing_keys}
    assert published == consumed


@pytest.mark.parametrize("service", api_docs.SERVICES)
def test_the_documented_publishes_are_the_events_the_service_builds(service):
    """PUBLISHES is written by hand: it must name each event the service's code constructs (and
    compensation's, where the service uses it), and nothing else."""
    package = REPO / "services" / service / service
    built: set[str] = set()
    for path in package.glob("*.py"):
        if path.relative_to(package.parent).as_posix() in NOT_PUBLISHING:
            continue
        built |= _events_built(path.read_text(encoding="utf-8"))
        if "fail_and_refund" in path.read_text(encoding="utf-8"):
            built |= _events_built((REPO / "libs/common/esim_common/compensation.py").read_text())
    assert built == {event.__name__ for event in api_docs.PUBLISHES[service]}


def test_the_admin_routes_require_the_bearer_token_and_declare_their_errors(generated):
    spec = json.loads(generated["openapi/reconcile.json"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The ADMIN_API_TOKEN setting.",
    }
    admin = [(p, op) for p, ops in spec["paths"].items() if p.startswith("/api/admin") for op in ops.values()]
    assert len(admin) >= 10
    for path, operation in admin:
        assert operation["security"] == [{"HTTPBearer": []}], path
        assert {"200", "401"} <= set(operation["responses"]), path
        if "{" in path:  # a path parameter names something that may not exist
            assert "404" in operation["responses"], path
        if operation.get("parameters") or "requestBody" in operation:
            assert "422" in operation["responses"], path


@pytest.mark.parametrize(
    "name", sorted(f"{k}/{s}" for k in ("asyncapi", "openapi") for s in api_docs.SERVICES)
)
def test_every_reference_in_a_document_resolves(generated, name):
    doc = json.loads(generated[f"{name}.json"])
    for ref in _refs(doc):
        _resolve(doc, {"$ref": ref})


def _events_built(source: str) -> set[str]:
    return {
        node.func.id
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in EVENT_NAMES
    }


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s (local JSON pointers) until a node without one."""
    while "$ref" in node:
        target: Any = doc
        assert node["$ref"].startswith("#/"), node["$ref"]
        for part in node["$ref"][2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node
