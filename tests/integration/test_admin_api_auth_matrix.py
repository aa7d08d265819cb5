"""R11: the admin API on the real database and broker, route by route as its OpenAPI lists them.

Every admin operation, with every wrong credential → 401 with `WWW-Authenticate: Bearer`, never a 5xx, and
neither the admin token nor what the caller presented shows in a response or a log line. With the
right token, schemathesis generates requests from the served OpenAPI (valid ones, then invalid ones):
no 5xx, and every answer is one the document declares (status, content type, body schema); each
documented bound of a read parameter is tried just outside it. The webhook service's public routes get
the same schemathesis run. The routes come from the schema, so a new admin route is in the matrix
without touching this file.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from esim_common.money import Money
from esim_common.order_repository import create_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.service import ServiceContext
from reconcile.main import create_app
from tests.fixtures.polling import eventually
from webhook.main import create_app as create_webhook

pytestmark = [pytest.mark.broker, pytest.mark.db]

TOKEN = f"adm-{secrets.token_urlsafe(24)}"
WRONG = f"adm-{secrets.token_urlsafe(24)}"
# Generated requests per operation: enough to reach every parameter and body shape, well under a minute.
MAX_EXAMPLES = 12


@dataclass(frozen=True)
class Credential:
    name: str
    header: str | bytes | None  # the Authorization header; None: not sent
    presented: str = ""  # what the caller sent that must not come back (beside the token itself)


WRONG_CREDENTIALS = [
    Credential("no header", None),
    Credential("empty bearer", "Bearer "),
    Credential("scheme only", "Bearer"),
    Credential("wrong token", f"Bearer {WRONG}", WRONG),
    Credential("token prefix", f"Bearer {TOKEN[:-1]}"),
    Credential("trailing garbage", f"Bearer {TOKEN}x9"),
    Credential("second word", f"Bearer {TOKEN} {WRONG}", WRONG),
    Credential("no scheme", TOKEN),
    Credential("basic", "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()),
    Credential("other scheme", f"Token {TOKEN}"),
    Credential("very long", "Bearer " + WRONG * 400, WRONG * 400),
    Credential("not utf-8", b"Bearer \xff\xfe" + WRONG.encode(), WRONG),
]
RIGHT_CREDENTIALS = [Credential("bearer", f"Bearer {TOKEN}"), Credential("lower-case", f"bearer {TOKEN}")]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    has_body: bool
    path_types: tuple[tuple[str, str], ...]  # (name, JSON schema type) of each path parameter

    def path(self, ctx: ServiceContext, **overrides: Any) -> str:
        """Values the route accepts in form but knows nothing about (the token check comes first)."""
        samples = {"queue": ctx.topology.queues[0].dlq, **overrides}
        values = {
            name: samples.get(name, "999999" if kind == "integer" else "auth-matrix-unknown")
            for name, kind in self.path_types
        }
        return self.template.format(**values)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def admin_routes(spec: dict[str, Any]) -> list[Route]:
    """Every operation the OpenAPI says needs the admin bearer token."""
    return [
        Route(
            method.upper(),
            path,
            "requestBody" in operation,
            tuple(
                (p["name"], p.get("schema", {}).get("type", "string"))
                for p in operation.get("parameters", [])
                if p["in"] == "path"
            ),
        )
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if {"HTTPBearer": []} in operation.get("security", [])
    ]


@pytest.fixture
def admin_settings(service_settings):
    return service_settings.model_copy(update={"admin_api_token": SecretStr(TOKEN)})


@pytest.fixture
async def reconcile_app(admin_settings) -> AsyncIterator[FastAPI]:
    app = create_app(admin_settings)
    ctx: ServiceContext = app.state.ctx
    await ctx.start()
    try:
        yield app
    finally:
        await ctx.stop()


async def send(client: httpx.AsyncClient, route: Route, ctx: ServiceContext, header: str | bytes | None):
    headers = {"Authorization": header} if header is not None else {}
    body = {"json": {}} if route.has_body else {}
    return await client.request(route.method, route.path(ctx), headers=headers, **body)


def test_every_admin_route_is_in_the_matrix(reconcile_app):
    routes = {str(r) for r in admin_routes(reconcile_app.openapi())}
    assert len(routes) >= 10
    public = {f"{m.upper()} {p}" for p, ops in reconcile_app.openapi()["paths"].items() for m in ops}
    assert {r for r in public if "/api/admin" in r} == routes  # nothing under /api/admin goes unguarded


async def test_every_wrong_credential_gets_401_on_every_admin_route_and_nothing_is_echoed(
    reconcile_app, caplog
):
    caplog.set_level(logging.DEBUG)
    ctx = reconcile_app.state.ctx
    problems: list[str] = []
    transport = httpx.ASGITransport(app=reconcile_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://reconcile") as client:
        for route in admin_routes(reconcile_app.openapi()):
            for credential in WRONG_CREDENTIALS:
                response = await send(client, route, ctx, credential.header)
                where = f"{route} with {credential.name}"
                if response.status_code != 401:
                    problems.append(f"{where}: {response.status_code} {response.text[:200]}")
                elif response.headers.get("WWW-Authenticate") != "Bearer":
                    problems.append(f"{where}: WWW-Authenticate {response.headers.get('WWW-Authenticate')}")
                for secret in filter(None, (TOKEN, credential.presented)):
                    if secret in response.text or any(secret in v for v in response.headers.values()):
                        problems.append(f"{where}: the response echoes what was presented")
    assert not problems, "\n".join(problems)
    for record in caplog.records:
        line = f"{record.getMessage()} {record.__dict__}"
        assert TOKEN not in line and WRONG not in line, f"a log line carries a token: {record.getMessage()}"
    assert any(r.getMessage().startswith("admin request refused") for r in caplog.records)


async def test_the_right_token_passes_the_guard_on_every_admin_route(reconcile_app, caplog):
    caplog.set_level(logging.DEBUG)
    ctx = reconcile_app.state.ctx
    transport = httpx.ASGITransport(app=reconcile_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://reconcile") as client:
        for route in admin_routes(reconcile_app.openapi()):
            for credential in RIGHT_CREDENTIALS:
                response = await send(client, route, ctx, credential.header)
                # 404: the sample id or queue; 422: the empty body. Never refused, never a crash.
                assert response.status_code in (200, 404, 409, 422), (str(route), response.text)
                assert TOKEN not in response.text
    assert not any(TOKEN in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


def out_of_bounds(schema: dict[str, Any]) -> list[Any]:
    """Values just outside what a parameter's schema allows (the boundaries random data rarely hits)."""
    values: list[Any] = []
    if "minimum" in schema:
        values.append(schema["minimum"] - 1)
    if "maximum" in schema:
        values.append(schema["maximum"] + 1)
    if "maxLength" in schema:
        values.append("x" * (schema["maxLength"] + 1))
    if schema.get("type") == "integer":
        values.append("not-a-number")
    return values


