"""The order state machine as a pure table."""

import itertools

from esim_common.order_states import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATES,
    OrderStatus,
    can_transition,
    sources_of,
)


def test_the_happy_path_is_legal_step_by_step():
    path = ["pending_payment", "paid", "funding", "funded", "purchasing", "provisioned", "delivered"]
    for current, target in itertools.pairwise(path):
        assert can_transition(OrderStatus(current), OrderStatus(target)), (current, target)


def test_a_delivered_order_can_never_be_refunded_or_reopened():
    assert OrderStatus.DELIVERED in TERMINAL_STATES
    assert not can_transition(OrderStatus.DELIVERED, OrderStatus.REFUND_PENDING)


def test_skipping_payment_is_illegal():
    assert not can_transition(OrderStatus.PENDING_PAYMENT, OrderStatus.FUNDED)
    assert OrderStatus.PENDING_PAYMENT not in sources_of(OrderStatus.FUNDED)


def test_insufficient_funds_at_purchase_sends_the_order_back_to_funding():
    assert can_transition(OrderStatus.PURCHASING, OrderStatus.FUNDING)


def test_every_state_is_in_the_table_and_every_non_terminal_state_can_reach_a_terminal_one():
    assert set(ALLOWED_TRANSITIONS) == set(OrderStatus)
    for state in OrderStatus:
        seen, frontier = {state}, [state]
        while frontier:
            for nxt in ALLOWED_TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & TERMINAL_STATES, f"{state} can never finish"
