"""Read typed values out of decoded form parameters (which are all strings), Stripe's way."""

from __future__ import annotations

import re
from typing import Any

from .errors import ParamError, invalid_integer, invalid_value, missing_param

_INTEGER = re.compile(r"^-?\d+$")
_CURRENCY = re.compile(r"^[a-z]{3}$")
# Stripe's metadata limits.
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX_LENGTH = 40
METADATA_VALUE_MAX_LENGTH = 500


def require(params: dict[str, Any], key: str, *, prefix: str = "") -> Any:
    value = params.get(key)
    if value is None or value == "":
        raise missing_param(f"{prefix}[{key}]" if prefix else key)
    return value


def as_int(value: Any, param: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _INTEGER.match(str(value)):
        raise invalid_integer(param, value)
    number = int(value)
    if minimum is not None and number < minimum:
        raise invalid_value(param, f"Invalid {param}: must be at least {minimum}")
    return number


def opt_int(
    params: dict[str, Any], key: str, *, param: str | None = None, minimum: int | None = None
) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    return as_int(value, param or key, minimum=minimum)


def as_bool(value: Any, param: str) -> bool:
    if value in ("true", True):
        return True
    if value in ("false", False):
        return False
    raise ParamError(f"Invalid boolean: {value}", param=param)


def as_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ParamError(f"Invalid string: {param} must be a string", param=param)
    return value


def opt_str(params: dict[str, Any], key: str, *, param: str | None = None) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    return as_str(value, param or key)


def as_currency(value: Any, param: str) -> str:
    currency = as_str(value, param).lower()
    if not _CURRENCY.match(currency):
        raise invalid_value(
            param,
            f"Invalid currency: {value}. Stripe currently supports these currencies: usd, eur, gbp, ...",
        )
    return currency


def as_str_list(value: Any, param: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ParamError(f"Invalid array: {param} must be a list of strings", param=param)
    return value


def metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """New metadata; `""` (unset) and absent both give {}."""
    return merge_metadata({}, value, param)


def merge_metadata(current: dict[str, str], update: Any, param: str = "metadata") -> dict[str, str]:
    """Stripe's update rule: keys merge, a key set to "" is removed, `metadata=""` clears everything."""
    if update is None:
        return dict(current)
    if update == "":
        return {}
    if isinstance(update, list):  # `metadata[0]=x` decodes as a list; its keys are still strings
        update = {str(index): item for index, item in enumerate(update)}
    if not isinstance(update, dict):
        raise ParamError(f"Invalid hash: {param} must be a hash", param=param)
    merged = dict(current)
    for key, value in update.items():
        if not isinstance(value, str):
            raise ParamError(f"Invalid value for {param}[{key}]: must be a string", param=f"{param}[{key}]")
        if value == "":
            merged.pop(key, None)
            continue
        if len(key) > METADATA_KEY_MAX_LENGTH or len(value) > METADATA_VALUE_MAX_LENGTH:
            raise ParamError(
                f"Metadata keys are limited to {METADATA_KEY_MAX_LENGTH} characters and values to "
                f"{METADATA_VALUE_MAX_LENGTH}.",
                param=f"{param}[{key}]",
            )
        merged[key] = value
    if len(merged) > METADATA_MAX_KEYS:
        raise ParamError(f"Metadata is limited to {METADATA_MAX_KEYS} keys.", param=param)
    return merged
