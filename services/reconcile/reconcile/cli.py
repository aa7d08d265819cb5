"""`esimctl`: the admin API from a terminal, for operators who live there.

    esimctl orders stuck [--older-than MIN]          orders not in a final state for longer than MIN
    esimctl orders list [--status S ...] [--older-than MIN] [--limit N]
    esimctl orders show TXN                          the order's whole timeline
    esimctl orders redrive TXN [--to funding|provisioned] [--note TEXT]
    esimctl orders retry-refund TXN [--note TEXT]
    esimctl orders resolve TXN --outcome delivered|refunded --note TEXT
    esimctl dlq list [--recent-hours H]              every dead-letter queue: depth, counts, last error
    esimctl dlq peek QUEUE [--limit N]               look at dead letters without taking them
    esimctl dlq replay QUEUE (--id ID ... | --all [--limit N]) [--note TEXT]
    esimctl dlq discard QUEUE --id ID ... --note TEXT
    esimctl failures [--since-hours H]               failed orders per step, with the latest reason
    esimctl balance                                  the Zendit wallet
    esimctl reconcile [--stuck-after MIN]            the seed's reconciliation report
    esimctl reconcile run                            run the ledger checks now (Stripe, Zendit vs ours)
    esimctl reconcile accept-wallet --note TEXT      accept Zendit's wallet balance as it is now
    esimctl mismatches [--kind K] [--all] [--limit N]  open reconciliation mismatches (--all: resolved too)
    esimctl mismatches acknowledge ID --note TEXT    close one by hand (settled, or older than the window)

It only speaks HTTP to the reconcile service (`ESIMCTL_URL`, default http://127.0.0.1:8084) with
`ADMIN_API_TOKEN` as the bearer token, so it does exactly what the API allows and nothing more. Output is
the API's JSON, indented. Exit status: 0 done, 1 the API refused (its message on stderr), 2 the command
could not be sent (no token, service unreachable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8084"
TIMEOUT_SECONDS = 30.0
# Every state an order can still leave by itself or by an operator: what "stuck" looks at.
UNFINISHED_STATES = (
    "paid",
    "funding",
    "awaiting_funds",
    "funded",
    "purchasing",
    "provisioned",
    "topup_failed",
    "purchase_failed",
    "refund_pending",
    "needs_attention",
)
DEFAULT_STUCK_MINUTES = 30
# How far back `dlq list` counts recent dead letters and `failures` counts failed orders: one day.
DEFAULT_WINDOW_HOURS = 24


class UsageError(Exception):
    """The command cannot be sent as given (exit 2)."""


def request_for(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]:
    """(method, path, query, JSON body) of a parsed command: the whole mapping from commands to the API."""
    match args.group, args.command:
        case "orders", "stuck":
            query = {"status": list(UNFINISHED_STATES), "older_than_minutes": args.older_than}
            return "GET", "/api/admin/orders", query | {"limit": args.limit}, None
        case "orders", "list":
            query: dict[str, Any] = {"limit": args.limit}
            if args.status:
                query["status"] = args.status
            if args.older_than is not None:
                query["older_than_minutes"] = args.older_than
            return "GET", "/api/admin/orders", query, None
        case "orders", "show":
            return "GET", f"/api/admin/orders/{_segment(args.txn)}", None, None
        case "orders", "redrive":
            body = {k: v for k, v in (("to", args.to), ("note", args.note)) if v is not None}
            return "POST", f"/api/admin/orders/{_segment(args.txn)}/redrive", None, body
        case "orders", "retry-refund":
            body = {"note": args.note} if args.note is not None else {}
            return "POST", f"/api/admin/orders/{_segment(args.txn)}/retry-refund", None, body
        case "orders", "resolve":
            body = {"outcome": args.outcome, "note": args.note}
            return "POST", f"/api/admin/orders/{_segment(args.txn)}/resolve", None, body
        case "dlq", "list":
            return "GET", "/api/admin/dead-letters", {"recent_hours": args.recent_hours}, None
        case "dlq", "peek":
            return "GET", f"/api/admin/dead-letters/{_segment(args.queue)}", {"limit": args.limit}, None
        case "dlq", "replay":
            if bool(args.id) == args.all:
                raise UsageError("say which dead letters to replay: --id ID (repeatable) or --all")
            body = {"all": True, "limit": args.limit} if args.all else {"message_ids": args.id}
            if args.note is not None:
                body["note"] = args.note
            return "POST", f"/api/admin/dead-letters/{_segment(args.queue)}/replay", None, body
        case "dlq", "discard":
            body = {"message_ids": args.id, "note": args.note}
            return "POST", f"/api/admin/dead-letters/{_segment(args.queue)}/discard", None, body
        case "failures", _:
            return "GET", "/api/admin/failures", {"since_hours": args.since_hours}, None
        case "balance", _:
            return "POST", "/api/admin/reconcile-zendit", None, {"action": "check_balance"}
        case "reconcile", "run":
            return "POST", "/api/admin/reconcile/run", None, None
        case "reconcile", "accept-wallet":
            return "POST", "/api/admin/reconcile/wallet/accept", None, {"note": args.note}
        case "mismatches", "acknowledge":
            return "POST", f"/api/admin/mismatches/{args.id}/acknowledge", None, {"note": args.note}
        case "mismatches", _:
            query = {"include_resolved": "true" if args.all else "false", "limit": args.limit}
            return "GET", "/api/admin/mismatches", query | ({"kind": args.kind} if args.kind else {}), None
        case "reconcile", _:
            body = {"action": "reconcile", "stuck_after_minutes": args.stuck_after}
            return "POST", "/api/admin/reconcile-zendit", None, body
    raise UsageError(f"unknown command: {args.group} {args.command}")


def _segment(value: str) -> str:
    """An id as one URL path segment: a slash or a dot-segment must not reach another route, and `?`,
    `#` or `%` must not cut it short (`txn_1#x` is not order `txn_1`)."""
    if not value or "/" in value or value in (".", ".."):
        raise UsageError(f"not a valid id: {value!r}")
    return quote(value, safe="")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="esimctl", description="Operate esim-fulfillment through its admin API."
    )
    root.add_argument("--url", default=os.environ.get("ESIMCTL_URL", DEFAULT_URL), help="reconcile service")
    groups = root.add_subparsers(dest="group", required=True)

    orders = groups.add_parser("orders", help="find, inspect and fix orders").add_subparsers(
        dest="command", required=True
    )
    stuck = orders.add_parser("stuck", help="orders not finished after --older-than minutes")
    stuck.add_argument("--older-than", type=int, default=DEFAULT_STUCK_MINUTES, metavar="MIN")
    stuck.add_argument("--limit", type=int, default=100)
    listing = orders.add_parser("list", help="orders by state and age")
    listing.add_argument("--status", action="append", metavar="STATE", help="repeatable")
    listing.add_argument("--older-than", type=int, metavar="MIN")
    listing.add_argument("--limit", type=int, default=100)
    orders.add_parser("show", help="one order's timeline").add_argument("txn")
    redrive = orders.add_parser("redrive", help="send a stuck order through its normal path again")
    redrive.add_argument("txn")
    redrive.add_argument("--to", choices=("funding", "provisioned"), help="needs_attention only")
    redrive.add_argument("--note")
    refund = orders.add_parser("retry-refund", help="try a failed refund again (same idempotency key)")
    refund.add_argument("txn")
    refund.add_argument("--note")
    resolve = orders.add_parser("resolve", help="mark a needs_attention order settled by hand")
    resolve.add_argument("txn")
    resolve.add_argument("--outcome", choices=("delivered", "refunded"), required=True)
    resolve.add_argument("--note", required=True)

    dlq = groups.add_parser("dlq", help="dead letters").add_subparsers(dest="command", required=True)
    dlq_list = dlq.add_parser("list", help="every dead-letter queue: depth, counts, last error")
    dlq_list.add_argument("--recent-hours", type=int, default=DEFAULT_WINDOW_HOURS, metavar="H")
    peek = dlq.add_parser("peek", help="look at dead letters without taking them")
    peek.add_argument("queue")
    peek.add_argument("--limit", type=int, default=20)
    replay = dlq.add_parser("replay", help="put dead letters back on their work queue")
    replay.add_argument("queue")
    replay.add_argument("--id", action="append", metavar="MESSAGE_ID", help="repeatable")
    replay.add_argument("--all", action="store_true")
    replay.add_argument("--limit", type=int, default=100, help="with --all")
    replay.add_argument("--note", help="why (kept in the audit table)")
    discard = dlq.add_parser("discard", help="drop dead letters (recorded in the audit table)")
    discard.add_argument("queue")
    discard.add_argument("--id", action="append", metavar="MESSAGE_ID", required=True)
    discard.add_argument("--note", required=True)

    failures = groups.add_parser("failures", help="failed orders per step, with the latest reason")
    failures.set_defaults(command="failures")
    failures.add_argument("--since-hours", type=int, default=DEFAULT_WINDOW_HOURS, metavar="H")
    groups.add_parser("balance", help="the Zendit wallet").set_defaults(command="balance")
    reconcile = groups.add_parser("reconcile", help="the reconciliation report")
    reconcile.set_defaults(command="reconcile")
    reconcile.add_argument("--stuck-after", type=int, default=DEFAULT_STUCK_MINUTES, metavar="MIN")
    # `esimctl reconcile` alone stays the seed's report; `esimctl reconcile run` runs the checks.
    checks = reconcile.add_subparsers(dest="command")
    checks.add_parser("run", help="run the ledger checks now")
    accept = checks.add_parser("accept-wallet", help="accept Zendit's balance after settling a drift")
    accept.add_argument("--note", required=True, help="why the balance is right (kept in the audit table)")
    mismatches = groups.add_parser("mismatches", help="reconciliation mismatches")
    mismatches.set_defaults(command="mismatches")
    mismatches.add_argument("--kind", help="one kind only (the API lists the valid ones)")
    mismatches.add_argument("--all", action="store_true", help="resolved ones too")
    mismatches.add_argument("--limit", type=int, default=100)
    acknowledge = mismatches.add_subparsers(dest="command").add_parser(
        "acknowledge", help="close an open mismatch by hand"
    )
    acknowledge.add_argument("id", type=int)
    acknowledge.add_argument("--note", required=True, help="why (kept in the audit table)")
    return root


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    args = parser().parse_args(argv)
    token = os.environ.get("ADMIN_API_TOKEN", "")
    try:
        if not token:
            raise UsageError("ADMIN_API_TOKEN is not set (the reconcile service's admin token)")
        method, path, query, body = request_for(args)
        with httpx.Client(
            base_url=args.url, timeout=TIMEOUT_SECONDS, transport=transport, follow_redirects=False
        ) as client:
            response = client.request(
                method, path, params=query, json=body, headers={"Authorization": f"Bearer {token}"}
            )
    except UsageError as exc:
        print(f"esimctl: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        # The exception names the URL, never the headers: the token stays out of it.
        print(f"esimctl: could not reach {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    payload = _json_or_text(response)
    if response.is_success:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    print(f"esimctl: {response.status_code}: {json.dumps(detail, ensure_ascii=False)}", file=sys.stderr)
    return 1


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


if __name__ == "__main__":
    raise SystemExit(main())
