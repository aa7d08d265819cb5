"""The module-scoped `stripe_emulator` is shared by every test of a module: what one test arms on it
(faults, delivery settings, a real-time authorisation secret) must not outlive that test, even when the
test fails before its own clean-up. Checked by running a small test module with pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INNER_TESTS = """
from esim_sandbox.stripe_emulator.delivery import DeliverySettings


def test_one_arms_everything_and_then_fails(stripe_emulator):
    stripe_emulator.inject_fault("/v1/refunds", method="POST", status=500, count=5)
    stripe_emulator.set_delivery(duplicates=2, hold=True)
    stripe_emulator.set_issuing_authorization_secret("whsec_left_behind")
    raise AssertionError("failed before its clean-up")


def test_two_finds_the_emulator_as_new(stripe_emulator):
    state = stripe_emulator.state
    assert state.faults == []
    assert state.delivery == DeliverySettings()
    assert state.issuing_authorization_secret == state.webhook.secret


def test_three_does_not_use_the_emulator():
    pass
"""


def test_what_a_test_arms_on_the_shared_emulator_is_reset_after_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest('pytest_plugins = ["tests.fixtures.stripe_emulator"]\n')
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_one_arms_everything_and_then_fails*"])
