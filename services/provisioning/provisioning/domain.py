"""Provisioning's business rules. Pure: no database, broker, HTTP or clock, so tests call them directly.

funded ─► purchasing ─► (poll Zendit, never blocking the consumer) ─► provisioned
              │  DONE: QR rendered and read back (or Zendit's, read back), stored
              ├─ DONE but no QR code reads as its LPA string ─► needs_attention (never refunded)
              ├─ DONE but its QR code not stored by the deadline ─► needs_attention (never refunded)
              ├─ FAILED INSUFFICIENT_FUNDS ─► funding (fund again; the next attempt gets a new id)
              ├─ FAILED other, or the POST refused and nothing there ─► purchase_failed ─► refund
              └─ not final after the deadline ─► needs_attention (Zendit may still deliver)

needs_attention always comes with one `operator.alert` per purchase attempt (queued in the outbox with
the move). Only `purchase_failed` is ever refunded: the state says Zendit will not deliver, not a reason.

A Zendit webhook (`zendit.purchase-updated`) only makes us look sooner: it counts while
`awaits_purchase` holds, and the purchase is then fetched with our own key like any poll.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from esim_common.order_states import OrderStatus

S = OrderStatus

# ------------------------------------------------------------------------------ Zendit transaction ids

# Zendit has no idempotency header and reusing a transactionId is undocumented: each attempt gets its
# own id derived from our order id, `<txn>` first and `<txn>-r<n>` after a FAILED attempt.
RETRY_ID_SEPARATOR = "-r"

# An attempt ends FAILED with INSUFFICIENT_FUNDS when the wallet was short after all; funding then
# tops up again. Three rounds cover a race with another order's debit; more means the balance check
# and Zendit disagree for good, and looping would hold the customer's money indefinitely.
MAX_PURCHASE_ATTEMPTS = 3


def zendit_transaction_id(transaction_id: str, attempt: int) -> str:
    """The Zendit `transactionId` of attempt `attempt` (1-based) of our order `transaction_id`."""
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    if attempt == 1:
        return transaction_id
    return f"{transaction_id}{RETRY_ID_SEPARATOR}{attempt}"


def current_zendit_id(transaction_id: str, recorded: str | None, attempts: int) -> str:
    """The Zendit id of the order's current attempt: the one recorded with it (`start_attempt` sets
    both in one transaction), else derived, so that a hand-edited row still maps to its purchase."""
    return recorded or zendit_transaction_id(transaction_id, max(attempts, 1))


# ------------------------------------------------------------------------------ what a message asks of us


class Step(StrEnum):
    """What an `order.funded` delivery means for an order in a given state."""

    START = "start"  # funded: open a new purchase attempt
    CONTINUE = "continue"  # purchasing: look at (or place) the current attempt's purchase
    ANNOUNCE = "announce"  # provisioned/delivered: re-publish order.provisioned (heals a lost publish)
    FUND_AGAIN = "fund_again"  # back in funding after INSUFFICIENT_FUNDS: re-publish order.paid
    FINISH_REFUND = "finish_refund"  # purchase failed, refund not finished: resume the compensation
    ALERT = "alert"  # needs_attention: publish its operator alert if that is still pending (lost publish)
    IGNORE = "ignore"  # nothing for provisioning to do (not funded yet, or already failed for good)


def next_step(status: OrderStatus, purchase_attempts: int) -> Step:
    """Idempotency in one table: every state an order can be in when `order.funded` (re)arrives."""
    if status == S.FUNDED:
        return Step.START
    if status == S.PURCHASING:
        return Step.CONTINUE
    if status in (S.PROVISIONED, S.DELIVERED):
        return Step.ANNOUNCE
    # Orders reach these states through provisioning only once a purchase was attempted; without an
    # attempt they belong to funding (a first funding round or a top-up failure), not to us.
    if purchase_attempts >= 1 and status == S.FUNDING:
        return Step.FUND_AGAIN
    if purchase_attempts >= 1 and status in (S.PURCHASE_FAILED, S.REFUND_PENDING):
        return Step.FINISH_REFUND
    if purchase_attempts >= 1 and status == S.NEEDS_ATTENTION:
        return Step.ALERT
    return Step.IGNORE


def awaits_purchase(status: OrderStatus, current_zendit_id: str | None, zendit_id: str) -> bool:
    """Whether the order is still waiting for Zendit purchase `zendit_id` to finish.

    Only then may a final purchase settle it: once one worker (the scheduled poll or a webhook hint)
    has settled the attempt, or the order has moved on to a later attempt, the same purchase seen
    again by another worker must change nothing.
    """
    return status == S.PURCHASING and current_zendit_id == zendit_id


# ------------------------------------------------------------------------------ a purchase's outcome

DONE = "DONE"
FAILED = "FAILED"
INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"


class Outcome(StrEnum):
    PENDING = "pending"  # ACCEPTED, PENDING, AUTHORIZED, IN_PROGRESS: check again later
    DONE = "done"
    FUND_AGAIN = "fund_again"  # FAILED for lack of wallet funds, attempts left
    FAILED = "failed"  # FAILED for good: refund


def outcome_of(status: str, error_code: str | None, attempt: int) -> Outcome:
    if status == DONE:
        return Outcome.DONE
    if status != FAILED:
        return Outcome.PENDING
    if error_code == INSUFFICIENT_FUNDS and attempt < MAX_PURCHASE_ATTEMPTS:
        return Outcome.FUND_AGAIN
    return Outcome.FAILED


def purchase_failure_reason(error_code: str | None) -> str:
    """`zendit_product_unavailable` for a purchase that ended FAILED with PRODUCT_UNAVAILABLE."""
    return f"zendit_{(error_code or 'failed').lower()}"


def refund_is_safe(status: OrderStatus) -> bool:
    """Refund only an order that was moved to purchase_failed (under its row lock, when Zendit said
    FAILED or refused the POST and a GET found nothing) or whose refund has begun.

    The state decides, never the failure's reason: anything else reaching the failure path — retries
    used up after the purchase may have been DONE, a purchase we cannot read, a permanent error whose
    code happens to read `zendit_*` — must not give the money back while the customer may also get
    the eSIM: an operator looks at it instead.
    """
    return status in (S.PURCHASE_FAILED, S.REFUND_PENDING)


# ------------------------------------------------------------------------------ when to look again

# Zendit finishes ~99% of purchases within 15 s and suggests polling about once a second.
FAST_POLL_WINDOW_SECONDS = 15.0
FAST_POLL_SECONDS = 1.0
# A purchase still open after that waits on a supplier; a few minutes of 3 s checks catch the
# stragglers quickly without hammering the API.
MEDIUM_POLL_WINDOW_SECONDS = 180.0
MEDIUM_POLL_SECONDS = 3.0
# A supplier outage: Zendit keeps retrying for up to 24 h; 10 s (the longest delay tier) is plenty.
SLOW_POLL_SECONDS = 10.0


# While Zendit's webhook hints reach us, a finished purchase is settled by its hint within moments, and
# a look after 1 s mostly finds the order settled already: a publish, a delivery and a few transactions
# for nothing. So the first look waits for the 3 s delay tier instead (the consumer rounds a delay down
# to a tier: 1, 3, 10 s); it still comes, should this purchase's hint be lost, and the looks after it
# are the usual ones.
HINTED_FIRST_POLL_SECONDS = 3.0
# Nothing in our configuration says whether Zendit's console sends webhooks to us (ZENDIT_WEBHOOK_SECRET
# always has a value): a hint received this recently is the evidence. Once hints stop, polling is back
# to every second within this long.
HINTS_RECENT_SECONDS = 60.0


def poll_delay(elapsed_seconds: float, *, hints_arrive: bool = False) -> float:
    """Seconds until the next look at a purchase placed `elapsed_seconds` ago; `hints_arrive`: Zendit's
    webhook hints have been reaching us lately (`HINTS_RECENT_SECONDS`)."""
    if hints_arrive and elapsed_seconds < HINTED_FIRST_POLL_SECONDS:
        return HINTED_FIRST_POLL_SECONDS
    if elapsed_seconds < FAST_POLL_WINDOW_SECONDS:
        return FAST_POLL_SECONDS
    if elapsed_seconds < MEDIUM_POLL_WINDOW_SECONDS:
        return MEDIUM_POLL_SECONDS
    return SLOW_POLL_SECONDS


@dataclass(frozen=True)
class CheckAgain:
    delay_seconds: float


@dataclass(frozen=True)
class DeadlinePassed:
    waited_seconds: float


DEADLINE_REASON = "purchase_deadline_exceeded"
# Zendit delivered (DONE) but the QR code could not be stored, or Zendit's image fetched as the
# fallback, before the same deadline: storage or Zendit was down all that time.
QR_DEADLINE_REASON = "qr_storage_deadline_exceeded"
# A DONE purchase without the activation data a QR code is made of: only a person can get it.
CONFIRMATION_INCOMPLETE_REASON = "confirmation_incomplete"


def next_check(
    elapsed_seconds: float, deadline_seconds: float, *, hints_arrive: bool = False
) -> CheckAgain | DeadlinePassed:
    """Keep waiting for a purchase that is not final, or hand it to an operator at the deadline."""
    if elapsed_seconds >= deadline_seconds:
        return DeadlinePassed(waited_seconds=elapsed_seconds)
    return CheckAgain(delay_seconds=poll_delay(elapsed_seconds, hints_arrive=hints_arrive))


def hints_arrive(seconds_since_last_hint: float | None) -> bool:
    """Whether Zendit's webhook hints reach us, judged by the last one (None: none yet)."""
    return seconds_since_last_hint is not None and seconds_since_last_hint < HINTS_RECENT_SECONDS


