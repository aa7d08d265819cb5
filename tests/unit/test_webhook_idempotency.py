"""The rules of the checkout's Idempotency-Key: what a key may be, what "the same request" is, and what a
request gets when its key is already claimed."""

from __future__ import annotations

import pytest

from webhook.idempotency import (
    InvalidIdempotencyKey,
    Verdict,
    check_key,
    judge,
    request_fingerprint,
)

REQUEST = {
    "offer_id": "ESIM-US-7D-1GB",
    "recipient_email": "ada@example.com",
    "full_name": "Ada",
    "user_id": None,
}


@pytest.mark.parametrize(
    "key", ["a", "5f0c3a52-6c2e-4d8e-9a53-3f9b8f0d7e11", "k" * 255, "~ !#$%&'()*+,-./:;<=>?@"]
)
def test_printable_ascii_keys_of_1_to_255_characters_are_accepted(key: str):
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, "caf\u00e9", "tab\there", "new\nline", "nul\x00", "del\x7f", "\u2603"],
    ids=["empty", "256-chars", "latin-1", "tab", "newline", "nul", "del", "non-latin"],
)
def test_other_keys_are_refused_with_the_rule_in_the_message(key: str):
    with pytest.raises(InvalidIdempotencyKey, match="1 to 255 printable ASCII"):
        check_key(key)


def test_the_fingerprint_is_a_sha256_hex_that_ignores_field_order():
    reordered = dict(reversed(list(REQUEST.items())))
    fingerprint = request_fingerprint("POST /x", REQUEST)
    assert fingerprint == request_fingerprint("POST /x", reordered)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0


@pytest.mark.parametrize("field", ["offer_id", "recipient_email", "full_name", "user_id"])
def test_changing_any_field_changes_the_fingerprint(field: str):
    changed = {**REQUEST, field: "something else"}
    assert request_fingerprint("POST /x", changed) != request_fingerprint("POST /x", REQUEST)


def test_the_same_fields_sent_to_another_endpoint_are_another_request():
    assert request_fingerprint("POST /x", REQUEST) != request_fingerprint("POST /y", REQUEST)


def test_a_completed_key_replays_for_the_same_request_only():
    assert judge(same_request=True, completed=True, lease_expired=False) is Verdict.REPLAY
    assert judge(same_request=False, completed=True, lease_expired=False) is Verdict.MISMATCH
    # A completed answer is never taken over, however old the claim is.
    assert judge(same_request=True, completed=True, lease_expired=True) is Verdict.REPLAY
    assert judge(same_request=False, completed=True, lease_expired=True) is Verdict.MISMATCH


def test_a_running_claim_makes_the_same_request_wait_and_another_one_mismatch():
    assert judge(same_request=True, completed=False, lease_expired=False) is Verdict.IN_PROGRESS
    assert judge(same_request=False, completed=False, lease_expired=False) is Verdict.MISMATCH


def test_an_expired_claim_counts_as_a_failed_attempt_and_is_taken_over_by_any_request():
    assert judge(same_request=True, completed=False, lease_expired=True) is Verdict.TAKE_OVER
    assert judge(same_request=False, completed=False, lease_expired=True) is Verdict.TAKE_OVER


def test_an_answer_older_than_the_retention_counts_as_no_answer_for_any_request():
    for same_request in (True, False):
        for lease_expired in (True, False):
            verdict = judge(
                same_request=same_request, completed=True, lease_expired=lease_expired, answer_expired=True
            )
            assert verdict is Verdict.EXPIRED
    # Only answers expire: a claim still running is judged by its lease alone.
    assert judge(same_request=True, completed=False, lease_expired=False, answer_expired=True) is (
        Verdict.IN_PROGRESS
    )
