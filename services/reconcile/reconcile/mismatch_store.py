"""The SQL of reconciliation mismatches: named statements, typed rows (migration 0008).

`store_run` is one transaction under an advisory lock, so two runs (the sweep and an operator's "run
now") store one after the other: upsert what the run found, resolve the open rows of the kinds it
checked that it no longer found, move the wallet anchor, and record the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.money import Money
from reconcile.ledger_rules import OrderFacts, WalletAnchor
from reconcile.mismatches import MISMATCH_KINDS, Mismatch, MismatchKind

# pg_advisory_xact_lock key of the store phase ("reconc" in ASCII): runs never interleave their writes.
STORE_LOCK_KEY = 0x7265636F6E63

# A (kind, subject) an operator acknowledged stays closed: the same finding in later runs opens no new
# row (else an acknowledged purchase or refund would page again every run until it left the window).
UPSERT_MISMATCH = """
    INSERT INTO reconcile_mismatches (kind, subject, transaction_id, detail, evidence_at, first_seen_at,
                                      last_seen_at)
    SELECT $1, $2, $3, $4::jsonb, ($4::jsonb ->> 'evidence_at')::timestamptz, $5, $5
     WHERE NOT EXISTS (SELECT 1 FROM reconcile_mismatches
                        WHERE kind = $1 AND subject = $2 AND resolution_note IS NOT NULL)
    ON CONFLICT (kind, subject) WHERE resolved_at IS NULL
    DO UPDATE SET last_seen_at = GREATEST(reconcile_mismatches.last_seen_at, EXCLUDED.last_seen_at),
                  detail = EXCLUDED.detail, evidence_at = EXCLUDED.evidence_at,
                  transaction_id = EXCLUDED.transaction_id
    RETURNING (xmax = 0) AS inserted
"""
# Open rows of the checked kinds that this run (stamped $2) did not see again, although their evidence
# is inside its window (from $3): older evidence was not looked at, so its absence proves nothing.
RESOLVE_MISSING = """
    UPDATE reconcile_mismatches SET resolved_at = $2
     WHERE resolved_at IS NULL AND kind = ANY($1::text[]) AND last_seen_at < $2
       AND (evidence_at IS NULL OR evidence_at >= $3)
"""
# An operator closes an open mismatch by hand (one that aged out of the window, or settled elsewhere).
ACKNOWLEDGE = """
    UPDATE reconcile_mismatches SET resolved_at = greatest(now(), first_seen_at), resolution_note = $2
     WHERE id = $1 AND resolved_at IS NULL
    RETURNING kind, subject, transaction_id
"""
GET_MISMATCH = "SELECT kind, subject, resolved_at FROM reconcile_mismatches WHERE id = $1"
RECORD_ACKNOWLEDGE = """
    INSERT INTO operator_actions (transaction_id, action, detail, note)
    VALUES ($1, 'acknowledge_mismatch', $2::jsonb, $3)
"""
INSERT_RUN = """
    INSERT INTO reconcile_runs (started_at, kinds_checked, sources_failed, found, opened, resolved)
    VALUES ($1, $2::text[], $3::text[], $4, $5, $6)
"""
OPEN_COUNTS = "SELECT kind, count(*) AS n FROM reconcile_mismatches WHERE resolved_at IS NULL GROUP BY kind"
LIST_MISMATCHES = """
    SELECT id, kind, subject, transaction_id, detail::text AS detail, evidence_at, first_seen_at,
           last_seen_at, resolved_at, resolution_note
      FROM reconcile_mismatches
     WHERE ($1::text IS NULL OR kind = $1) AND ($2 OR resolved_at IS NULL)
     ORDER BY resolved_at IS NOT NULL, last_seen_at DESC, id DESC
     LIMIT $3
"""
GET_ANCHOR = "SELECT currency, divisor, since, base FROM reconcile_wallet_anchor"
PUT_ANCHOR = """
    INSERT INTO reconcile_wallet_anchor (currency, divisor, since, base) VALUES ($1, $2, $3, $4)
    ON CONFLICT (currency) DO UPDATE SET divisor = EXCLUDED.divisor, since = EXCLUDED.since,
                                         base = EXCLUDED.base, updated_at = now()
"""
DROP_ANCHOR = "DELETE FROM reconcile_wallet_anchor RETURNING currency, since, base"
RECORD_ACCEPT = """
    INSERT INTO operator_actions (transaction_id, action, detail, note)
    VALUES (NULL, 'accept_wallet_balance', $1::jsonb, $2)
"""

_ORDER_FACTS = """
    SELECT transaction_id, status, paid_at, stripe_payment_intent_id, refund_status, zendit_transaction_id,
           zendit_status, zendit_cost, zendit_cost_currency
      FROM esim_purchases
"""
# Orders paid within the look-back window: the ones a purchase is expected for.
PAID_ORDERS_SINCE = _ORDER_FACTS + " WHERE paid_at >= $1"
# The orders some Zendit ids or Stripe PaymentIntents may belong to, however old.
ORDERS_MATCHING = (
    _ORDER_FACTS
    + """
     WHERE transaction_id = ANY($1::text[]) OR zendit_transaction_id = ANY($1::text[])
        OR stripe_payment_intent_id = ANY($2::text[])
