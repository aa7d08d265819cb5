"""The in-flight cap of the Stripe webhook route: a slot per delivery, Overloaded past the limit."""

import pytest

from webhook.load_shedding import InFlightLimit, Overloaded


def test_slots_are_taken_up_to_the_limit_and_given_back_even_on_error():
    gate = InFlightLimit(2)
    with gate.slot(), gate.slot():
        assert gate.in_flight == 2
        with pytest.raises(Overloaded), gate.slot():
            pass
        assert gate.in_flight == 2  # a refused slot takes nothing
    assert gate.in_flight == 0
    with pytest.raises(RuntimeError), gate.slot():
        raise RuntimeError("handler failed")
    assert gate.in_flight == 0


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError):
        InFlightLimit(0)
