import pytest

from esim_common.lpa import lpa_string
from esim_common.providers.zendit import Confirmation


def test_lpa_string_joins_smdp_address_and_activation_code():
    assert lpa_string("smdp.example.com", "K2-ABC-123") == "LPA:1$smdp.example.com$K2-ABC-123"


def test_lpa_string_keeps_an_activation_code_that_already_is_an_lpa_string():
    full = "LPA:1$rsp.truphone.com$QRF-BETTERROAMING-PMRDGIR2EARDEIT5"
    assert lpa_string("ignored.example.com", full) == full
    assert lpa_string("", full) == full


def test_lpa_string_trims_surrounding_whitespace():
    assert lpa_string("  smdp.example.com ", " CODE\n") == "LPA:1$smdp.example.com$CODE"


def test_lpa_string_refuses_empty_parts():
    with pytest.raises(ValueError):
        lpa_string("smdp.example.com", "  ")
    with pytest.raises(ValueError):
        lpa_string("", "CODE")


def test_lpa_string_refuses_a_dollar_sign_inside_a_field():
    with pytest.raises(ValueError):
        lpa_string("smdp.example.com", "CO$DE")


def test_a_confirmation_exposes_its_lpa_string():
    confirmation = Confirmation.model_validate(
        {
            "iccid": "8901234567890123456",
            "smdpAddress": "smdp.sandbox.zendit.test",
            "activationCode": "ABC123",
        }
    )
    assert confirmation.lpa == "LPA:1$smdp.sandbox.zendit.test$ABC123"
