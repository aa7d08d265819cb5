"""Turn stored objects into response bodies: copies, with Stripe's standing and requested expansions.

Stored objects keep related objects as ids. Stripe always embeds the cardholder in a card and the card in
an authorization; any other `expand[]=field` replaces an id by the object. `number` and `cvc` are the
exception: they are not stored on the card at all and appear only when expanded.
"""

from __future__ import annotations

import copy
from typing import Any

from .state import StripeState

# Fields Stripe always returns expanded, by object type.
_ALWAYS_EXPANDED = {
    "issuing.card": ("cardholder",),
    "issuing.authorization": ("card",),
}
# Card fields that are secrets, returned only on explicit `expand[]`.
_CARD_SECRET_FIELDS = ("number", "cvc")


def render(state: StripeState, obj: dict[str, Any], expand: list[str] | None = None) -> dict[str, Any]:
    rendered = copy.deepcopy(obj)
    _expand_standing(state, rendered)
    for path in expand or []:
        _expand_path(state, rendered, path.split("."))
    return rendered


def _expand_standing(state: StripeState, obj: dict[str, Any]) -> None:
    for field in _ALWAYS_EXPANDED.get(obj.get("object", ""), ()):
        value = obj.get(field)
        if isinstance(value, str) and value in state.objects:
            obj[field] = copy.deepcopy(state.objects[value])
            _expand_standing(state, obj[field])


def _expand_path(state: StripeState, obj: dict[str, Any], path: list[str]) -> None:
    head, rest = path[0], path[1:]
    if obj.get("object") == "issuing.card" and head in _CARD_SECRET_FIELDS and not rest:
        secret = state.card_secrets.get(obj["id"])
        if secret is not None:
            obj[head] = getattr(secret, head)
        return
    value = obj.get(head)
    if isinstance(value, str) and value in state.objects:
        value = obj[head] = copy.deepcopy(state.objects[value])
        _expand_standing(state, value)
    if rest and isinstance(value, dict):
        _expand_path(state, value, rest)
    elif rest and isinstance(value, list):  # `expand[]=data.card` on lists and the like
        for item in value:
            if isinstance(item, dict):
                _expand_path(state, item, rest)
