"""deploy/rabbitmq/definitions.json is the topology of the code, and a real node boots with it.

A private RabbitMQ node (tests/fixtures/private_rabbitmq.py; the shared one must not get our policy)
is configured like the compose container: deploy/rabbitmq/rabbitmq.conf's `load_definitions` folder
holding definitions.json and sandbox-users.json. After boot the queues are there before any service
ran, and the services' own start-up declare on top of them succeeds: RabbitMQ refuses a redeclare
whose arguments differ (PRECONDITION_FAILED), so the imported arguments are exactly the declared ones.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from esim_common.rabbitmq_definitions import (
    DLQ_POLICY_NAME,
    REGENERATE,
    definitions,
    main,
    render,
)
from esim_common.topology import declare, esim_topology
from tests.fixtures.private_rabbitmq import PrivateRabbit

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ = ROOT / "deploy" / "rabbitmq"
COMMITTED = RABBITMQ / "definitions.json"
# What docker-compose.yml mounts into the folder rabbitmq.conf names.
DEFINITION_FILES = {"topology.json": COMMITTED, "users.json": RABBITMQ / "sandbox-users.json"}


def load_definitions_setting() -> str:
    [value] = re.findall(r"^load_definitions\s*=\s*(\S+)\s*$", (RABBITMQ / "rabbitmq.conf").read_text(), re.M)
    return value


def test_the_committed_definitions_are_generated_from_the_code():
    expected = render(definitions(esim_topology()))
    assert COMMITTED.read_text() == expected, (
        f"{COMMITTED.relative_to(ROOT)} is stale: the topology changed. Regenerate it with `{REGENERATE}`"
    )


def test_the_check_mode_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "definitions.json"
    stale.write_text(COMMITTED.read_text().replace("order.paid", "order.payed"))
    assert main(["--check", "-o", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["-o", str(stale)]) == 0
    assert main(["--check", "-o", str(stale)]) == 0


def test_the_definitions_hold_topology_only_and_no_credentials():
    document = json.loads(COMMITTED.read_text())
    assert set(document) == {"vhosts", "exchanges", "queues", "bindings", "policies"}
    assert "password" not in COMMITTED.read_text()


def test_every_queue_of_the_topology_is_defined_once_and_every_dlq_gets_the_policy():
    topology = esim_topology()
    document = definitions(topology)
    names = [queue["name"] for queue in document["queues"]]
    expected = {
        name
        for queue in topology.queues
        for name in (queue.name, queue.dlq, *(queue.retry_tier(d) for d in topology.retry_delays))
    }
    assert len(names) == len(set(names)) and set(names) == expected
    [policy] = document["policies"]
    matched = {name for name in names if re.search(policy["pattern"], name)}
    assert matched == {queue.dlq for queue in topology.queues}
    assert policy["apply-to"] == "queues"  # every version; `quorum_queues` is 3.12+
    assert policy["definition"]["delivery-limit"] >= 10_000, "a DLQ must never drop a dead letter"


def test_compose_mounts_both_files_into_the_folder_rabbitmq_conf_loads():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {}
    for entry in compose["services"]["rabbitmq"]["volumes"]:
        source, target = str(entry).split(":")[:2]
        mounts[target] = (ROOT / source).resolve()
    folder = load_definitions_setting()
    assert {f"{folder}/{name}": path.resolve() for name, path in DEFINITION_FILES.items()}.items() <= (
        mounts.items()
    )
    assert mounts["/etc/rabbitmq/conf.d/30-esim.conf"] == (RABBITMQ / "rabbitmq.conf").resolve()
    url = compose["x-app-environment"]["AMQP_URL"]
    users = json.loads(DEFINITION_FILES["users.json"].read_text())["users"]
    assert url.startswith(f"amqp://{users[0]['name']}:{users[0]['password']}@")


@pytest.fixture(scope="module")
def booted_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    base = tmp_path_factory.mktemp("rabbitmq-definitions")
    folder = base / "definitions"
    folder.mkdir()
    for name, source in DEFINITION_FILES.items():
        shutil.copy(source, folder / name)
    node = PrivateRabbit(base)
    conf = (RABBITMQ / "rabbitmq.conf").read_text().replace(load_definitions_setting(), str(folder))
    with (base / "rabbitmq.conf").open("a") as out:
        out.write(conf)
    try:
        node.start()
    except RuntimeError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"the node did not boot with our definitions: {exc}", pytrace=False)
    try:
        yield node
    finally:
        node.stop()
        node.kill()
        shutil.rmtree(base, ignore_errors=True)


async def test_a_node_booted_with_the_definitions_has_the_topology_the_services_declare(booted_node):
    topology = esim_topology()
    connection = await aio_pika.connect(booted_node.url)  # guest/guest from the users file
    async with connection:
        channel = await connection.channel()
        for queue in definitions(topology)["queues"]:
            await channel.declare_queue(queue["name"], passive=True)  # there before any service ran
        # What every service does at start-up; a differing argument would close the channel with 406.
        await declare(channel, topology)

    listed = booted_node.ctl_command(
        "list_bindings", "source_name", "destination_name", "routing_key", "-q", "--no-table-headers"
    )
    assert listed.returncode == 0, listed.stderr
    rows = [tuple(line.split("\t")) for line in listed.stdout.splitlines()]
    bindings = {row for row in rows if row[0]}  # not the default exchange's implicit ones
    assert bindings == {
        (b["source"], b["destination"], b["routing_key"]) for b in definitions(topology)["bindings"]
    }
    assert {(topology.exchange, q.name, key) for q in topology.queues for key in q.routing_keys} <= bindings


def test_the_dlq_policy_applies_to_the_dead_letter_queues_only(booted_node):
    listed = booted_node.ctl_command("list_queues", "name", "policy", "-q", "--no-table-headers")
    assert listed.returncode == 0, listed.stderr
    policies = dict(line.split("\t") for line in listed.stdout.splitlines() if line.strip())
    assert {name for name, policy in policies.items() if policy == DLQ_POLICY_NAME} == {
        queue.dlq for queue in esim_topology().queues
    }