# ------------------------------------------------------------------------------ which QR code is delivered

# The order's failure reason when no QR code can be shown to read as the LPA string (the order is
# still purchasing, so never refunded: Zendit delivered; an operator sends the activation data by hand).
QR_UNVERIFIED_REASON = "qr_unverified"
# ZENDIT_QR_CROSS_CHECK found Zendit's own QR image reading as something else than what we delivered
# (an `operator.alert` of kind `qr_mismatch`; the order itself is delivered).
QR_MISMATCH_REASON = "qr_mismatch_zendit"
# The cross-check is auxiliary: it may hold up a delivery this long at most (not the full Zendit timeout).
CROSS_CHECK_TIMEOUT_SECONDS = 3.0


class QrCheck(StrEnum):
    """What a QR image was found to hold, compared with the purchase's LPA string."""

    MATCH = "match"  # exactly one code, reading exactly the LPA string
    MISMATCH = "mismatch"  # a code reading something else (or more than one code)
    UNREADABLE = "unreadable"  # no code found in the image
    UNAVAILABLE = "unavailable"  # Zendit did not give us its image


def qr_check(decoded: Sequence[str], lpa: str) -> QrCheck:
    """Compare the texts decoded from an image with the LPA string; nothing else is good enough."""
    if list(decoded) == [lpa]:
        return QrCheck.MATCH
    return QrCheck.MISMATCH if decoded else QrCheck.UNREADABLE


