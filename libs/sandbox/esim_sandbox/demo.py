"""`make run`: the whole system on loopback, one sample order through it, then serve until Ctrl-C.

    python -m esim_sandbox.demo [--offer ESIM-GLOBAL-30D-5GB] [--email customer@example.com]

Starts the emulators and the five services as processes (RabbitMQ and Postgres must answer: `make run`
starts them and migrates first), places an order through real HTTP exactly as a shop would (create a
Checkout Session, pay it in the Stripe emulator, which sends the signed webhooks), prints each step of
the order as it happens, and where to look afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from pathlib import Path

import asyncpg
import httpx

from esim_common.settings import load_settings
from esim_sandbox.stack import ISSUING_AUTHORIZATION_PATH, SERVICES, Stack

FINAL_STATES = {"delivered", "refunded", "needs_attention", "payment_failed"}
# The sandbox finishes an order in a few seconds; past this something is wrong and the logs say what.
FOLLOW_TIMEOUT_SECONDS = 60.0


def place_order(stack: Stack, offer_id: str, email: str) -> tuple[str, str]:
    response = httpx.post(
        f"{stack.url('webhook')}/api/create-checkout-session",
        json={"offerId": offer_id, "recipientEmail": email, "fullName": "Sample Customer"},
        timeout=30,
    )
    response.raise_for_status()
    body = response.json()
    print(f"checkout session {body['sessionId']} created for order {body['transactionId']}")
    print(f"  the customer would pay at {body['url']}")
    paid = httpx.post(f"{stack.url('stripe')}/_sandbox/checkout/sessions/{body['sessionId']}/pay", timeout=30)
    paid.raise_for_status()
    print("paid in the Stripe emulator; it now sends the signed webhooks")
    return str(body["transactionId"]), str(body["sessionId"])


async def follow_order(database_url: str, transaction_id: str) -> dict[str, object]:
    """Print every state change of the order until it reaches a final state; return its row."""
    conn = await asyncpg.connect(database_url)
    try:
        seen = 0
        money_seen: set[tuple[object, ...]] = set()
        started = time.monotonic()
        while time.monotonic() - started < FOLLOW_TIMEOUT_SECONDS:
            # The wallet top-up and its single-use card are not order states: show them as they happen.
            money = await conn.fetch(
                "SELECT t.id, t.status, t.amount, t.currency, c.card_last4, c.active FROM wallet_topups t"
                " LEFT JOIN issuing_cards c ON c.topup_id = t.id WHERE $1 = ANY(t.order_ids) OR t.id LIKE $2",
                transaction_id,
                f"tu_{transaction_id}%",
            )
            for row in money:
                key = tuple(row.values())
                if key not in money_seen:
                    money_seen.add(key)
                    card = f", card …{row['card_last4']} {'active' if row['active'] else 'cancelled'}"
                    print(
                        f"  {'':>15}   top-up {row['id']}: {row['status']}, {row['amount']} {row['currency']}"
                        + (card if row["card_last4"] else ""),
                        flush=True,
                    )
            rows = await conn.fetch(
                "SELECT from_status, to_status, at, reason FROM order_transitions"
                " WHERE transaction_id = $1 ORDER BY id",
                transaction_id,
            )
            for row in rows[seen:]:
                note = f"  ({row['reason']})" if row["reason"] else ""
                print(
                    f"  {row['at']:%H:%M:%S.%f}  {row['from_status']:>15} → {row['to_status']}{note}",
                    flush=True,
                )
            seen = len(rows)
            order = await conn.fetchrow(
                "SELECT * FROM esim_purchases WHERE transaction_id = $1", transaction_id
            )
            if order is not None and order["status"] in FINAL_STATES:
                return dict(order)
            await asyncio.sleep(0.2)
        return dict(order) if order else {}
    finally:
        await conn.close()


def print_card_authorisations(stack: Stack) -> None:
    """How each charge of an Issuing card was decided: the top-up's should say `webhook_approved`, i.e.
    the webhook service's real-time authorisation endpoint approved it."""
    response = httpx.get(
        f"{stack.url('stripe')}/_sandbox/events", params={"type": "issuing_authorization.created"}, timeout=10
    )
    response.raise_for_status()
    for record in response.json()["data"]:
        auth = record["event"]["data"]["object"]
        decided = auth["request_history"][-1] if auth["request_history"] else {}
        print(
            f"  Issuing authorisation {auth['id']}: {'approved' if auth['approved'] else 'declined'}"
            f" ({decided.get('reason')}), {decided.get('amount')} {str(decided.get('currency')).upper()}"
        )


def print_where_to_look(stack: Stack, order: dict[str, object]) -> None:
    print(f"\norder {order.get('transaction_id')} is {order.get('status')}")
    if order.get("failure_reason"):
        print(f"  failure reason: {order['failure_reason']}")
    if order.get("paid_at") and order.get("emailed_at"):
        elapsed = order["emailed_at"] - order["paid_at"]  # type: ignore[operator]
        print(f"  paid → emailed in {elapsed.total_seconds():.2f} s")
    print("\nwhere to look:")
    print(f"  QR codes           {stack.qr_dir}/")
    print(f"  captured emails    {stack.mail_dir}/  (.eml files; open one in any mail client)")
    print("  RabbitMQ UI        http://127.0.0.1:15672  (guest/guest)")
    for name in SERVICES:
        print(f"  {name:<18} {stack.url(name)}/metrics   {stack.url(name)}/healthz")
    print(f"  admin API          {stack.url('reconcile')}/docs  (bearer ADMIN_API_TOKEN)")
    print(f"  card authorisation {stack.url('webhook')}{ISSUING_AUTHORIZATION_PATH}  (Stripe asks it)")
    print(f"  logs               {stack.logs_dir}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esim_sandbox.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--offer", default="ESIM-GLOBAL-30D-5GB")
    parser.add_argument("--email", default="customer@example.com")
    parser.add_argument("--workdir", type=Path, default=Path("var"))
    parser.add_argument("--no-wait", action="store_true", help="stop after the sample order (for scripts)")
    args = parser.parse_args(argv)

    settings = load_settings()
    stack = Stack(
        database_url=settings.database_url,
        amqp_url=settings.amqp_url,
        workdir=args.workdir.resolve(),
        topology_prefix=settings.topology_prefix,
        use_default_ports=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("starting the sandbox emulators and the five services ...", flush=True)
        stack.start()
        for name in ("stripe", "zendit", "smtp", *SERVICES):
            print(f"  {name:<13} {stack.url(name) if name != 'smtp' else f'127.0.0.1:{stack.ports[name]}'}")
        print()
        transaction_id, _ = place_order(stack, args.offer, args.email)
        order = asyncio.run(follow_order(settings.database_url, transaction_id))
        print_card_authorisations(stack)
        print_where_to_look(stack, order)
        if not args.no_wait:
            print("\nserving; Ctrl-C stops every process started here.", flush=True)
            stop.wait()
        return 0 if order.get("status") == "delivered" else 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # a port taken, a process that would not start: say so, no traceback
        print(f"\nthe sandbox could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C (or make forwarding it) must not cut the clean-up short and orphan processes.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
