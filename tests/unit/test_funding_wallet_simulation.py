"""The funding rules under random schedules (a scorecard R9 property test, on the pure rules).

Orders arrive, decide (one at a time, as the wallet lock makes them), top-ups land, and Zendit debits
purchases — in an order drawn from a seeded random generator, 300 schedules; with batches, a decision
that funds its order funds every waiting order the money pays for (domain.batch_to_fund), bar the ones
busy with a top-up still open (they started or joined it: domain.busy_with_topups). Whatever the
schedule: money goes in payment order (no decision funds an order while an order paid before it is
left unfunded, unless that one is busy and its cost set aside), the money promised to funded orders
never exceeds what the wallet holds, the wallet never goes below zero, every order is funded in the
end, and the number of top-ups stays within ceil(total shortfall / ZENDIT_MIN_TOPUP) + 1 (the issue's
bound).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from esim_common.money import Money
from funding.domain import (
    Fund,
    NewTopup,
    Short,
    UnsettledTopup,
    WaitForTopup,
    WaitingOrder,
    WalletBook,
    batch_to_fund,
    busy_with_topups,
    decide_funding,
)

MIN_TOPUP = 5_000
MAX_TOPUP = 100_000


def usd(amount: int) -> Money:
    return Money(amount, "USD")


@dataclass
class World:
    available: int  # Zendit's availableBalance
    costs: dict[str, int]  # every order, in payment order
    arrived: list[str] = field(default_factory=list)  # paid, waiting for money (payment order)
    funded: list[str] = field(default_factory=list)  # promised money, not debited by Zendit yet
    debited: list[str] = field(default_factory=list)
    # (amount, the order that started it, the orders that joined it)
    open_topups: list[tuple[int, str, list[str]]] = field(default_factory=list)
    topups: int = 0
    topped_up: int = 0
    batches: bool = False

    def book(self) -> WalletBook:
        return WalletBook(
            available=usd(self.available),
            reserved=usd(sum(self.costs[t] for t in self.funded)),
            incoming=usd(sum(amount for amount, _, _ in self.open_topups)),
            waiting=tuple(WaitingOrder(t, usd(self.costs[t])) for t in self.arrived),
        )

    def decide(self, txn: str) -> None:
        book = self.book()
        decision = decide_funding(
            book, txn, usd(self.costs[txn]), can_top_up=True, min_topup=MIN_TOPUP, max_topup=MAX_TOPUP
        )
        if isinstance(decision, Fund):
            busy = busy_with_topups(self.arrived, self.unsettled())
            batch = batch_to_fund(book, txn, busy) if self.batches else [txn]
            assert_payment_order(book, batch, busy if self.batches else set(self.arrived))
            for funded in batch:
                self.arrived.remove(funded)
                self.funded.append(funded)
        elif isinstance(decision, NewTopup):
            assert MIN_TOPUP <= decision.amount.amount <= MAX_TOPUP
            self.open_topups.append((decision.amount.amount, txn, []))
            self.topups += 1
        else:
            assert isinstance(decision, WaitForTopup), decision
            assert not isinstance(decision, Short)
            joined = self.open_topups[-1][2]  # it joins the latest top-up on its way, as _decide does
            if txn not in joined:
                joined.append(txn)

    def unsettled(self) -> list[UnsettledTopup]:
        return [
            UnsettledTopup(f"sim-{n}", starter, (starter, *joined), is_open=True)
            for n, (_, starter, joined) in enumerate(self.open_topups)
        ]


def assert_payment_order(book: WalletBook, funded: list[str], may_wait: set[str]) -> None:
    """Money goes in payment order: every waiting order paid before the last one funded is funded too,
    or it may wait (`may_wait`: busy with a top-up in a batch; anyone when orders decide one by one) and
    its cost is set aside — the free money covers it along with the funded ones."""
    line = [w.transaction_id for w in book.waiting]
    up_to_last = line[: max(line.index(t) for t in funded) + 1]
    left = [t for t in up_to_last if t not in funded]
    assert set(left) <= may_wait, ("an earlier order was passed over", left)
    cost = sum(w.cost.amount for w in book.waiting if w.transaction_id in up_to_last)
    assert cost <= book.free.amount, ("a later order took the money of an earlier one", left)


def run(seed: int, *, batches: bool) -> World:
    rng = random.Random(seed)
    orders = {f"o{i:02d}": rng.choice([735, 1_300, 2_415, 4_990, 9_000]) for i in range(rng.randint(1, 40))}
    world = World(available=rng.choice([0, 1_000, 10_000, 50_000]), costs=orders, batches=batches)
    not_arrived = list(orders)
    for _ in range(20_000):
        if not (not_arrived or world.arrived or world.funded or world.open_topups):
            return world
        moves = []
        if not_arrived:
            moves.append("arrive")
        if world.arrived:
            moves.append("decide")
        if world.open_topups:
            moves.append("topup_lands")
        if world.funded:
            moves.append("debit")
        move = rng.choice(moves)
        if move == "arrive":
            world.arrived.append(not_arrived.pop(0))  # payment order is arrival order
        elif move == "decide":
            world.decide(rng.choice(world.arrived))
        elif move == "topup_lands":
            amount, _, _ = world.open_topups.pop(rng.randrange(len(world.open_topups)))
            world.available += amount
            world.topped_up += amount
        else:
            txn = world.funded.pop(rng.randrange(len(world.funded)))
            world.available -= world.costs[txn]
            world.debited.append(txn)
        # Never over-promised, never overdrawn.
        assert sum(world.costs[t] for t in world.funded) <= world.available, (seed, move)
        assert world.available >= 0
    raise AssertionError(f"seed {seed}: the schedule did not finish")


@pytest.mark.parametrize("batches", [False, True], ids=["one_by_one", "batches"])
@pytest.mark.parametrize("seed", range(300))
def test_random_schedules_never_overdraw_fund_everyone_and_bound_the_topups(seed, batches):
    world = run(seed, batches=batches)
    total = sum(world.costs.values())
    start = world.available - world.topped_up + total
    assert sorted(world.debited) == sorted(world.costs)  # everyone funded, then bought
    shortfall = max(total - start, 0)
    assert world.topups <= math.ceil(shortfall / MIN_TOPUP) + 1, (seed, world.topups, shortfall)
    # What was added beyond the shortfall is less than one minimum top-up (the rounding), bar the +1.
    assert world.topped_up - shortfall < 2 * MIN_TOPUP
