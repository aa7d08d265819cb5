"""Orders for the pipeline benchmark, made the way a shop makes them, before the clock starts.

For each order: `POST /api/create-checkout-session` on the webhook service (the real checkout: live
offer and price, the order row `pending_payment`, a Checkout Session at the Stripe emulator), then the
customer pays it in the emulator (`/_sandbox/checkout/sessions/{id}/pay`: a PaymentIntent, a charge,
`payment_intent.succeeded` and `checkout.session.completed`). The emulator's webhook delivery is on
hold meanwhile, so the events are recorded but not sent; the benchmark sends exactly those events
itself, at its own schedule (`bench.loadgen`), and the emulator knows every session, PaymentIntent
and charge they name, as it would after real payments.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

# USD offers of the sandbox catalogue (the wallet is in USD), taken in turn: varied prices and costs.
OFFERS = (
    "ESIM-US-7D-1GB",
    "ESIM-US-30D-10GB",
    "ESIM-GB-15D-5GB",
    "ESIM-FR-10D-3GB",
    "ESIM-GLOBAL-30D-5GB",
    "ESIM-EUROPE-15D-10GB",
)
EVENT_TYPES = {
    # What Stripe sends for one paid Checkout Session (automatic capture), in the order it makes them.
    "both": ("payment_intent.succeeded", "checkout.session.completed"),
    "session": ("checkout.session.completed",),
    "intent": ("payment_intent.succeeded",),
}
SETUP_CONCURRENCY = 16
HTTP_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class PaidOrder:
    index: int
    transaction_id: str
    session_id: str


async def _in_parallel(count: int, job, concurrency: int = SETUP_CONCURRENCY, label: str = "") -> list:  # type: ignore[no-untyped-def]
    results: list = [None] * count
    next_index = 0
    done = 0

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < count:
            index = next_index
            next_index += 1
            results[index] = await job(index)
            done += 1
            if label and done % 500 == 0:
                print(f"  {label}: {done}/{count}", flush=True)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return results


async def _post(client: httpx.AsyncClient, url: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    for attempt in range(5):  # a 503 (load shedding) or a blip during set-up: try again
        response = await client.post(url, **kwargs)
        if response.status_code < 500:
            response.raise_for_status()
            return response
        await asyncio.sleep(0.2 * (attempt + 1))
    response.raise_for_status()
    return response


async def create_paid_orders(webhook_url: str, stripe_url: str, count: int, run_id: str) -> list[PaidOrder]:
    """`count` orders checked out and paid (their events held at the emulator), in index order."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as client:

        async def checkout(index: int) -> PaidOrder:
            response = await _post(
                client,
                f"{webhook_url}/api/create-checkout-session",
                json={
                    "offerId": OFFERS[index % len(OFFERS)],
                    "recipientEmail": f"bench+{run_id}-{index}@example.com",
                    "fullName": f"Bench Customer {index}",
                },
            )
            body = response.json()
            return PaidOrder(index, body["transactionId"], body["sessionId"])

        orders: list[PaidOrder] = await _in_parallel(count, checkout, label="checkout sessions")

        async def pay(index: int) -> None:
            await _post(client, f"{stripe_url}/_sandbox/checkout/sessions/{orders[index].session_id}/pay")

        await _in_parallel(count, pay, label="paid")
    return orders


async def held_event_bodies(
    stripe_url: str, orders: Sequence[PaidOrder], events: str
) -> dict[str, list[tuple[str, bytes]]]:
    """Per transaction id: (event type, the exact body Stripe would POST) for each wanted event."""
    wanted = EVENT_TYPES[events]
    by_txn: dict[str, list[tuple[str, bytes]]] = {order.transaction_id: [] for order in orders}
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as client:
        for event_type in wanted:
            response = await client.get(f"{stripe_url}/_sandbox/events", params={"type": event_type})
            response.raise_for_status()
            for record in response.json()["data"]:
                event = record["event"]
                data = event["data"]["object"]
                txn = data.get("client_reference_id") or (data.get("metadata") or {}).get("transaction_id")
                if txn in by_txn:
                    # The emulator sends json.dumps(event, indent=2) (stripe_emulator.webhooks.encode).
                    by_txn[txn].append((event_type, json.dumps(event, indent=2).encode()))
    missing = [txn for txn, found in by_txn.items() if len(found) != len(wanted)]
    if missing:
        raise RuntimeError(f"{len(missing)} paid orders have no recorded {wanted} event, e.g. {missing[0]}")
    return by_txn


def bodies_file_rows(
    orders: Sequence[PaidOrder], bodies: dict[str, list[tuple[str, bytes]]]
) -> list[tuple[int, str]]:
    """The load generator's [order index, body] rows: each order's events one after the other."""
    return [(order.index, body.decode()) for order in orders for _, body in bodies[order.transaction_id]]
