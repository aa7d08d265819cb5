"""The emulator's in-memory world: wallet, purchases, ledger, top-ups, and injected failures.

Purchases progress ACCEPTED → PENDING → AUTHORIZED → IN_PROGRESS → DONE over `delay` seconds, derived
from the injected clock (`now`) each time the state is read — no background tasks, so a test that owns
the clock decides exactly when each step happens. Steps of all purchases are applied in time order,
which makes holds and INSUFFICIENT_FUNDS deterministic when purchases compete for the balance. Only
purchases with a step still to come are looked at (a heap of next steps by due time), so reading the
state costs the same after ten purchases as after ten thousand.

Wallet amounts are integers in the wallet's `currencyDivisor`; `available = balance - holds`.
The opening balance and `set_balance` overrides are not ledger rows (they are sandbox controls).
All methods take a lock: the server thread and a test thread may both touch the state.
"""

from __future__ import annotations

import heapq
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from esim_common.money import InexactConversion, from_zendit, minor_unit_exponent, to_zendit

from .activation import new_confirmation
from .catalogue import fresh_catalogue

Clock = Callable[[], datetime]

# The four steps after ACCEPTED, each at an equal fraction of the purchase delay.
STEPS = ("PENDING", "AUTHORIZED", "IN_PROGRESS", "DONE")
FINAL = ("DONE", "FAILED")
# One string per status, shared by every purchase's log.
STATUS_MESSAGES = {
    "ACCEPTED": "Transaction accepted",
    **{status: f"Transaction {status.lower().replace('_', ' ')}" for status in STEPS},
}
# Candidate steps are taken from the heap up to this far past `now`, then checked exactly as
# "due_at(step) <= elapsed": float rounding of absolute timestamps must not delay or advance a step.
_DUE_SLACK_SECONDS = 1e-3

ERROR_TEXT = {
    "INSUFFICIENT_FUNDS": ("Insufficient funds", "Wallet balance is lower than the transaction cost"),
    "PRODUCT_UNAVAILABLE": ("Product unavailable", "The supplier could not fulfil this offer"),
    "CURRENCY_MISMATCH": ("Currency mismatch", "The offer cost currency differs from the wallet currency"),
}


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class PurchaseRule:
    """Applies to the next `remaining` purchases (of `offer_id`, if set): fail with `code`, or stall."""

    kind: str  # "fail" | "stall"
    remaining: int
    code: str = ""
    message: str = ""
    offer_id: str | None = None


@dataclass
class Fault:
    """The next `remaining` calls of `endpoint` ("*" = any) sleep, then answer `status` (None = normally).

    `when="after"` performs the call's effect first: the "it landed but the client never heard" case.
    """

    endpoint: str
    remaining: int
    status: int | None = 500
    sleep_seconds: float = 0.0
    when: str = "before"


@dataclass(slots=True)
class PurchaseRecord:
    transaction_id: str
    offer: dict[str, Any]
    created_at: datetime
    delay: float
    seq: int
    cost: int  # what the wallet is charged, in the offer's cost divisor
    wallet_cost: int | None  # the same in wallet units; None when the currencies differ
    iccid: str | None = None
    fate: PurchaseRule | None = None
    status: str = "ACCEPTED"
    steps_done: int = 0
    updated_at: datetime | None = None
    confirmation: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    # (dateTime, status, statusMessage) per status change: tuples and shared strings, rendered on reads.
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def due_at(self, step: int) -> float:
        """Seconds after creation at which step `step` (1..4) happens."""
        return self.delay * step / len(STEPS)


@dataclass
class TopupRecord:
    topup_id: str
    reference: str
    amount: int  # ISO minor units of `currency`
    currency: str
    status: str  # SUCCEEDED | DECLINED
    card_last4: str
    created_at: datetime
    decline_reason: str | None = None
    authorization_id: str | None = None


