"""The stack's ports: every process gets its own."""

from __future__ import annotations

from esim_sandbox.serve import free_ports
from esim_sandbox.stack import Stack


def test_free_ports_are_distinct_even_when_many_are_asked_for_at_once():
    ports = free_ports(300)
    assert len(set(ports)) == 300


def test_every_process_of_a_stack_gets_its_own_port(tmp_path):
    for _ in range(50):
        stack = Stack(workdir=tmp_path / "stack", database_url="postgresql://x/y", amqp_url="amqp://x/")
        assert len(set(stack.ports.values())) == len(stack.ports)
