"""Decode Stripe's form/query encoding (`a[b][0][c]=x`, `expand[]=y`) into nested dicts and lists.

The official SDK always sends indexed arrays (`expand[0]=number`), curl users and docs send `expand[]`;
both must land in the same structure. Values stay strings: each endpoint coerces what it reads, which
is also where Stripe reports `parameter_invalid_integer` and friends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

# `name` followed by any number of `[segment]`s; an empty segment means "append".
_KEY = re.compile(r"^(?P<name>[^\[\]]+)(?P<rest>(?:\[[^\[\]]*\])*)$")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


class FormError(ValueError):
    """The body or query string is not valid Stripe form encoding."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_body(body: bytes) -> dict[str, Any]:
    """Decode an `application/x-www-form-urlencoded` body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("The request body is not valid UTF-8.") from None
    return decode_pairs(parse_qsl(text, keep_blank_values=True))


def decode_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Fold `(key, value)` pairs into nested dicts; dicts keyed 0..n-1 become lists."""
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        segments = _split_key(raw_key)
        _assign(root, segments, value, raw_key)
    result = _listify(root)
    assert isinstance(result, dict)
    return result


def _split_key(raw_key: str) -> list[str]:
    match = _KEY.match(raw_key)
    if match is None:
        raise FormError(f"Invalid parameter name: {raw_key}", param=raw_key)
    return [match.group("name"), *_SEGMENT.findall(match.group("rest"))]


def _assign(node: dict[str, Any], segments: list[str], value: str, raw_key: str) -> None:
    for position, segment in enumerate(segments):
        is_last = position == len(segments) - 1
        if segment == "":
            segment = _append_index(node, segments[position + 1] if not is_last else None)
        if is_last:
            if isinstance(node.get(segment), dict):
                raise FormError(f"Invalid parameter: {raw_key} is both a value and a hash", param=raw_key)
            node[segment] = value
            return
        child = node.setdefault(segment, {})
        if not isinstance(child, dict):
            raise FormError(f"Invalid parameter: {raw_key} is both a value and a hash", param=raw_key)
        node = child


def _append_index(node: dict[str, Any], next_segment: str | None) -> str:
    """Where `[]` points: a new slot, or (Rack's rule) the last element while it lacks `next_segment`."""
    if next_segment is None or not node:
        return str(len(node))
    last = node.get(str(len(node) - 1))
    if isinstance(last, dict) and next_segment not in last:
        return str(len(node) - 1)
    return str(len(node))


def _listify(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {key: _listify(child) for key, child in value.items()}
    # Only an exact 0..n-1 run is an array: `metadata[7]=x` stays a hash with key "7".
    if converted and all(key.isdigit() for key in converted):
        indexes = sorted(int(key) for key in converted)
        if indexes == list(range(len(indexes))) and all(str(i) in converted for i in indexes):
            return [converted[str(i)] for i in indexes]
    return converted
