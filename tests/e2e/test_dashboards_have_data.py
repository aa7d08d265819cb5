"""Every panel of every Grafana dashboard shows data once a few orders went through the running system.

The whole stack runs with the emulators; a real Prometheus (Debian's, the one `make tools` installs)
scrapes it with the scrape jobs of deploy/prometheus/prometheus.yml pointed at this test's ports, and
RabbitMQ's rabbitmq_prometheus endpoint. After one delivered order and one whose Zendit purchase fails
and is refunded, each panel query (Grafana's variables filled in as Grafana would) must return at least
one number, not an empty result and not only NaN; and the panels that scenario must move (MUST_MOVE) must
show it: a number above 0 in the series it moves. Present is not enough there: the order series exist from
start-up at 0, so a panel whose feature is broken still returns its zeros.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import yaml

from esim_common.settings import Settings
from esim_sandbox.serve import free_port
from esim_sandbox.stack import Stack
from tests.fixtures import dashboards

pytestmark = [pytest.mark.broker, pytest.mark.db]

PROMETHEUS_CONFIG = dashboards.ROOT / "deploy" / "prometheus" / "prometheus.yml"
OFFER = "ESIM-GLOBAL-30D-5GB"
FINAL = {"delivered", "refunded", "needs_attention"}
RABBITMQ_PROMETHEUS_PORT = 15692
# Scraping every second gives rate() and histogram_quantile() several samples within a test run.
SCRAPE_INTERVAL = "1s"
# Reconcile recomputes the seed's gauges every 15 s, so data may lag an order by that much.
DATA_DEADLINE_SECONDS = 45
ORDER_TIMEOUT_SECONDS = 30
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\)\s*$")
FULFILMENT = dashboards.DASHBOARDS_DIR / "esim-fulfilment.json"
# The states the two orders leave on their way (the first is funded by an Issuing top-up).
STEPS_LEFT = (
    *("pending_payment", "paid", "funding", "funded", "purchasing", "provisioned"),
    *("purchase_failed", "refund_pending"),
)
# Every panel of the fulfilment dashboard that one delivered order and one refunded after its Zendit
# purchase failed must move: panel title -> refId -> the series (by labels; {} is any) that must be
# above 0. Left out: balances, backlogs, DLQs, mismatches, top-up failures, awaiting funds and needs
# attention, which this scenario leaves where they were (at a value, or 0); and the provider error
# ratio: Zendit reports the failed purchase as a FAILED status to calls that succeed.
MUST_MOVE: dict[str, dict[str, list[dict[str, str]]]] = {
    "Orders paid / min": {"A": [{}]},
    "Success ratio": {"A": [{}]},
    "eSIM success rate (all time)": {"A": [{}]},
    "Average time to eSIM": {"A": [{}]},
    "Stripe refunds issued": {"A": [{}]},
    "Orders per minute, by state entered": {
        "A": [{"to_state": s} for s in ("paid", "delivered", "purchase_failed", "refunded")]
    },
    "Time to eSIM (p50, p99)": {"A": [{}], "B": [{}]},
    "Time spent in each step (p50)": {"A": [{"step": step} for step in STEPS_LEFT]},
    "Time spent in each step (p99)": {"A": [{"step": step} for step in STEPS_LEFT]},
    "Failures by step, per 15 min": {"A": [{"step": "purchase"}]},
    "Refunds by failed step, per 15 min": {"A": [{"step": "purchase"}]},
    "Purchases by outcome, per 15 min": {"A": [{"outcome": "done"}, {"outcome": "failed"}]},
    "Messages settled, by outcome": {"A": [{"outcome": "ok"}]},
    "Broker: messages processed per service (FastStream)": {"A": [{}]},
    "Provider calls, by outcome": {
        "A": [{"provider": "stripe", "outcome": "ok"}, {"provider": "zendit", "outcome": "ok"}]
    },
    "Provider call duration (p99)": {"A": [{"provider": "stripe"}, {"provider": "zendit"}]},
}


# --------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def rabbitmq_prometheus(amqp_url: str) -> str:
    """host:port of rabbitmq_prometheus beside the broker the stack uses. Off is a failure, not a skip:
    without it the RabbitMQ dashboard (and the DLQ and backlog panels) show nothing."""
    target = os.environ.get("RABBITMQ_PROMETHEUS_TARGET") or (
        f"{urlsplit(amqp_url).hostname or '127.0.0.1'}:{RABBITMQ_PROMETHEUS_PORT}"
    )
    try:
        httpx.get(f"http://{target}/metrics", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(
            f"rabbitmq_prometheus does not answer at {target} ({type(exc).__name__}): the RabbitMQ "
            "dashboard cannot show anything. `make services` enables it (scripts/ensure-services.sh); "
            "by hand: `rabbitmq-plugins enable rabbitmq_prometheus` (online, no restart).",
            pytrace=False,
        )
    return target


def scrape_config(stack: Stack, rabbitmq_target: str) -> dict:
    """deploy/prometheus/prometheus.yml, its targets replaced by this test's: the same jobs, paths and
    relabelling that the dashboards are written against."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL}
    config.pop("rule_files", None)
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name == "rabbitmq":
            job["static_configs"] = [{"targets": [rabbitmq_target]}]
        else:
            assert name in stack.ports, f"scrape job {name} is no service of the stack"
            job["static_configs"] = [{"targets": [f"127.0.0.1:{stack.ports[name]}"]}]
    return config


