"""Exactly one email per (order, template), guarded by its row in `sent_emails`.

For an operator alert (`operator.alert`) the row's `transaction_id` column holds the alert's
`alert_key` (e.g. `wallet_short:<txn>:<episode>`), not an order id: one email per alert, and an order
can have several alerts.

    (no row) ──claim──► sending ──server accepted──► sent      a redelivery finds `sent`: no email
                ▲          │  └──refused / failed──► failed ─┐
                │          └── crash mid-send: stays `sending`, sent again by the next delivery
                └────────────────── claimed again by the next delivery ───┘

The row is claimed (committed) before the SMTP call and then locked for the whole call, so a second
worker holding a duplicate of the same message waits, then finds `sent` and sends nothing. What stays
possible is at-least-once on a crash: if the process dies after the server accepted the message but
before `sent` is committed, the redelivery sends it again (same Message-ID, so clients that
deduplicate show one). SMTP has no idempotency key, so exactly-once cannot be promised across that gap.

The email is built (rendered, QR code found, MIME message made) only after the row is locked and found not
`sent`: a redelivery of something already sent costs two statements and nothing else. A build that
fails counts as a failed attempt (`failed`, claimed again next time).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from enum import StrEnum

import asyncpg

from esim_common.errors import RetryLater
from notify.compose import Draft

# A `failed` row is claimed again (back to `sending`) before the next attempt.
CLAIM = """
    INSERT INTO sent_emails (transaction_id, template, recipient) VALUES ($1, $2, $3)
    ON CONFLICT (transaction_id, template) DO UPDATE SET status = 'sending'
     WHERE sent_emails.status = 'failed'
"""
LOCK = """
    SELECT status, message_id FROM sent_emails WHERE transaction_id = $1 AND template = $2 FOR UPDATE
"""
MARK_SENT = """
    UPDATE sent_emails SET status = 'sent', message_id = $3, sent_at = now()
     WHERE transaction_id = $1 AND template = $2
"""
MARK_FAILED = """
    UPDATE sent_emails SET status = 'failed' WHERE transaction_id = $1 AND template = $2
"""

# A worker that finds the row locked waits for the other one's SMTP call (a few timeouts at most)
# rather than failing; past this it retries the message later through the tiers. Passed as the
# statement timeout too, because the pool's default command timeout is shorter.
LOCK_WAIT_SECONDS = 60.0


class SendOutcome(StrEnum):
    SENT = "sent"
    ALREADY_SENT = "already_sent"


Send = Callable[[EmailMessage], Awaitable[None]]


async def send_once(
    pool: asyncpg.Pool,
    send: Send,
    draft: Draft,
    *,
    transaction_id: str,
    template: str,
) -> SendOutcome:
    """Build and send `draft` unless this (order, template) was sent already; the build's and `send`'s
    errors propagate."""
    key = (transaction_id, template)
    async with pool.acquire() as conn:
        failure: Exception | None = None
        try:
            await conn.execute(CLAIM, *key, draft.recipient, timeout=LOCK_WAIT_SECONDS)
            async with conn.transaction():
                row = await conn.fetchrow(LOCK, *key, timeout=LOCK_WAIT_SECONDS)
                if row["status"] == "sent":
                    return SendOutcome.ALREADY_SENT
                try:
                    message = await draft.build()
                    await send(message)
                except Exception as exc:
                    # Commit `failed` (the transaction must not roll back), then re-raise below.
                    failure = exc
                    await conn.execute(MARK_FAILED, *key)
                else:
                    await conn.execute(MARK_SENT, *key, str(message["Message-ID"]))
        except TimeoutError as exc:
            # Another worker held the row past the wait (or the database was slow): try again later.
            raise RetryLater(f"{template} is busy in sent_emails") from exc
    if failure is not None:
        raise failure
    return SendOutcome.SENT
