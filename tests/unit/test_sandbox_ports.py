"""The stack's ports: every process gets its own."""

from __future__ import annotations

import socket

import pytest

from esim_sandbox.serve import free_ports
from esim_sandbox.stack import Stack


def test_free_ports_are_distinct_even_when_many_are_asked_for_at_once():
    ports = free_ports(300)
    assert len(set(ports)) == 300


def test_every_process_of_a_stack_gets_its_own_port(tmp_path):
    for _ in range(50):
        stack = Stack(workdir=tmp_path / "stack", database_url="postgresql://x/y", amqp_url="amqp://x/")
        assert len(set(stack.ports.values())) == len(stack.ports)


def test_a_stack_refuses_to_start_on_a_port_another_program_listens_on(tmp_path):
    # A second `make run` must not take the first one's processes, answering its health checks, for its own.
    stack = Stack(workdir=tmp_path / "stack", database_url="postgresql://x/y", amqp_url="amqp://x/")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", stack.ports["reconcile"]))
        other.listen()

        with pytest.raises(RuntimeError, match=rf"port {stack.ports['reconcile']} \(reconcile\) is in use"):
            stack.start()

    assert stack.processes == {}  # nothing was started
    stack.refuse_taken_ports()  # free again: no complaint
