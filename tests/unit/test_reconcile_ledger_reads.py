"""How the ledger checks read Zendit: whole windows page by page, and a balance only with a ledger that
did not move around it."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from esim_common.providers.zendit import ZenditClient
from reconcile import ledger_checks

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
SINCE = datetime(2026, 11, 27, 12, 0, 0, 750_000, tzinfo=UTC)


def debit(txn: str, status: str = "DONE") -> dict[str, object]:
    return {
        "transactionId": txn,
        "type": "DEBIT",
        "productType": "ESIM",
        "status": status,
        "amount": 2415,
        "currency": "USD",
        "createdAt": "2026-11-30T11:00:00Z",
    }


class FakeZendit:
    """Answers /balance and /transactions; `ledgers` is what each successive full ledger read returns."""

    def __init__(self, ledgers: list[list[dict[str, object]]], page: int = 2) -> None:
        self.ledgers = ledgers
        self.page = page
        self.reads = 0
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/balance"):
            return httpx.Response(
                200, json={"availableBalance": 5000, "currency": "USD", "currencyDivisor": 100}
            )
        rows = self.ledgers[min(self.reads, len(self.ledgers) - 1)]
        offset, limit = int(request.url.params["_offset"]), int(request.url.params["_limit"])
        if offset + limit >= len(rows):
            self.reads += 1  # this read of the whole ledger is complete
        return httpx.Response(
            200,
            json={
                "list": rows[offset : offset + min(limit, self.page)],
                "limit": limit,
                "offset": offset,
                "total": len(rows),
            },
        )

    def client(self) -> ZenditClient:
        return ZenditClient(
            base_url="http://zendit.test/v1", api_key="k", transport=httpx.MockTransport(self.handle)
        )


async def test_the_ledger_window_is_read_page_by_page_from_its_start():
    fake = FakeZendit([[debit("a"), debit("b"), debit("c")]])
    async with fake.client() as zendit:
        read = await ledger_checks.zendit_ledger(zendit, SINCE, NOW)
    assert [row.transaction_id for row in read.rows] == ["a", "b", "c"]
    assert read.wallet.available == 5000
    pages = [r.url.params for r in fake.requests if r.url.path.endswith("/transactions")]
    assert [p["_offset"] for p in pages] == ["0", "2", "0", "2"]  # two pages, read twice
    assert {p["createdAt"] for p in pages} == {"gte2026-11-27T12:00:00Z"}  # rounded down, never later


async def test_a_ledger_that_moved_around_the_balance_is_read_again():
    moving = [debit("a", "AUTHORIZED")]
    settled = [debit("a", "FAILED")]
    fake = FakeZendit([moving, settled, settled, settled], page=10)
    async with fake.client() as zendit:
        read = await ledger_checks.zendit_ledger(zendit, SINCE, NOW)
    assert [row.status for row in read.rows] == ["FAILED"]
    balances = [r for r in fake.requests if r.url.path.endswith("/balance")]
    assert len(balances) == 2


async def test_a_ledger_that_never_keeps_still_fails_the_source_rather_than_guess():
    fake = FakeZendit([[debit("a", s)] for s in ("AUTHORIZED", "FAILED") * 5], page=10)
    async with fake.client() as zendit:
        with pytest.raises(Exception, match="kept changing"):
            await ledger_checks.zendit_ledger(zendit, SINCE, NOW)
