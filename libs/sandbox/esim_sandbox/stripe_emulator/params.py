"""Check decoded parameters against the installed SDK's TypedDicts (`stripe.params...`).

Deriving the accepted names from the SDK instead of hand-written lists means a typo in our client, or a
field the SDK renamed, fails here with `parameter_unknown` just as it would against Stripe.

Checked: unknown names at every nesting level, required names (`__required_keys__`), and closed
`Literal[...]` enums. Not checked: leaf types (each endpoint coerces the values it reads).
"""

from __future__ import annotations

import functools
import sys
import types
import typing
from typing import Any, Literal, Union

import typing_extensions
from stripe._request_options import RequestOptions

from .errors import invalid_value, missing_param, unknown_param

# RequestOptions keys (api_key, idempotency_key, ...) are mixed into the *CreateParams TypedDicts but
# the SDK moves them to headers, so they are never valid body parameters.
_REQUEST_OPTION_KEYS = frozenset(RequestOptions.__annotations__)


def check_params(params: dict[str, Any], spec: type | None) -> None:
    """Raise a Stripe-shaped `ParamError` for the first problem found, in a stable order."""
    if spec is None:
        return
    _check_typeddict(params, spec, prefix="")


def accepted_names(spec: type) -> frozenset[str]:
    """Top-level parameter names the SDK knows for this request."""
    return frozenset(_hints(spec))


@functools.cache
def _hints(spec: type) -> dict[str, Any]:
    """Resolved annotations of a TypedDict, minus the request options.

    `typing.get_type_hints` cannot be used on the class itself: RequestOptions mentions StripeContext
    under TYPE_CHECKING only. A stand-in class with the same module resolves the remaining names.
    """
    annotations = {
        key: value for key, value in spec.__annotations__.items() if key not in _REQUEST_OPTION_KEYS
    }
    stand_in = type(spec.__name__, (), {"__annotations__": annotations, "__module__": spec.__module__})
    module = sys.modules[spec.__module__]
    return typing.get_type_hints(stand_in, globalns=vars(module))


def _required(spec: type) -> frozenset[str]:
    return frozenset(getattr(spec, "__required_keys__", frozenset())) - _REQUEST_OPTION_KEYS


def _path(prefix: str, key: str | int) -> str:
    return f"{prefix}[{key}]" if prefix else str(key)


def _check_typeddict(value: dict[str, Any], spec: type, *, prefix: str) -> None:
    hints = _hints(spec)
    for key in value:
        if key not in hints:
            raise unknown_param(_path(prefix, key))
    for key in sorted(_required(spec)):
        if key not in value:
            raise missing_param(_path(prefix, key))
    for key, child in value.items():
        _check_value(child, hints[key], path=_path(prefix, key))


def _check_value(value: Any, hint: Any, *, path: str) -> None:
    if value == "":
        return  # Stripe's way to unset a field; valid wherever a value is.
    origin = typing.get_origin(hint)
    if typing_extensions.is_typeddict(hint):
        if isinstance(value, dict):
            _check_typeddict(value, hint, prefix=path)
        return
    if origin in (Union, types.UnionType):
        _check_union(value, typing.get_args(hint), path=path)
        return
    if origin is list and isinstance(value, list):
        (item_hint,) = typing.get_args(hint) or (Any,)
        for index, item in enumerate(value):
            _check_value(item, item_hint, path=_path(path, index))
        return
    if origin is Literal and isinstance(value, str):
        allowed = [
            str(option).lower() if isinstance(option, bool) else str(option)
            for option in typing.get_args(hint)
        ]
        if value not in allowed:
            raise invalid_value(path, f"Invalid {path}: must be one of {', '.join(allowed)}")


def _check_union(value: Any, options: tuple[Any, ...], *, path: str) -> None:
    # `Literal['a', 'b'] | str` is open for forward compatibility: any string goes.
    if isinstance(value, str) and str in options:
        return
    for option in options:
        if isinstance(value, dict) and typing_extensions.is_typeddict(option):
            _check_typeddict(value, option, prefix=path)
            return
        if isinstance(value, list) and typing.get_origin(option) is list:
            _check_value(value, option, path=path)
            return
    literals = [option for option in options if typing.get_origin(option) is Literal]
    if isinstance(value, str) and literals and not any(_is_plain(option) for option in options):
        _check_value(
            value, Literal[tuple(arg for lit in literals for arg in typing.get_args(lit))], path=path
        )


def _is_plain(option: Any) -> bool:
    """A union member that accepts arbitrary scalars (so a Literal sibling does not close the enum)."""
    return option in (str, int, float, bool) or typing.get_origin(option) in (dict,)
