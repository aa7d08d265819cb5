"""The benchmarks' arithmetic (percentiles, mails to orders, duplicates, provider-bound time) and the
harness's bookkeeping (what a run names, so that it removes it; when the servers count as idle).

The formats it reads are taken from the product itself (notify's Message-ID, provisioning's Zendit ids,
the SMTP capture's file names), so a change there breaks these tests rather than the figures.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest

from bench import pipeline_measure as measure
from bench.harness import Resources, wait_until_idle
from bench.profile_summary import bucket
from bench.stats import Distribution, percentile
from notify.domain import TEMPLATE_ESIM_DELIVERY, TEMPLATE_OPERATOR_ALERT, message_id
from provisioning.domain import zendit_transaction_id


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.90) == 90
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7
    assert math.isnan(percentile([], 0.5))


def test_distribution_sorts_and_summarises():
    d = Distribution.of([3.0, 1.0, 2.0, 10.0])
    assert (d.count, d.p50, d.p90, d.p99, d.max, d.mean) == (4, 2.0, 10.0, 10.0, 10.0, 4.0)
    empty = Distribution.of([])
    assert empty.count == 0 and math.isnan(empty.p99)


def test_mail_arrival_reads_the_capture_file_name_as_utc():
    # smtp_capture names a message f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{n:04d}.eml"
    at = datetime(2026, 11, 30, 13, 45, 7, 123456, tzinfo=UTC)
    name = f"{at.strftime('%Y%m%dT%H%M%S%fZ')}-0042.eml"
    assert measure.mail_arrival(name) == pytest.approx(at.timestamp(), abs=1e-6)
    assert measure.mail_arrival("notes.txt") is None
    assert measure.mail_arrival("20261130T134507Z-0001.eml") is None  # no microseconds: not the capture's


def test_message_ids_of_notify_map_back_to_template_and_order():
    txn = "txn_0123456789abcdef01234567"
    delivery = message_id(txn, TEMPLATE_ESIM_DELIVERY, "eSIM Shop <esim@example.com>")
    alert = message_id(txn, TEMPLATE_OPERATOR_ALERT, "esim@example.com")
    assert measure.parse_message_id(delivery) == (TEMPLATE_ESIM_DELIVERY, txn)
    assert measure.parse_message_id(alert) == (TEMPLATE_OPERATOR_ALERT, txn)
    assert measure.parse_message_id("<something@else>") is None
    assert measure.parse_message_id(None) is None


def test_duplicates_are_copies_beyond_the_first():
    assert measure.extra_copies([1, 1, 1]) == 0
    assert measure.extra_copies([1, 3, 2, 0]) == 3


def test_zendit_retries_count_as_purchases_of_the_same_order():
    txn = "txn_0123456789abcdef01234567"
    other = "txn_fedcba9876543210fedcba98"
    ids = [zendit_transaction_id(txn, 1), zendit_transaction_id(txn, 2), zendit_transaction_id(other, 1)]
    per_order = measure.zendit_purchases_per_order(ids)
    assert per_order == {txn: 2, other: 1}
    assert measure.extra_copies(per_order.values()) == 1


def test_per_second_counts_the_half_open_window():
    times = [9.99, 10.0, 10.5, 11.999, 12.0]
    assert measure.per_second(times, 10.0, 12.0) == 1.5  # 10.0, 10.5, 11.999
    assert math.isnan(measure.per_second(times, 12.0, 12.0))


def test_provider_bound_with_a_covered_wallet_is_zendits_time_alone():
    # No Stripe call between the webhook and the email when no top-up is needed.
    bound = measure.ProviderBound.for_wallet("covered", zendit_done_seconds=2.0, stripe_latency=0.150)
    assert bound.stripe_calls == 0
    assert bound.seconds == pytest.approx(2.0)
    assert "= 2 s" in bound.formula()


def test_provider_bound_with_a_top_up_adds_the_sequential_stripe_calls():
    bound = measure.ProviderBound.for_wallet(
        "topup", zendit_done_seconds=2.0, stripe_latency=0.150, zendit_latency=0.010
    )
    calls = measure.CRITICAL_PATH_CALLS["topup"]
    assert (bound.stripe_calls, bound.zendit_calls) == (calls["stripe"], calls["zendit"]) == (4, 7)
    assert bound.seconds == pytest.approx(2.0 + 4 * 0.150 + 7 * 0.010)


def test_spans_follow_the_order_timestamps():
    stamps = {"paid_at": 100.01, "funded_at": 100.05, "purchased_at": 100.10, "qr_stored_at": 100.30}
    s = measure.spans(100.0, {**stamps, "emailed_at": 100.42}, mail_at=100.45)
    assert s.webhook == pytest.approx(0.01)
    assert s.funding == pytest.approx(0.04)
    assert s.purchase_start == pytest.approx(0.05)
    assert s.purchase == pytest.approx(0.20)
    assert s.notify == pytest.approx(0.12)
    assert s.to_mail == pytest.approx(0.45)
    unfinished = measure.spans(100.0, stamps, mail_at=None)
    assert unfinished.notify is None and unfinished.to_mail is None


def test_profile_buckets_name_the_package():
    site = "/x/.venv/lib/python3.11/site-packages/qrcode/util.py"
    assert bucket(site, "_lost_point_level1") == "qrcode"
    assert bucket("/work/main/services/provisioning/provisioning/qr.py", "render_png") == "provisioning.qr"
    assert bucket("/work/main/libs/common/esim_common/logging.py", "redact") == "esim_common.logging"
    assert bucket("/usr/lib/python3.11/asyncio/events.py", "_run") == "stdlib asyncio"
    assert bucket("<frozen importlib._bootstrap>", "_find_and_load") == "imports"


def test_a_run_remembers_every_database_and_prefix_it_names(monkeypatch):
    # The clean-up removes what is listed here: a name not listed would stay on the shared servers.
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db.example:5433/postgres?sslmode=disable")
    made = Resources()
    assert made.database() == f"postgresql://u:p@db.example:5433/esim_bench_{made.run_id}?sslmode=disable"
    assert made.database("s").endswith(f"/esim_bench_{made.run_id}_s?sslmode=disable")
    assert (made.prefix(), made.prefix("b")) == (f"bench-{made.run_id}.", f"bench-{made.run_id}-b.")
    assert made.databases == [f"esim_bench_{made.run_id}", f"esim_bench_{made.run_id}_s"]
    assert made.prefixes == [f"bench-{made.run_id}.", f"bench-{made.run_id}-b."]


def test_waiting_until_idle_compares_the_cpu_used_per_sample_with_the_share():
    cpu = iter(range(0, 1000, 5))  # CPU seconds read: +5 per read

    async def wait(share: float) -> bool:
        return await wait_until_idle(
            lambda: next(cpu), lambda a, b: (b - a) / 1000, share=share, at_most=0.05, sample=0.01
        )

    assert asyncio.run(wait(share=0.6))  # 5 ms of CPU per 10 ms sample: half a core
    assert not asyncio.run(wait(share=0.4))
