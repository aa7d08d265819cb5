"""Structured JSON logs that carry the transaction id and can never carry a card number or a secret.

    configure_logging(service=...)     root logger → one JSON-lines handler (idempotent)
    bind_transaction_id(txn)           context manager; every line logged inside carries `transaction_id`
    register_secret(value)             add a secret at runtime (settings may load after logging)
    redact(text)                       the redaction itself, for anything else that leaves the process
    RedactingFilter                    the same for handlers we do not own (uvicorn's, for example)

A line looks like

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "service": "funding", "logger": "esim.funding",
     "msg": "top-up created", "transaction_id": "…", "amount_cents": 500}

Redaction is the last thing the formatter does to every field — message, arguments, `extra=` values
and the formatted traceback — because a secret reaches a log line by accident (an exception message
that echoes a request, a repr of a settings object), never on purpose. What it removes:

- card numbers: 13-19 digits, optionally in groups separated by single spaces or dashes, that pass the
  Luhn check → `[REDACTED PAN]`. Luhn keeps order numbers and timestamps readable (about one in ten
  random numbers still passes and is redacted; a false positive is cheap, a leaked PAN is not).
- CVCs: the value after `cvc`, `cvv`, `cvc2`, `cvv2`, `security_code` in `key=value`, `key: value`,
  JSON and Python-repr forms, and `extra=` fields with those names → `[REDACTED]`.
- secrets: every registered value of at least `MIN_SECRET_LENGTH` characters, Stripe keys
  (`sk_live_…`, `rk_test_…`, `whsec_…`), `Bearer <token>` and passwords in URLs → `[REDACTED]`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TextIO

__all__ = [
    "NOISY_LOGGERS",
    "JsonFormatter",
    "RedactingFilter",
    "bind_transaction_id",
    "configure_logging",
    "current_transaction_id",
    "redact",
    "register_secret",
]

PAN_PLACEHOLDER = "[REDACTED PAN]"
PLACEHOLDER = "[REDACTED]"
# Shorter "secrets" (a dev password like `guest`, a port) would redact ordinary words all over the logs.
MIN_SECRET_LENGTH = 6
# Chatty at INFO (a line per AMQP frame or HTTP request) without telling an operator anything new.
# `stripe` logs whole response bodies at DEBUG, card reveals included: never below WARNING.
NOISY_LOGGERS = ("aiormq", "aio_pika", "httpx", "httpcore", "stripe")

_transaction_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("transaction_id", default=None)

# --------------------------------------------------------------------------- transaction id


@contextmanager
def bind_transaction_id(transaction_id: object | None) -> Iterator[None]:
    """Every line logged inside the block (and in tasks started from it) carries this transaction id."""
    token = _transaction_id.set(None if transaction_id is None else str(transaction_id))
    try:
        yield
    finally:
        _transaction_id.reset(token)


def current_transaction_id() -> str | None:
    return _transaction_id.get()


# --------------------------------------------------------------------------- redaction

_secrets: set[str] = set()
_registered: frozenset[str] = frozenset()  # a snapshot of _secrets, rebuilt on change (read per line)
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Redact `value` from every log line from now on (ignored when shorter than MIN_SECRET_LENGTH)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        global _registered
        with _secrets_lock:
            _secrets.add(value)
            _registered = frozenset(_secrets)


def registered_secrets() -> frozenset[str]:
    with _secrets_lock:
        return _registered


# A run of digits in groups joined by single spaces or dashes; which part of it is a PAN is decided below.
# UUIDs (our transaction ids) are matched first and kept: "…-a716-446655440000" would otherwise
# look like a 15-digit run and about one in ten would lose its tail.
_DIGIT_RUN = re.compile(
    r"(?P<uuid>(?i:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}))"
    r"|(?<!\d)\d+(?:[ -]\d+)*(?!\d)"
)
_DIGITS = re.compile(r"\d+")
_PAN_MIN, _PAN_MAX = 13, 19

_CVC_KEY = r"(?:cvc2?|cvv2?|security[_ ]?code)"
# key, optionally quoted or bracketed (`card[cvc]`), then `=` or `:`, then a quoted or bare value.
_CVC_VALUE = re.compile(
    rf"""(?ix)
    (?<![a-z0-9]) (?P<key>{_CVC_KEY}) (?![a-z0-9_])
    (?P<sep> ["'\\\]]* \s* [:=] \s* )
    (?P<value> "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*' | \\"[^"\\]*\\" | [^\s,;&}}\])"'\\]+ )
    """
)
# ... or the key, a space and three or four digits ("cvc 047"), as prose and format strings write it.
_CVC_SPACED = re.compile(rf"(?i)(?<![a-z0-9])(?P<key>{_CVC_KEY})(?P<sep>\s+)\d{{3,4}}(?!\d)")
_CVC_FIELD = re.compile(rf"(?i)^(?:card[_.-]?)?{_CVC_KEY}$")

_SECRET_SHAPES = (
    # Stripe secret, restricted and ephemeral keys, and webhook signing secrets.
    re.compile(r"(?<![A-Za-z0-9])(?:sk|rk|ek)_(?:live|test)_[A-Za-z0-9]{6,}"),
    re.compile(r"(?<![A-Za-z0-9])whsec_[A-Za-z0-9+/=]{6,}"),
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*")
# scheme://user:password@host — RabbitMQ and Postgres URLs get logged at start-up.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(@)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _redact_pans_in_run(run: str) -> str:
    """Redact every Luhn-valid 13-19 digit window of whole groups in a digit run.

    Windows rather than the whole run, because a PAN often sits next to other digits
    ("4242424242424242 12 34" with the expiry after it), and the whole run then fails Luhn.
    """
    groups = [(m.start(), m.end()) for m in _DIGITS.finditer(run)]
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(groups):
        best: int | None = None
        count = 0
        for j in range(i, len(groups)):
            count += groups[j][1] - groups[j][0]
            if count > _PAN_MAX:
                break
            if count >= _PAN_MIN:
                window = run[groups[i][0] : groups[j][1]]
                if luhn_valid(re.sub(r"\D", "", window)):
                    best = j  # keep looking: the longest valid window covers the most digits
        if best is None:
            i += 1
        else:
            spans.append((groups[i][0], groups[best][1]))
            i = best + 1
    for start, end in reversed(spans):
        run = run[:start] + PAN_PLACEHOLDER + run[end:]
    return run


def _redact_cvc(match: re.Match[str]) -> str:
    value = match["value"]
    # Keep the quoting, so redacted JSON or a repr still reads as JSON or a repr.
    quote = '\\"' if value.startswith('\\"') else value[0] if value[0] in "\"'" else ""
    return f"{match['key']}{match['sep']}{quote}{PLACEHOLDER}{quote}"


@lru_cache(maxsize=32)
def _secrets_pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    usable = sorted((s for s in secrets if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)
    # Longest first, so a secret that contains another is removed whole.
    return re.compile("|".join(re.escape(s) for s in usable)) if usable else None


# Something every rule below needs to find: 13 digits in single-separated groups (a PAN window),
# a key shape, `bearer`, a URL, a CVC key. Text without any of it (most log fields: ids, states,
# amounts, short messages) has nothing to redact but registered secrets, and skips the seven passes.
_MAYBE_SENSITIVE = re.compile(r"(?i)\d(?:[ -]?\d){12}|_(?:live|test)_|whsec_|bearer|://|cvc|cvv|security")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with card numbers, CVCs, `secrets`, registered secrets and known key shapes replaced.

    No I/O; besides its arguments it reads only the process-wide secret registry, so a caller that
    redacts an error for a message header gets the same protection as a log line.
    """
    pattern = _secrets_pattern(registered_secrets() | frozenset(secrets) if secrets else registered_secrets())
    if pattern is not None:
        text = pattern.sub(PLACEHOLDER, text)
    return _redact_shapes(text) if _MAYBE_SENSITIVE.search(text) else text


def _redact_shapes(text: str) -> str:
    """Every rule that looks for a shape (PAN, CVC, key, bearer token, URL password), in order."""
    for shape in _SECRET_SHAPES:
        text = shape.sub(PLACEHOLDER, text)
    text = _BEARER.sub(rf"\g<1>{PLACEHOLDER}", text)
    text = _URL_PASSWORD.sub(rf"\g<1>{PLACEHOLDER}\g<2>", text)
    text = _CVC_VALUE.sub(_redact_cvc, text)
    text = _CVC_SPACED.sub(lambda m: f"{m['key']}{m['sep']}{PLACEHOLDER}", text)
    return _DIGIT_RUN.sub(lambda m: m.group() if m["uuid"] else _redact_pans_in_run(m.group()), text)


def _redact_value(value: object) -> object:
    """Redact a structured value (an `extra=` field) keeping its JSON type where nothing was found."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float):
        # An int can be a PAN (`extra={"card": 4242424242424242}`); it becomes a string only then.
        text = str(value)
        cleaned = redact(text)
        return value if cleaned == text else cleaned
    if isinstance(value, Mapping):
        return {
            redact(str(k)): PLACEHOLDER if _CVC_FIELD.match(str(k)) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))


# --------------------------------------------------------------------------- formatting

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every field passes through `redact`."""

    def __init__(self, *, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")[:-6]
            + "Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            "transaction_id": _transaction_id.get(),
        }
        for key, value in _extra_fields(record).items():
            # An explicit `extra={"transaction_id": ...}` wins (logging outside a bound block).
            if key not in line or (key == "transaction_id" and value is not None):
                line[key] = value
        if record.exc_info and not record.exc_text:
            # Cached on the record like logging.Formatter does, but redacted, so other handlers that
            # reuse the cache (pytest's capture, say) do not get the raw traceback either.
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(_redact_value(line), ensure_ascii=False, default=str)


class RedactingFilter(logging.Filter):
    """Redacts a record in place, for handlers with their own formatter (uvicorn's access log, say).

    Attach it to the handler, not the logger: a logger's filters do not see records that propagate
    up from its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in _extra_fields(record).items():
            setattr(record, key, _redact_value(value))
        return True


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler `configure_logging` installed, so a second call replaces it."""


def configure_logging(
    *,
    service: str,
    level: str | int = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    quiet: Iterable[str] = NOISY_LOGGERS,
) -> logging.Handler:
    """Send the root logger to one JSON-lines handler on `stream` (default: stderr at call time).

    Calling it again replaces the handler instead of adding a second one. Handlers others put on the
    root logger (pytest's capture, for one) are left alone. The `quiet` loggers are set to WARNING;
    they still propagate to this handler, so they are redacted like everything else.
    """
    for secret in secrets:
        register_secret(secret)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service=service))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