async def test_every_documented_bound_of_a_read_parameter_is_refused_with_a_422(reconcile_app):
    """Each parameter of the admin GET routes just outside its documented bounds: a 422 (or the 404 of
    an id that cannot exist), never a 5xx; a bound dropped from the code but kept in the document would
    let the value through to SQL (`LIMIT -1`: a 500). (POST routes would answer 422 for the empty body
    whatever the parameter; schemathesis covers them.)"""
    ctx = reconcile_app.state.ctx
    spec = reconcile_app.openapi()
    problems: list[str] = []
    transport = httpx.ASGITransport(app=reconcile_app, raise_app_exceptions=False)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://reconcile", headers=headers) as client:
        for route in (r for r in admin_routes(spec) if r.method == "GET"):
            for parameter in spec["paths"][route.template]["get"].get("parameters", []):
                name, where = parameter["name"], parameter["in"]
                for value in out_of_bounds(parameter.get("schema", {})):
                    response = await client.get(
                        route.path(ctx, **({name: value} if where == "path" else {})),
                        params={name: value} if where == "query" else {},
                    )
                    if response.status_code not in (404, 422):
                        problems.append(f"{route} {name}={str(value)[:20]}: {response.status_code}")
    assert not problems, "\n".join(problems)


async def needs_attention_order(db) -> str:
    txn = f"txn_{secrets.token_hex(12)}"
    async with db.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-GLOBAL-30D-5GB",
            price=Money(1299, "USD"),
            zendit_cost=Money(450, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada",
        )
        await transition(conn, txn, OrderStatus.NEEDS_ATTENTION, reason="test")
    return txn