"""
)


class StoredMismatch(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    kind: str
    subject: str
    transaction_id: str | None
    detail: dict[str, Any]
    evidence_at: datetime | None
    first_seen_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    resolution_note: str | None


def _facts(row: asyncpg.Record) -> OrderFacts:
    cost = row["zendit_cost"]
    currency = row["zendit_cost_currency"]
    return OrderFacts(
        transaction_id=row["transaction_id"],
        status=row["status"],
        paid_at=row["paid_at"],
        stripe_payment_intent_id=row["stripe_payment_intent_id"],
        refund_status=row["refund_status"],
        zendit_transaction_id=row["zendit_transaction_id"],
        zendit_status=row["zendit_status"],
        zendit_cost=Money(cost, currency.strip()) if cost is not None and currency else None,
    )


async def paid_orders_since(pool: asyncpg.Pool, since: datetime) -> list[OrderFacts]:
    return [_facts(row) for row in await pool.fetch(PAID_ORDERS_SINCE, since)]


async def orders_matching(
    pool: asyncpg.Pool, transaction_ids: Sequence[str], payment_intents: Sequence[str]
) -> list[OrderFacts]:
    rows = await pool.fetch(ORDERS_MATCHING, list(transaction_ids), list(payment_intents))
    return [_facts(row) for row in rows]


async def wallet_anchor(pool: asyncpg.Pool) -> WalletAnchor | None:
    """The anchor of the wallet (one wallet per Zendit account; the latest if the currency changed)."""
    async with pool.acquire() as conn:
        return await _current_anchor(conn)


async def _current_anchor(conn: asyncpg.Connection) -> WalletAnchor | None:
    rows = await conn.fetch(GET_ANCHOR + " ORDER BY updated_at DESC LIMIT 1")
    if not rows:
        return None
    row = rows[0]
    return WalletAnchor(row["currency"].strip(), row["divisor"], row["since"], row["base"])


async def accept_wallet_balance(pool: asyncpg.Pool, note: str) -> str | None:
    """Drop the wallet anchor (the next run sets a new one from the balance then), recording who-why in
    operator_actions; under the store lock, so no run in progress writes the old anchor back."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", STORE_LOCK_KEY)
        row = await conn.fetchrow(DROP_ANCHOR)
        if row is None:
            return None
        detail = {"currency": row["currency"].strip(), "since": row["since"].isoformat(), "base": row["base"]}
        await conn.execute(RECORD_ACCEPT, json.dumps(detail), note)
        return str(detail["currency"])


async def store_run(
    pool: asyncpg.Pool,
    *,
    started_at: datetime,
    window_start: datetime,
    found: Sequence[Mismatch],
    kinds_checked: Sequence[MismatchKind],
    sources_failed: Sequence[str],
    anchor: WalletAnchor | None,
    anchor_read: WalletAnchor | None = None,
) -> tuple[int, int]:
    """Store a run's findings; returns (opened, resolved). Only `kinds_checked` are resolved. The new
    `anchor` is written only while the stored one is still `anchor_read` (what the run started from): an
    operator who accepted the balance meanwhile dropped it, and the run must not write the old one back."""
    opened = 0
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", STORE_LOCK_KEY)
        for mismatch in found:
            inserted = await conn.fetchval(
                UPSERT_MISMATCH,
                mismatch.kind,
                mismatch.subject,
                mismatch.transaction_id,
                json.dumps(dict(mismatch.detail), sort_keys=True),
                started_at,
            )
            opened += bool(inserted)
        status = await conn.execute(RESOLVE_MISSING, list(kinds_checked), started_at, window_start)
        resolved = int(status.split()[-1])
        if anchor is not None and await _current_anchor(conn) == anchor_read:
            await conn.execute(PUT_ANCHOR, anchor.currency, anchor.divisor, anchor.since, anchor.base)
        await conn.execute(
            INSERT_RUN,
            started_at,
            list(kinds_checked),
            sorted(sources_failed),
            len(found),
            opened,
            resolved,
        )
    return opened, resolved


class AlreadyResolved(Exception):
    pass


class UseAcceptWallet(Exception):
    """A balance drift is closed by accepting the balance, not by acknowledging it (which would silence
    every later drift of the wallet)."""


async def acknowledge(pool: asyncpg.Pool, mismatch_id: int, note: str) -> bool:
    """Close an open mismatch by hand for good; False when there is no such mismatch, AlreadyResolved if
    closed, UseAcceptWallet for the wallet's balance drift (settled by accepting the balance instead)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", STORE_LOCK_KEY)
        found = await conn.fetchrow(GET_MISMATCH, mismatch_id)
        if found is None:
            return False
        if found["resolved_at"] is not None:
            raise AlreadyResolved(f"mismatch {mismatch_id} is resolved already")
        if found["kind"] == "wallet_balance_drift" and is_balance_subject(found["subject"]):
            raise UseAcceptWallet(
                f"mismatch {mismatch_id} is the wallet's balance drift: once it is settled, accept the "
                "balance with POST /api/admin/reconcile/wallet/accept (esimctl reconcile accept-wallet)"
            )
        row = await conn.fetchrow(ACKNOWLEDGE, mismatch_id, note)
        detail = {"mismatch_id": mismatch_id, "kind": row["kind"], "subject": row["subject"]}
        await conn.execute(RECORD_ACKNOWLEDGE, row["transaction_id"], json.dumps(detail), note)
        return True


def is_balance_subject(subject: str) -> bool:
    """The balance check's subject is the wallet currency; a debit's is a Zendit transaction id."""
    return len(subject) == 3 and subject.isalpha() and subject.isupper()


async def open_counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Open mismatches per kind, every kind present (0 included)."""
    rows = {row["kind"]: row["n"] for row in await pool.fetch(OPEN_COUNTS)}
    return {kind: rows.get(kind, 0) for kind in MISMATCH_KINDS}


async def list_mismatches(
    pool: asyncpg.Pool, *, kind: str | None, include_resolved: bool, limit: int
) -> list[StoredMismatch]:
    rows = await pool.fetch(LIST_MISMATCHES, kind, include_resolved, limit)
    return [StoredMismatch(**{**dict(row), "detail": json.loads(row["detail"])}) for row in rows]