class QrSource(StrEnum):
    OURS = "ours"
    ZENDIT = "zendit"


def qr_to_deliver(ours_verified: bool, zendit: QrCheck | None) -> QrSource | None:
    """Whose QR image the customer gets; None: neither may be sent, an operator must act.

    Ours whenever it read back as the LPA string: the activation data in Zendit's confirmation is the
    source of truth, and our image is proven to carry exactly that. Zendit's only as the fallback,
    and only when it too reads as exactly that string (`zendit` is None when it was not looked at).
    """
    if ours_verified:
        return QrSource.OURS
    if zendit == QrCheck.MATCH:
        return QrSource.ZENDIT
    return None


def cross_check_alerts(check: QrCheck) -> bool:
    """Whether ZENDIT_QR_CROSS_CHECK's look at Zendit's image calls for an operator.

    Only a code that reads as another string: Zendit disagrees with its own confirmation (or our LPA
    building is wrong), which a person must look at. Our verified code is still delivered — it holds
    the confirmation's activation data — so the customer does not wait for an auxiliary image.
    An image without a readable code, or none at all, proves nothing either way: counted, not alerted.
    """
    return check == QrCheck.MISMATCH


def shareable_qr_url(url: str) -> str:
    """`url` without its query and fragment: what an event may carry. A signed Storage URL's `?token=`
    is a bearer capability to the customer's activation QR; it stays in the database, never in a message."""
    return url.split("#", 1)[0].split("?", 1)[0]
