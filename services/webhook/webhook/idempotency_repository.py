"""The SQL of checkout idempotency keys (`checkout_idempotency_keys`, migration 0003); rules in
`webhook.idempotency`.

    claim(pool, key, fingerprint, txn, lease)   → Claimed | Answered | Refused; prunes old keys too
    complete(conn, key, answer)                 in the transaction that records the session on the order
    release(pool, key, txn)                     after a failed attempt: the key can be used again

Every write is guarded by the transaction id that holds the claim, so an attempt whose claim was taken
over (its lease expired) can neither complete nor release the key of its successor.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from webhook.idempotency import KEY_RETENTION_SECONDS, Verdict, judge

# Each claim also deletes up to PRUNE_BATCH completed keys past their retention (oldest first, skipping
# rows another claim holds, never the key being claimed: that one is judged below). One claim per new
# key and up to PRUNE_BATCH deletions each keep the table at about a day of checkouts without a scheduler;
# the index on created_at makes the usual "nothing to prune" an empty index range.
PRUNE_BATCH = 100
INSERT_CLAIM = """
    WITH pruned AS (
        DELETE FROM checkout_idempotency_keys
         WHERE idempotency_key IN (
                SELECT idempotency_key
                  FROM checkout_idempotency_keys
                 WHERE created_at < now() - make_interval(secs => $4)
                   AND completed_at IS NOT NULL
                   AND idempotency_key <> $1
                 ORDER BY created_at
                 LIMIT $5
                   FOR UPDATE SKIP LOCKED)
    )
    INSERT INTO checkout_idempotency_keys (idempotency_key, request_fingerprint, transaction_id)
    VALUES ($1, $2, $3)
    ON CONFLICT (idempotency_key) DO NOTHING
"""
# now() of the database, not of this replica, decides whether a lease or an answer has expired.
SELECT_CLAIM_FOR_UPDATE = """
    SELECT request_fingerprint, transaction_id, session_id, session_url, amount, currency,
           completed_at IS NOT NULL AS completed,
           locked_at < now() - make_interval(secs => $2) AS lease_expired,
           created_at < now() - make_interval(secs => $3) AS answer_expired
      FROM checkout_idempotency_keys
     WHERE idempotency_key = $1
       FOR UPDATE
"""
# Under the row lock of SELECT_CLAIM_FOR_UPDATE: the expired key is forgotten, then claimed as new.
DELETE_EXPIRED_CLAIM = """
    DELETE FROM checkout_idempotency_keys WHERE idempotency_key = $1 AND completed_at IS NOT NULL
"""
TAKE_OVER_CLAIM = """
    UPDATE checkout_idempotency_keys
       SET request_fingerprint = $2, transaction_id = $3, locked_at = now()
     WHERE idempotency_key = $1 AND completed_at IS NULL
"""
COMPLETE_CLAIM = """
    UPDATE checkout_idempotency_keys
       SET session_id = $3, session_url = $4, amount = $5, currency = $6, completed_at = now()
     WHERE idempotency_key = $1 AND transaction_id = $2 AND completed_at IS NULL
"""
RELEASE_CLAIM = """
    DELETE FROM checkout_idempotency_keys
     WHERE idempotency_key = $1 AND transaction_id = $2 AND completed_at IS NULL
"""

# A claim can vanish between our INSERT and our SELECT (its attempt failed and released it); trying
# the INSERT again then succeeds. Three rounds make losing that race every time practically impossible.
_CLAIM_ROUNDS = 3


@dataclass(frozen=True)
class Answer:
    """What a completed checkout answered, kept to replay it."""

    transaction_id: str
    session_id: str
    url: str
    amount: int
    currency: str


@dataclass(frozen=True)
class Claimed:
    """This request holds the key: do the work as `transaction_id`.

    `replaced_transaction_id` is the attempt whose expired claim was taken over; it may have left an
    order row without a Checkout Session behind, which the caller discards."""

    transaction_id: str
    replaced_transaction_id: str | None = None


@dataclass(frozen=True)
class Answered:
    answer: Answer


@dataclass(frozen=True)
class Refused:
    verdict: Verdict  # MISMATCH or IN_PROGRESS


class ClaimLost(Exception):
    """The claim was taken over while this attempt ran: it must not answer for the key."""


async def claim(
    pool: asyncpg.Pool, key: str, fingerprint: str, transaction_id: str, lease_seconds: float
) -> Claimed | Answered | Refused:
    for _ in range(_CLAIM_ROUNDS):
        async with pool.acquire() as conn, conn.transaction():
            inserted = await conn.execute(
                INSERT_CLAIM, key, fingerprint, transaction_id, float(KEY_RETENTION_SECONDS), PRUNE_BATCH
            )
            if inserted == "INSERT 0 1":
                return Claimed(transaction_id)
            row = await conn.fetchrow(
                SELECT_CLAIM_FOR_UPDATE, key, float(lease_seconds), float(KEY_RETENTION_SECONDS)
            )
            if row is None:
                continue  # released meanwhile: claim it in the next round
            verdict = judge(
                same_request=row["request_fingerprint"] == fingerprint,
                completed=row["completed"],
                lease_expired=row["lease_expired"],
                answer_expired=row["answer_expired"],
            )
            if verdict is Verdict.EXPIRED:
                # Its Checkout Session has expired too: replaying it would hand out a dead URL.
                await conn.execute(DELETE_EXPIRED_CLAIM, key)
                await conn.execute(
                    INSERT_CLAIM, key, fingerprint, transaction_id, float(KEY_RETENTION_SECONDS), 0
                )
                return Claimed(transaction_id)
            if verdict is Verdict.REPLAY:
                return Answered(
                    Answer(
                        transaction_id=row["transaction_id"],
                        session_id=row["session_id"],
                        url=row["session_url"],
                        amount=row["amount"],
                        currency=row["currency"],
                    )
                )
            if verdict is Verdict.TAKE_OVER:
                await conn.execute(TAKE_OVER_CLAIM, key, fingerprint, transaction_id)
                return Claimed(transaction_id, replaced_transaction_id=row["transaction_id"])
            return Refused(verdict)
    return Refused(Verdict.IN_PROGRESS)


async def complete(conn: asyncpg.Connection, key: str, answer: Answer) -> None:
    """Store the answer; ClaimLost (rolling the caller's transaction back) if the claim is not ours."""
    status = await conn.execute(
        COMPLETE_CLAIM,
        key,
        answer.transaction_id,
        answer.session_id,
        answer.url,
        answer.amount,
        answer.currency,
    )
    if status != "UPDATE 1":
        raise ClaimLost(f"the idempotency key's claim by {answer.transaction_id} was taken over")


async def release(pool: asyncpg.Pool, key: str, transaction_id: str) -> bool:
    """Give the key back after a failed attempt. True if this attempt's claim was deleted."""
    return bool(await pool.execute(RELEASE_CLAIM, key, transaction_id) == "DELETE 1")
