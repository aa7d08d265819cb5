"""When an in-flight order counts as stuck, and how often the sweep may re-drive it. No I/O.

An order is stuck when it has not changed (`updated_at`) for longer than its state's deadline: past
every timer of the service that owns that state, so a re-drive never competes with a wait that is still
running, and the owner's own look at the order (re-driven) then moves it on or hands it to an operator.

    state            owner          deadline                          why
    paid             funding        10 min                            order.paid is taken in ms; the
    funding          funding        10 min                            retry tiers end after 14 s and a
    funded           provisioning   10 min                            top-up within a few provider
                                                                      timeouts (funding's relay publishes
                                                                      an unpublished order.funded after
                                                                      30-40 s)
    awaiting_funds   funding        AWAITING_FUNDS_MAX_AGE + margin   re-checked every few seconds until
                                                                      then, and refunded at that age
    purchasing       provisioning   PURCHASE_DEADLINE_SECONDS + margin  polled until then, then handed
                                                                      to an operator
    provisioned      notify         EMAIL_GIVE_UP_SECONDS + margin    an SMTP outage is waited out until
                                                                      then, then handed to an operator

The ten minutes come in under the OrdersStuck page (15 min + 5 min `for`, deploy/prometheus/alerts.yml),
so a lost message is re-driven before anyone is woken. A re-drive that did not move the order is repeated
at most once per deadline, and a sweep re-drives at most `max_per_sweep` orders (the oldest first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from esim_common.order_states import OrderStatus

S = OrderStatus

# A message lost between steps that take milliseconds: well past the owner's retry tiers (1+3+10 s),
# its provider timeouts and funding's announcement relay, well under the OrdersStuck page (20 min).
LOST_MESSAGE_DEADLINE = timedelta(minutes=10)
# Added to an owner's own deadline: its last look (up to a 10 s delay tier late) and clock skew between
# a service's clock (notify, funding measure with their own) and Postgres's `now()`.
OWNER_DEADLINE_MARGIN = timedelta(minutes=10)
# A sweep's re-drives go out one by one; a backlog this large is an outage, and the rest wait a round
# (oldest first) instead of flooding the queues that are only just recovering.
MAX_REDRIVES_PER_SWEEP = 100


class StuckSettings(Protocol):
    """The owners' timers the deadlines follow (`esim_common.settings.Settings` has them)."""

    @property
    def awaiting_funds_max_age(self) -> int: ...
    @property
    def purchase_deadline_seconds(self) -> int: ...
    @property
    def email_give_up_seconds(self) -> int: ...


@dataclass(frozen=True)
class StuckRules:
    deadlines: Mapping[OrderStatus, timedelta]
    max_per_sweep: int = MAX_REDRIVES_PER_SWEEP
    # Terminal and failure states are not here: only an operator or the compensation moves them.
    states: tuple[OrderStatus, ...] = field(init=False)

    def __post_init__(self) -> None:
        if any(d <= timedelta(0) for d in self.deadlines.values()) or self.max_per_sweep < 1:
            raise ValueError("stuck deadlines must be positive and a sweep must re-drive at least one order")
        object.__setattr__(self, "states", tuple(s for s in OrderStatus if s in self.deadlines))

    def deadline(self, status: OrderStatus) -> timedelta | None:
        """How long an order may sit in `status` unchanged; None: never re-driven automatically."""
        return self.deadlines.get(status)

    def is_stuck(
        self, status: OrderStatus, unchanged_for: timedelta, since_last_redrive: timedelta | None
    ) -> bool:
        """The order sat in `status` past its deadline and was not re-driven (by the sweep or by an
        operator) within the last deadline either. The sweep's SQL (sweep_queries.STUCK_ORDERS) selects
        by the same rule: tests/integration/test_reconcile_sweep.py holds it to this one."""
        deadline = self.deadline(status)
        if deadline is None or unchanged_for <= deadline:
            return False
        return since_last_redrive is None or since_last_redrive > deadline


def stuck_rules(settings: StuckSettings, *, max_per_sweep: int = MAX_REDRIVES_PER_SWEEP) -> StuckRules:
    """The deadlines for these settings: past every timer of each state's owner (module docstring)."""
    return StuckRules(
        deadlines={
            S.PAID: LOST_MESSAGE_DEADLINE,
            S.FUNDING: LOST_MESSAGE_DEADLINE,
            S.AWAITING_FUNDS: timedelta(seconds=settings.awaiting_funds_max_age) + OWNER_DEADLINE_MARGIN,
            S.FUNDED: LOST_MESSAGE_DEADLINE,
            S.PURCHASING: timedelta(seconds=settings.purchase_deadline_seconds) + OWNER_DEADLINE_MARGIN,
            S.PROVISIONED: timedelta(seconds=settings.email_give_up_seconds) + OWNER_DEADLINE_MARGIN,
        },
        max_per_sweep=max_per_sweep,
    )