async def test_a_note_postgres_cannot_store_is_a_422_not_a_500(reconcile_app, db):
    """Found by schemathesis: a NUL character in an operator's note reached Postgres, whose text type
    refuses it, and came back as a 500. Every note is checked before anything is written."""
    txn = await needs_attention_order(db)
    note = "refunded in Stripe\x00"
    transport = httpx.ASGITransport(app=reconcile_app)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://reconcile", headers=headers) as client:
        answers = {
            "resolve": await client.post(
                f"/api/admin/orders/{txn}/resolve", json={"outcome": "refunded", "note": note}
            ),
            "acknowledge": await client.post("/api/admin/mismatches/1/acknowledge", json={"note": note}),
        }
    assert {name: r.status_code for name, r in answers.items()} == {"resolve": 422, "acknowledge": 422}
    assert await db.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn) == (
        "needs_attention"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """`app` over real HTTP on a free port, with its own lifespan (broker, pool, background loops)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), within=10, what="the service started")
        assert server.started, "the service did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def reconcile_url(admin_settings) -> AsyncIterator[str]:
    async with serving(create_app(admin_settings)) as url:
        yield url


# Requests that fit the schema: the answer must be one the document declares, and the token is required.
POSITIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,  # sends the same request without the token: the API must refuse it
]
# Requests that do not (wrong types, missing fields, out-of-range values): a declared 4xx, never a 5xx.
# (Not `negative_data_rejection`: it counts an unknown query parameter as invalid, which HTTP APIs ignore.)
NEGATIVE_CHECKS = [not_a_server_error, status_code_conformance]


def fuzz(url: str, headers: dict[str, str]) -> list[str]:
    """Schemathesis over the served OpenAPI; returns the failures, one per operation and mode."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = any((operation.path_parameters, operation.query, operation.headers, operation.body))
        modes = [(GenerationMode.POSITIVE, POSITIVE_CHECKS)]
        if takes_input:  # nothing to get wrong otherwise
            modes.append((GenerationMode.NEGATIVE, NEGATIVE_CHECKS))
        for mode, checks in modes:
            try:
                run_examples(operation, mode, checks, url, headers)
            except (Exception, BaseExceptionGroup) as exc:  # hypothesis raises a group for several
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures


def run_examples(operation: Any, mode: GenerationMode, checks: list[Any], url: str, headers: dict[str, str]):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def examples(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, headers=headers, timeout=30)
        case.validate_response(response, checks=checks, headers=headers)
        assert TOKEN not in response.text

    examples()


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(reconcile_url):
    failures = await asyncio.to_thread(fuzz, reconcile_url, {"Authorization": f"Bearer {TOKEN}"})
    assert not failures, "\n\n".join(failures)


@pytest.fixture
async def webhook_url(service_settings) -> AsyncIterator[str]:
    """The webhook service on the emulators."""
    async with serving(create_webhook(service_settings)) as url:
        yield url


async def test_schemathesis_finds_no_server_error_on_the_webhook_services_public_routes(
    webhook_url, service_settings
):
    """The shop's and the providers' endpoints: every answer documented. Zendit's secret header goes
    along, so that its webhook's bodies are parsed (Stripe's signatures cannot be generated)."""
    secret = {
        service_settings.zendit_webhook_header: service_settings.zendit_webhook_secret.get_secret_value()
    }
    failures = await asyncio.to_thread(fuzz, webhook_url, secret)
    assert not failures, "\n\n".join(failures)
