"""The eSIM activation string (GSMA SGP.22 "LPA:1$<SM-DP+ address>$<matching id>") that a QR code carries.

Zendit returns `smdpAddress` and `activationCode` but not the combined string, and some suppliers already
put the whole `LPA:...` string into `activationCode`; this is the one place that decides which.
"""

from __future__ import annotations

__all__ = ["LPA_PREFIX", "lpa_string"]

LPA_PREFIX = "LPA:"
# "$" separates the fields of the activation string, so it cannot appear inside one of them.
_SEPARATOR = "$"


def lpa_string(smdp_address: str, activation_code: str) -> str:
    """`LPA:1$<smdp>$<code>`, or `activation_code` unchanged when it already is an LPA string."""
    code = activation_code.strip()
    if not code:
        raise ValueError("activation code is empty")
    if code.startswith(LPA_PREFIX):
        return code
    smdp = smdp_address.strip()
    if not smdp:
        raise ValueError("SM-DP+ address is empty")
    if _SEPARATOR in smdp or _SEPARATOR in code:
        raise ValueError("SM-DP+ address and activation code must not contain '$'")
    return f"{LPA_PREFIX}1{_SEPARATOR}{smdp}{_SEPARATOR}{code}"
