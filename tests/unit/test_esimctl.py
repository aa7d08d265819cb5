"""esimctl: each command becomes the right admin API request, and each answer the right exit status."""

from __future__ import annotations

import json
from urllib.parse import unquote

import httpx
import pytest

from reconcile.cli import UNFINISHED_STATES, main

TOKEN = "admin-token-for-tests-0123456789"


class Recorder:
    def __init__(self, status: int = 200, body: object | None = None) -> None:
        self.status = status
        self.body = {"ok": True} if body is None else body
        self.requests: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return httpx.Response(self.status, json=self.body)

        return httpx.MockTransport(answer)

    @property
    def only(self) -> httpx.Request:
        assert len(self.requests) == 1
        return self.requests[0]


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("ADMIN_API_TOKEN", TOKEN)
    monkeypatch.delenv("ESIMCTL_URL", raising=False)


def run(argv: list[str], recorder: Recorder) -> int:
    return main(argv, transport=recorder.transport())


def body_of(request: httpx.Request) -> object:
    return json.loads(request.content) if request.content else None


@pytest.mark.parametrize(
    ("argv", "method", "path", "body"),
    [
        (["orders", "show", "txn_1"], "GET", "/api/admin/orders/txn_1", None),
        (["orders", "redrive", "txn_1"], "POST", "/api/admin/orders/txn_1/redrive", {}),
        (
            ["orders", "redrive", "txn_1", "--to", "funding", "--note", "wallet topped up"],
            "POST",
            "/api/admin/orders/txn_1/redrive",
            {"to": "funding", "note": "wallet topped up"},
        ),
        (["orders", "retry-refund", "txn_1"], "POST", "/api/admin/orders/txn_1/retry-refund", {}),
        (
            ["orders", "resolve", "txn_1", "--outcome", "refunded", "--note", "refunded in the dashboard"],
            "POST",
            "/api/admin/orders/txn_1/resolve",
            {"outcome": "refunded", "note": "refunded in the dashboard"},
        ),
        (["dlq", "list"], "GET", "/api/admin/dead-letters", None),
        (
            ["dlq", "replay", "q.dlq", "--id", "m1", "--id", "m2"],
            "POST",
            "/api/admin/dead-letters/q.dlq/replay",
            {"message_ids": ["m1", "m2"]},
        ),
        (
            ["dlq", "replay", "q.dlq", "--all", "--limit", "5", "--note", "bug fixed in 1.2.3"],
            "POST",
            "/api/admin/dead-letters/q.dlq/replay",
            {"all": True, "limit": 5, "note": "bug fixed in 1.2.3"},
        ),
        (
            ["dlq", "discard", "q.dlq", "--id", "m1", "--note", "test order"],
            "POST",
            "/api/admin/dead-letters/q.dlq/discard",
            {"message_ids": ["m1"], "note": "test order"},
        ),
        (["balance"], "POST", "/api/admin/reconcile-zendit", {"action": "check_balance"}),
        (
            ["reconcile", "--stuck-after", "45"],
            "POST",
            "/api/admin/reconcile-zendit",
            {"action": "reconcile", "stuck_after_minutes": 45},
        ),
    ],
)
def test_each_command_is_one_request_with_the_bearer_token(argv, method, path, body):
    recorder = Recorder()
    assert run(argv, recorder) == 0
    request = recorder.only
    assert (request.method, request.url.path, body_of(request)) == (method, path, body)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert str(request.url).startswith("http://127.0.0.1:8084/")


def test_stuck_asks_for_every_unfinished_state_older_than_the_limit():
    recorder = Recorder()
    assert run(["orders", "stuck", "--older-than", "90"], recorder) == 0
    params = recorder.only.url.params
    assert params.get_list("status") == list(UNFINISHED_STATES)
    assert (params["older_than_minutes"], params["limit"]) == ("90", "100")
    assert "delivered" not in UNFINISHED_STATES and "refunded" not in UNFINISHED_STATES


def test_list_sends_only_the_filters_given():
    recorder = Recorder()
    assert run(["orders", "list", "--status", "purchasing", "--status", "funded"], recorder) == 0
    params = recorder.only.url.params
    assert params.get_list("status") == ["purchasing", "funded"] and "older_than_minutes" not in params


def test_the_answer_is_printed_as_json(capsys):
    assert run(["balance"], Recorder(body={"balance": {"amount": 1234, "currency": "USD"}})) == 0
    assert json.loads(capsys.readouterr().out) == {"balance": {"amount": 1234, "currency": "USD"}}


def test_a_refusal_exits_1_with_the_apis_message_and_never_the_token(capsys):
    recorder = Recorder(status=409, body={"detail": "order txn_1 is delivered: nothing to re-drive"})
    assert run(["orders", "redrive", "txn_1"], recorder) == 1
    err = capsys.readouterr().err
    assert "409" in err and "nothing to re-drive" in err and TOKEN not in err


def test_without_a_token_nothing_is_sent(monkeypatch, capsys):
    monkeypatch.delenv("ADMIN_API_TOKEN")
    recorder = Recorder()
    assert run(["balance"], recorder) == 2
    assert recorder.requests == [] and "ADMIN_API_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["dlq", "replay", "q.dlq"], ["dlq", "replay", "q.dlq", "--all", "--id", "m"]]
)
def test_replay_needs_exactly_one_of_ids_or_all(argv, capsys):
    recorder = Recorder()
    assert run(argv, recorder) == 2
    assert recorder.requests == [] and "--id" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "."])
def test_an_id_cannot_reach_another_route(bad):
    recorder = Recorder()
    assert run(["orders", "show", bad], recorder) == 2
    assert recorder.requests == []


def test_an_unreachable_service_exits_2_with_the_url(capsys):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    assert main(["--url", "http://127.0.0.1:9", "balance"], transport=httpx.MockTransport(refuse)) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and TOKEN not in err


def test_the_url_comes_from_esimctl_url(monkeypatch):
    monkeypatch.setenv("ESIMCTL_URL", "http://reconcile.internal:8084")
    recorder = Recorder()
    assert run(["dlq", "list"], recorder) == 0
    assert recorder.only.url.host == "reconcile.internal"


@pytest.mark.parametrize("odd", ["txn_1#x", "txn_1?status=delivered", "txn_%2e%2e"])
def test_an_id_with_url_syntax_travels_as_one_escaped_segment(odd):
    recorder = Recorder()
    assert run(["orders", "show", odd], recorder) == 0
    request = recorder.only
    assert request.url.raw_path.decode().startswith("/api/admin/orders/") and not request.url.query
    assert request.url.raw_path.decode().count("/") == 4  # /api/admin/orders/<one segment>
    assert unquote(request.url.raw_path.decode().rsplit("/", 1)[1]) == odd