class ZenditState:
    def __init__(
        self,
        *,
        api_key: str,
        topup_api_key: str,
        wallet_balance: int,
        wallet_currency: str,
        purchase_delay_seconds: float,
        now: Clock = utc_now,
    ) -> None:
        self.api_key = api_key
        self.topup_api_key = topup_api_key
        self.wallet_currency = wallet_currency.upper()
        self.wallet_divisor = 10 ** minor_unit_exponent(self.wallet_currency)
        self.now = now
        self._lock = threading.RLock()
        self._initial = (wallet_balance, purchase_delay_seconds)
        # transactionId → its status when a watcher last looked, for purchases changed since (None: it
        # did not exist); None while nobody watches. See `watch_statuses`.
        self._changed: dict[str, str | None] | None = None
        self.purchases: dict[str, PurchaseRecord] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the state `create_app` made: catalogue, balance, delay; no purchases, rules or faults."""
        with self._lock:
            for record in self.purchases.values():
                self._note_change(record.transaction_id, record.status)  # a watcher sees them vanish
            self.balance, self.purchase_delay_seconds = self._initial
            self.offers = fresh_catalogue()
            self.holds: dict[str, int] = {}
            self.purchases = {}
            # (due time, seq, step, record): the next step of every purchase that has one to come.
            # Entries of purchases finished meanwhile (resolve) are dropped when they come up.
            self._next_steps: list[tuple[float, int, int, PurchaseRecord]] = []
            self.topups: dict[str, TopupRecord] = {}
            self.credits: list[dict[str, Any]] = []
            self.purchase_rules: list[PurchaseRule] = []
            self.faults: list[Fault] = []
            # transactionId → what its qrcode endpoint serves (activation.QR_IMAGES); "real" when absent.
            self.qr_images: dict[str, str] = {}
            self._seq = 0

    # -- wallet --------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        with self._lock:
            return self.balance - sum(self.holds.values())

    def set_balance(self, balance: int) -> None:
        with self._lock:
            self.advance()  # steps already due happen before the change, as they would have in time
            self.balance = balance

    def credit_topup(self, record: TopupRecord) -> None:
        """A SUCCEEDED top-up: raise the balance and write the CREDIT ledger row."""
        wallet_amount = to_zendit(
            from_zendit(record.amount, record.currency, 10 ** minor_unit_exponent(record.currency)),
            self.wallet_divisor,
        )
        with self._lock:
            self.advance()
            self.topups[record.reference] = record
            self.balance += wallet_amount
            stamp = rfc3339(record.created_at)
            self.credits.append(
                {
                    "transactionId": record.topup_id,
                    "type": "CREDIT",
                    "productType": "WALLET_RECHARGE",
                    "status": "DONE",
                    "amount": wallet_amount,
                    "currency": self.wallet_currency,
                    "log": [
                        {"dateTime": stamp, "status": "DONE", "statusMessage": "Wallet recharged by card"}
                    ],
                    "createdAt": stamp,
                    "updatedAt": stamp,
                }
            )

    def record_declined_topup(self, record: TopupRecord) -> None:
        with self._lock:
            self.topups[record.reference] = record

    # -- injected failures ---------------------------------------------------------------------------
    def add_purchase_rule(self, rule: PurchaseRule) -> None:
        with self._lock:
            self.purchase_rules.append(rule)

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear_injections(self) -> None:
        with self._lock:
            self.faults.clear()
            self.purchase_rules.clear()
            self.qr_images.clear()

    def set_qr_image(self, transaction_id: str, image: str) -> None:
        """What `GET /esim/purchases/{transaction_id}/qrcode` serves; the purchase need not exist yet."""
        with self._lock:
            if image == "real":
                self.qr_images.pop(transaction_id, None)
            else:
                self.qr_images[transaction_id] = image

    def take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.endpoint in (endpoint, "*"):
                    fault.remaining -= 1
                    return fault
            return None

    def _take_purchase_rule(self, offer_id: str) -> PurchaseRule | None:
        for rule in self.purchase_rules:
            if rule.remaining > 0 and rule.offer_id in (None, offer_id):
                rule.remaining -= 1
                return rule
        return None

    # -- purchases -----------------------------------------------------------------------------------
    def create_purchase(
        self, transaction_id: str, offer: dict[str, Any], iccid: str | None
    ) -> PurchaseRecord:
        cost_obj = offer["cost"]
        cost = cost_obj["fixed"] + cost_obj.get("fee", 0)
        wallet_cost: int | None = None
        if cost_obj["currency"] == self.wallet_currency:
            try:
                money = from_zendit(cost, cost_obj["currency"], cost_obj["currencyDivisor"])
                wallet_cost = to_zendit(money, self.wallet_divisor)
            except InexactConversion:
                wallet_cost = None
        with self._lock:
            self._seq += 1
            created = self.now()
            record = PurchaseRecord(
                transaction_id=transaction_id,
                offer=offer,
                created_at=created,
                delay=self.purchase_delay_seconds,
                seq=self._seq,
                cost=cost,
                wallet_cost=wallet_cost,
                iccid=iccid,
                fate=self._take_purchase_rule(offer["offerId"]),
                updated_at=created,
            )
            self._note_change(transaction_id, None)
            self._log(record, "ACCEPTED", STATUS_MESSAGES["ACCEPTED"], created)
            self.purchases[transaction_id] = record
            self._schedule(record, 1)
            return record

    def _schedule(self, record: PurchaseRecord, step: int) -> None:
        when = record.due_at(step) + record.created_at.timestamp()
        heapq.heappush(self._next_steps, (when, record.seq, step, record))

    def advance(self) -> None:
        """Apply every purchase step whose time has come, across purchases in time order.

        Costs O(steps due · log pending): finished and stalled purchases are not in the heap.
        """
        with self._lock:
            now = self.now()
            horizon = now.timestamp() + _DUE_SLACK_SECONDS
            not_yet: list[tuple[float, int, int, PurchaseRecord]] = []
            heap = self._next_steps
            while heap and heap[0][0] <= horizon:
                entry = heapq.heappop(heap)
                _, _, step, record = entry
                if record.status in FINAL or step != record.steps_done + 1:
                    continue  # finished meanwhile (resolve): the entry is stale
                if record.due_at(step) > (now - record.created_at).total_seconds():
                    not_yet.append(entry)  # within the slack only; due on a later call
                    continue
                self._apply_step(record, step, now)
                if record.status not in FINAL and record.steps_done == step:
                    self._schedule(record, step + 1)
                # else FAILED, DONE, or stalled before DONE: resolve() finishes a stalled one
            for entry in not_yet:
                heapq.heappush(heap, entry)

    def _apply_step(self, record: PurchaseRecord, step: int, now: datetime) -> None:
        at = datetime.fromtimestamp(record.created_at.timestamp() + record.due_at(step), UTC)
        at = min(at, now)
        status = STEPS[step - 1]
        fate = record.fate
        if status == "AUTHORIZED":
            if fate is not None and fate.kind == "fail" and fate.code == "INSUFFICIENT_FUNDS":
                return self._fail(record, "INSUFFICIENT_FUNDS", fate.message, at)
            if record.wallet_cost is None:
                return self._fail(record, "CURRENCY_MISMATCH", "", at)
            if self.available < record.wallet_cost:
                return self._fail(record, "INSUFFICIENT_FUNDS", "", at)
            self.holds[record.transaction_id] = record.wallet_cost
        if status == "DONE":
            if fate is not None and fate.kind == "stall":
                return  # stays IN_PROGRESS until resolve() — a supplier outage
            if fate is not None and fate.kind == "fail":
                return self._fail(record, fate.code, fate.message, at)
            self.balance -= self.holds.pop(record.transaction_id)
            record.confirmation = new_confirmation(record.iccid)
        record.steps_done = step
        self._set_status(record, status, STATUS_MESSAGES[status], at)

    def _fail(self, record: PurchaseRecord, code: str, message: str, at: datetime) -> None:
        self.holds.pop(record.transaction_id, None)  # a FAILED purchase releases its hold
        default_message, description = ERROR_TEXT.get(code, (code.replace("_", " ").capitalize(), ""))
        record.error = {"code": code, "message": message or default_message, "description": description}
        record.steps_done = len(STEPS)
        self._set_status(record, "FAILED", record.error["message"], at)

    def _set_status(self, record: PurchaseRecord, status: str, message: str, at: datetime) -> None:
        self._note_change(record.transaction_id, record.status)
        record.status = status
        record.updated_at = at
        self._log(record, status, message, at)

    def resolve(
        self, transaction_id: str, *, status: str, code: str = "", message: str = ""
    ) -> PurchaseRecord:
        """Finish a stalled purchase (DONE or FAILED), as Zendit does when a supplier recovers."""
        with self._lock:
            self.advance()
            record = self.purchases[transaction_id]
            if record.status in FINAL:
                return record
            if status == "FAILED":
                self._fail(record, code or "PRODUCT_UNAVAILABLE", message, self.now())
            else:
                record.fate = None
                if record.status == "IN_PROGRESS":
                    self._apply_step(record, len(STEPS), self.now())
            return record

    @staticmethod
    def _log(record: PurchaseRecord, status: str, message: str, at: datetime) -> None:
        record.log.append((rfc3339(at), status, message))

    @staticmethod
    def _log_json(record: PurchaseRecord) -> list[dict[str, str]]:
        return [
            {"dateTime": stamp, "status": status, "statusMessage": message}
            for stamp, status, message in record.log
        ]

    # -- status changes, for the webhook sender ------------------------------------------------------
    def _note_change(self, transaction_id: str, seen: str | None) -> None:
        """About to change `transaction_id` from status `seen`: kept if it is the first change since the
        watcher last looked."""
        if self._changed is not None:
            self._changed.setdefault(transaction_id, seen)

    def watch_statuses(self) -> None:
        """Start (or restart) noting status changes for `status_changes`; earlier ones are not reported."""
        with self._lock:
            self.advance()
            self._changed = {}

    def unwatch_statuses(self) -> None:
        with self._lock:
            self._changed = None

    def status_changes(self) -> list[tuple[str, str]]:
        """(transactionId, status now) of each purchase whose status differs from the last look, in
        creation order, due steps applied first. Purchases removed by a reset are forgotten; one that
        moved through several statuses since is reported once, with the latest."""
        with self._lock:
            self.advance()
            if self._changed is None:
                return []
            changed, self._changed = self._changed, {}
            records = [
                record
                for transaction_id, seen in changed.items()
                if (record := self.purchases.get(transaction_id)) is not None and record.status != seen
            ]
            return [(record.transaction_id, record.status) for record in sorted(records, key=_by_seq)]

    # -- views (Zendit JSON shapes) ------------------------------------------------------------------
    def purchase_json(self, record: PurchaseRecord) -> dict[str, Any]:
        offer = record.offer
        body: dict[str, Any] = {
            key: offer[key]
            for key in (
                "offerId",
                "brand",
                "brandName",
                "country",
                "regions",
                "dataGB",
                "dataSpeeds",
                "dataUnlimited",
                "durationDays",
                "notes",
                "shortNotes",
                "priceType",
                "productType",
                "roaming",
                "smsNumber",
                "smsUnlimited",
                "subTypes",
                "voiceMinutes",
                "voiceUnlimited",
            )
        }
        body.update(
            {
                "transactionId": record.transaction_id,
                "status": record.status,
                "cost": record.cost,
                "costCurrency": offer["cost"]["currency"],
                "costCurrencyDivisor": offer["cost"]["currencyDivisor"],
                "price": offer["price"]["fixed"],
                "priceCurrency": offer["price"]["currency"],
                "priceCurrencyDivisor": offer["price"]["currencyDivisor"],
                "log": self._log_json(record),
                "createdAt": rfc3339(record.created_at),
                "updatedAt": rfc3339(record.updated_at or record.created_at),
            }
        )
        if record.confirmation is not None:
            body["confirmation"] = dict(record.confirmation)
        if record.error is not None:
            body["error"] = dict(record.error)
        return body

    def purchase_view(self, transaction_id: str) -> dict[str, Any] | None:
        """GET /esim/purchases/{id}'s body now, or None for an unknown purchase."""
        with self._lock:
            self.advance()
            record = self.purchases.get(transaction_id)
            return self.purchase_json(record) if record is not None else None

    def ledger(self) -> list[dict[str, Any]]:
        """dto.Transaction rows, newest first: CREDIT per top-up, DEBIT per purchase (its current status)."""
        with self._lock:
            rows = list(self.credits)
            for record in self.purchases.values():
                row = {
                    "transactionId": record.transaction_id,
                    "type": "DEBIT",
                    "productType": "ESIM",
                    "status": record.status,
                    # A cost the wallet cannot pay (other currency) is shown as Zendit stated it.
                    "amount": record.wallet_cost if record.wallet_cost is not None else record.cost,
                    "currency": self.wallet_currency
                    if record.wallet_cost is not None
                    else record.offer["cost"]["currency"],
                    "log": self._log_json(record),
                    "createdAt": rfc3339(record.created_at),
                    "updatedAt": rfc3339(record.updated_at or record.created_at),
                }
                if record.error is not None:
                    row["error"] = dict(record.error)
                rows.append(row)
            return sorted(rows, key=lambda row: row["createdAt"], reverse=True)

    def snapshot(self) -> dict[str, Any]:
        """Everything a test or an operator wants to see (`GET /_sandbox/state`); never card data."""
        with self._lock:
            self.advance()
            return {
                "wallet": {
                    "balance": self.balance,
                    "available": self.available,
                    "holds": dict(self.holds),
                    "currency": self.wallet_currency,
                    "currencyDivisor": self.wallet_divisor,
                },
                "purchaseDelaySeconds": self.purchase_delay_seconds,
                "purchases": {
                    tid: {"status": r.status, "offerId": r.offer["offerId"], "error": r.error}
                    for tid, r in self.purchases.items()
                },
                "topups": {
                    ref: {
                        "topupId": t.topup_id,
                        "status": t.status,
                        "amount": t.amount,
                        "currency": t.currency,
                        "cardLast4": t.card_last4,
                        "declineReason": t.decline_reason,
                    }
                    for ref, t in self.topups.items()
                },
                "purchaseRules": [vars(rule).copy() for rule in self.purchase_rules if rule.remaining > 0],
                "qrImages": dict(self.qr_images),
                "faults": [vars(fault).copy() for fault in self.faults if fault.remaining > 0],
            }


def _by_seq(record: PurchaseRecord) -> int:
    return record.seq


def new_topup_id() -> str:
    return f"topup_{uuid.uuid4().hex[:24]}"
