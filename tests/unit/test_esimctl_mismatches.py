"""esimctl's reconciliation commands become the right admin API requests."""

from __future__ import annotations

import json

import httpx
import pytest

from reconcile.cli import main

TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("ADMIN_API_TOKEN", TOKEN)
    monkeypatch.delenv("ESIMCTL_URL", raising=False)


def sent(argv: list[str]) -> httpx.Request:
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"ok": True})

    assert main(argv, transport=httpx.MockTransport(answer)) == 0
    assert len(requests) == 1
    return requests[0]


@pytest.mark.parametrize(
    ("argv", "method", "path", "query", "body"),
    [
        (["mismatches"], "GET", "/api/admin/mismatches", {"include_resolved": "false", "limit": "100"}, None),
        (
            ["mismatches", "--kind", "purchased_unknown", "--all", "--limit", "5"],
            "GET",
            "/api/admin/mismatches",
            {"include_resolved": "true", "limit": "5", "kind": "purchased_unknown"},
            None,
        ),
        (["reconcile", "run"], "POST", "/api/admin/reconcile/run", {}, None),
        (
            ["mismatches", "acknowledge", "42", "--note", "settled with Zendit"],
            "POST",
            "/api/admin/mismatches/42/acknowledge",
            {},
            {"note": "settled with Zendit"},
        ),
        (
            ["reconcile", "accept-wallet", "--note", "Zendit credited a fee refund"],
            "POST",
            "/api/admin/reconcile/wallet/accept",
            {},
            {"note": "Zendit credited a fee refund"},
        ),
        # Without a subcommand it is still the seed's report.
        (
            ["reconcile", "--stuck-after", "45"],
            "POST",
            "/api/admin/reconcile-zendit",
            {},
            {"action": "reconcile", "stuck_after_minutes": 45},
        ),
    ],
    ids=["mismatches", "mismatches-filtered", "run", "acknowledge", "accept-wallet", "seed-report"],
)
def test_reconciliation_commands_map_to_the_admin_api(argv, method, path, query, body):
    request = sent(argv)
    assert (request.method, request.url.path) == (method, path)
    assert dict(request.url.params) == query
    assert (json.loads(request.content) if request.content else None) == body
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_accepting_the_wallet_needs_a_note():
    with pytest.raises(SystemExit):
        main(["reconcile", "accept-wallet"], transport=httpx.MockTransport(lambda r: httpx.Response(200)))
