"""Scheduled reconciliation: every RECONCILE_INTERVAL seconds each replica runs two phases, each gated
across replicas on its own.

    re-drive    under pg_try_advisory_xact_lock in the phase's own transaction (a replica that does
                not get it skips the phase: another one is re-driving; one that dies lets it go), each
                order stuck past its state's deadline (stuck_rules) goes through the operator's path
                (order_actions.redrive_from_state): under its row lock, only if unchanged and not
                re-driven by anyone since it was found; an `auto_redrive` audit row, committed before
                the event is published. An order whose facts refuse a re-drive gets an
                `auto_redrive_refused` row and an operator alert in the log; either row holds the sweep
                off it for a deadline. One order failing never stops the rest
    checks      the ledger and Issuing checks page Stripe and Zendit, so they run on one replica per
                `checks_every` (RECONCILE_LEDGER_INTERVAL), claimed in reconcile_schedule by one
                statement: no lock or transaction is held while they run. Each is awaited in turn; one
                that raises is logged and counted, and the others still run. Old reconcile_runs rows
                are pruned as one of them

Every run ends in `esim_reconcile_runs_total{outcome}`; a run that did some of this and had nothing
fail sets `esim_reconcile_last_success_timestamp_seconds` (on this replica: alerts take the max), whose
age ReconcileNotRunning watches against `esim_reconcile_interval_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import asyncpg

from esim_common.logging import bind_transaction_id
from esim_common.publisher import EventPublisher
from reconcile import metrics, order_actions, order_ops, sweep_queries
from reconcile import order_queries as q
from reconcile.order_ops import MovedOn, NotAllowed
from reconcile.stuck_rules import StuckRules
from reconcile.sweep_queries import StuckOrder

log = logging.getLogger("esim.reconcile.sweep")

Check = Callable[[], Awaitable[object]]


class ReconcileSweep:
    def __init__(
        self,
        *,
        pool: Callable[[], asyncpg.Pool],
        publisher: EventPublisher,
        rules: StuckRules,
        interval_seconds: float,
        checks: Sequence[Check] = (),
        checks_every: timedelta,
    ) -> None:
        self._pool = pool  # a getter: the pool exists only once the service has started
        self._publisher = publisher
        self._rules = rules
        self._interval_seconds = interval_seconds
        self._checks_every = checks_every
        self._checks: tuple[Check, ...] = (*checks, self.prune_run_history)
        for check in self._checks:
            # Exported at 0 from the start, so that increase() sees a check's first failure.
            metrics.reconcile_check_failures_total.labels(check=_name(check))

    async def run_once(self) -> int:
        """One run: the re-drives, if no other replica is re-driving, then the checks, if due; the
        number of orders re-driven. Raises only if the run itself could not be made (database away),
        counted as failed."""
        try:
            redriven, failed, redrove = await self._redrive_phase()
            checked, failed_checks = await self._checks_phase()
        except Exception:
            metrics.reconcile_runs_total.labels(outcome="failed").inc()
            raise
        failed += failed_checks
        if not redrove and not checked:
            outcome = "skipped"
        else:
            outcome = "degraded" if failed else "ok"
        metrics.reconcile_runs_total.labels(outcome=outcome).inc()
        if outcome == "ok":
            metrics.reconcile_last_success.set(time.time())
        return redriven

    async def run_forever(self) -> None:
        """Sweep until cancelled; a failed run is logged (and counted) and the next one tries again."""
        metrics.reconcile_interval.set(self._interval_seconds)
        metrics.reconcile_sweep_started.set(time.time())
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.error("reconciliation run failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self._interval_seconds)

    async def prune_run_history(self) -> None:
        """reconcile_runs would grow by a row per ledger run for ever: keep RUN_HISTORY_RETENTION."""
        pruned = await sweep_queries.prune_runs(self._pool())
        if pruned:
            log.info("old reconciliation runs pruned", extra={"pruned": pruned})

    async def _redrive_phase(self) -> tuple[int, int, bool]:
        """(re-driven, failed, whether this replica re-drove): the lock is held for this phase only."""
        async with self._pool().acquire() as lock_conn, lock_conn.transaction():
            if not await sweep_queries.try_sweep_lock(lock_conn):
                log.info("re-drives skipped: another replica is re-driving")
                return 0, 0, False
            redriven, failed = await self._redrive_stuck()
        return redriven, failed, True

    async def _checks_phase(self) -> tuple[bool, int]:
        """(whether this replica ran the checks, how many raised): at most once per `checks_every`
        across replicas."""
        job, every = sweep_queries.LEDGER_JOB, self._checks_every
        if not await sweep_queries.claim_job(self._pool(), job, every):
            return False, 0
        return True, await self._run_checks()

    async def _redrive_stuck(self) -> tuple[int, int]:
        """(re-driven, failed) over this run's stuck orders, oldest first."""
        redriven = failed = 0
        for stuck in await sweep_queries.stuck_orders(self._pool(), self._rules):
            with bind_transaction_id(stuck.transaction_id):
                status = await self._redrive(stuck)
            metrics.reconcile_redrives_total.labels(status=status).inc()
            redriven += status == "redriven"
            failed += status == "failed"
        return redriven, failed

    async def _redrive(self, stuck: StuckOrder) -> str:
        try:
            await order_actions.redrive_from_state(
                self._pool(),
                self._publisher,
                stuck.transaction_id,
                action=order_ops.AUTO_REDRIVE_ACTION,
                found_stuck=stuck,
            )
        except MovedOn:
            return "moved_on"  # its consumer got to it first: nothing to do
        except NotAllowed as refusal:
            try:
                await self._refused(stuck, refusal)
            except Exception as exc:
                log.warning("automatic re-drive refusal not recorded", extra={"error": type(exc).__name__})
                return "failed"
            return "refused"
        except Exception as exc:  # not published (recorded by redrive_from_state), or an error: next time
            log.warning(
                "automatic re-drive failed",
                extra={"status": stuck.status.value, "error": f"{type(exc).__name__}: {exc}"},
            )
            return "failed"
        return "redriven"

    async def _refused(self, stuck: StuckOrder, exc: NotAllowed) -> None:
        """The order is stuck and its facts do not allow a re-drive (no PaymentIntent, no Zendit cost,
        no stored QR code): a person must look. Audited, so the sweep leaves it alone for a deadline."""
        log.error(
            "OPERATOR ALERT: a stuck order cannot be re-driven automatically",
            extra={"alert": "operator", "status": stuck.status.value, "reason": str(exc)},
        )
        detail = {"from": stuck.status.value, "reason": str(exc)[:300]}
        async with self._pool().acquire() as conn:
            await q.record_action(
                conn, stuck.transaction_id, order_ops.AUTO_REDRIVE_REFUSED_ACTION, detail, None
            )

    async def _run_checks(self) -> int:
        """Each check in turn; the number that raised (each logged and counted by name)."""
        failed = 0
        for check in self._checks:
            name = _name(check)
            try:
                await check()
            except Exception as exc:
                failed += 1
                metrics.reconcile_check_failures_total.labels(check=name).inc()
                log.error(
                    "reconciliation check failed",
                    extra={"check": name, "error": f"{type(exc).__name__}: {exc}"},
                )
        return failed


def _name(check: Check) -> str:
    return getattr(check, "__name__", type(check).__name__)