@pytest.fixture(scope="module")
def prometheus(stack: Stack, rabbitmq_prometheus: str) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make tools` installs Debian's prometheus package"
    workdir = Path(tempfile.mkdtemp(prefix="esim-prometheus-"))
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(stack, rabbitmq_prometheus)))
    url = f"http://127.0.0.1:{free_port()}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={urlsplit(url).netloc}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/-/ready"):
            assert process.poll() is None, (workdir / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus not ready within 30 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def instant(client: httpx.AsyncClient, expr: str) -> list[dict]:
    response = await client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


async def resolve_variables(client: httpx.AsyncClient, dashboard: dict) -> dict[str, str]:
    """A dashboard's query variables as Grafana resolves them on load: `label_values(selector, label)`
    gives the first value found (none: empty, which matches a missing label)."""
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = LABEL_VALUES.match(query)
        assert match, f"variable {variable['name']}: only label_values(...) is understood, not {query!r}"
        selector = dashboards.substitute(match["selector"], values)
        response = await client.get("/api/v1/series", params={"match[]": selector})
        found = sorted(
            {series[match["label"]] for series in response.json()["data"] if match["label"] in series}
        )
        values[variable["name"]] = found[0] if found else ""
    return values


async def queries_without_data(client: httpx.AsyncClient) -> list[str]:
    missing = []
    for path in dashboards.dashboard_files():
        variables = await resolve_variables(client, dashboards.load(path))
        for query in dashboards.queries(path):
            expr = dashboards.substitute(query.expr, variables)
            try:
                result = await instant(client, expr)
            except AssertionError as exc:
                missing.append(f"{query}\n    -> error {exc}")
                continue
            numbers = [float(sample["value"][1]) for sample in result if "value" in sample]
            if not any(not math.isnan(n) for n in numbers):
                missing.append(f"{query}\n    -> {'only NaN' if numbers else 'no data'} for {expr}")
    return missing


def must_move_queries() -> list[tuple[dashboards.Query, list[dict[str, str]]]]:
    """MUST_MOVE's queries; every title and refId it names must be on the dashboard, so that renaming a
    panel cannot take it out of the check unnoticed."""
    found = [
        (query, MUST_MOVE[query.panel_title][query.ref_id])
        for query in dashboards.queries(FULFILMENT)
        if query.ref_id in MUST_MOVE.get(query.panel_title, {})
    ]
    wanted = {(title, ref) for title, refs in MUST_MOVE.items() for ref in refs}
    absent = wanted - {(query.panel_title, query.ref_id) for query, _ in found}
    assert not absent, f"MUST_MOVE names panel queries that {FULFILMENT.name} does not have: {absent}"
    return found


async def panels_not_moved(client: httpx.AsyncClient) -> list[str]:
    """The MUST_MOVE series that are missing, or not above 0."""
    variables = await resolve_variables(client, dashboards.load(FULFILMENT))
    still = []
    for query, wanted in must_move_queries():
        expr = dashboards.substitute(query.expr, variables)
        result = await instant(client, expr)
        for labels in wanted:
            values = [
                float(sample["value"][1]) for sample in result if labels.items() <= sample["metric"].items()
            ]
            if not any(value > 0 for value in values):
                seen = {tuple(sorted(r["metric"].items())): r["value"][1] for r in result}
                still.append(f"{query}\n    -> {labels or 'any series'}: {values or 'none'} in {seen}")
    return still


async def success_ratio_before_any_order(client: httpx.AsyncClient) -> list[dict]:
    """The "Success ratio" query while no order has finished, once Prometheus holds the two samples of
    the (zero) order counters that increase() needs to return 0 rather than nothing."""
    [query] = [q for q in dashboards.queries(FULFILMENT) if q.panel_title == "Success ratio"]
    deadline = time.monotonic() + 30
    two_samples = 'min(count_over_time(esim_order_transitions_total{to_state="delivered"}[1m])) >= 2'
    while not await instant(client, two_samples):
        assert time.monotonic() < deadline, "Prometheus holds no two samples of the order counters"
        await asyncio.sleep(0.5)
    return await instant(client, dashboards.substitute(query.expr, {}))


# --------------------------------------------------------------------------- orders


def zendit_control(stack: Stack, method: str, path: str, body: dict | None = None) -> None:
    httpx.request(method, f"{stack.url('zendit')}/_sandbox/{path}", json=body, timeout=10).raise_for_status()


async def paid_order(stack: Stack) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{stack.url('webhook')}/api/create-checkout-session",
            json={
                "offerId": OFFER,
                "recipientEmail": f"dash-{uuid.uuid4().hex[:6]}@example.com",
                "fullName": "Ada",
            },
        )
        assert response.status_code == 200, response.text
        session = response.json()
        paid = await http.post(f"{stack.url('stripe')}/_sandbox/checkout/sessions/{session['sessionId']}/pay")
        paid.raise_for_status()
    return session["transactionId"]


async def final_status(stack: Stack, txn: str) -> str:
    conn = await asyncpg.connect(stack.database_url)
    try:
        deadline = time.monotonic() + ORDER_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            status = await conn.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn)
            if status in FINAL:
                return status
            await asyncio.sleep(0.2)
        raise AssertionError(f"order {txn} is {status} after {ORDER_TIMEOUT_SECONDS}s")
    finally:
        await conn.close()


@pytest.fixture
async def prometheus_client(prometheus: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as client:
        yield client


# --------------------------------------------------------------------------- the test


async def every_target_scraped(client: httpx.AsyncClient) -> dict[str, str]:
    """Wait until Prometheus has scraped every target (it applies its targets a few seconds after
    start): counters must have a sample from before the orders for rate() to see them. Returns the
    targets still down, by job, with their error."""
    deadline = time.monotonic() + 30
    while True:
        targets = (await client.get("/api/v1/targets")).json()["data"]["activeTargets"]
        down = {t["labels"]["job"]: t["lastError"] or t["health"] for t in targets if t["health"] != "up"}
        if (targets and not down) or time.monotonic() > deadline:
            return down
        await asyncio.sleep(0.2)


async def run_reconciliation(stack: Stack) -> None:
    """An operator's reconciliation run (admin API), which publishes the open mismatches per kind."""
    token = Settings.model_fields["admin_api_token"].default.get_secret_value()
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{stack.url('reconcile')}/api/admin/reconcile/run", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 200, response.text


async def test_every_dashboard_panel_shows_data_after_a_delivered_and_a_refunded_order(
    stack: Stack, prometheus_client: httpx.AsyncClient
):
    must_move_queries()  # before the slow part: a panel MUST_MOVE names is gone
    down = await every_target_scraped(prometheus_client)
    assert not down, f"Prometheus cannot scrape: {down}"
    # Nothing finished yet: no ratio (Grafana shows the panel's "No finished orders"), not a NaN.
    assert await success_ratio_before_any_order(prometheus_client) == []
    # The sandbox wallet starts empty: this order is funded through an Issuing card top-up.
    assert await final_status(stack, await paid_order(stack)) == "delivered"
    zendit_control(stack, "POST", "wallet", {"balance": 1_000_000})
    zendit_control(stack, "POST", "purchase_failures", {"code": "PRODUCT_UNAVAILABLE", "count": 1})
    assert await final_status(stack, await paid_order(stack)) == "refunded"
    await run_reconciliation(stack)

    deadline = time.monotonic() + DATA_DEADLINE_SECONDS
    missing = await queries_without_data(prometheus_client)
    unmoved = await panels_not_moved(prometheus_client)
    while (missing or unmoved) and time.monotonic() < deadline:
        await asyncio.sleep(1)
        missing = await queries_without_data(prometheus_client)
        unmoved = await panels_not_moved(prometheus_client)
    assert not missing, f"{len(missing)} panel queries show no data:\n" + "\n".join(missing)
    assert not unmoved, f"{len(unmoved)} panel series the orders must move did not:\n" + "\n".join(unmoved)
