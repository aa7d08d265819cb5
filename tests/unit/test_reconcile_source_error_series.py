"""ReconcileSourceFailing counts increase() over esim_reconcile_source_errors_total: each source's series
must exist at 0 from the start, or the first failure after a restart is invisible to the alert."""

from __future__ import annotations

from prometheus_client import REGISTRY

from reconcile import ledger_checks


def test_every_source_a_run_reads_is_exported_at_zero_before_any_failure() -> None:
    sources = set().union(*ledger_checks.NEEDS.values()) | {"stripe_issuing"}

    exported = {
        sample.labels["source"]
        for metric in REGISTRY.collect()
        if metric.name == "esim_reconcile_source_errors"
        for sample in metric.samples
        if sample.name == "esim_reconcile_source_errors_total"
    }

    assert sources <= exported
    assert "stripe_payment_intents" in exported
