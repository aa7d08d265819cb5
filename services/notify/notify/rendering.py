"""Email templates: one home for every user-visible string (`notify/templates/`).

Each template is `<name>.subject.txt`, `<name>.txt` and optionally `<name>.html`, filled with
`string.Template.substitute` (a missing value is an error, not a blank). Values are plain text: the HTML
version receives every value HTML-escaped, so nothing a customer typed (their name) or a supplier sent
(activation data) can become markup. Sentences that depend on what happened live in `phrases.toml`.
"""

from __future__ import annotations

import html
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str | None


@cache
def _template(file_name: str) -> Template | None:
    path = TEMPLATES_DIR / file_name
    return Template(path.read_text(encoding="utf-8")) if path.exists() else None


def _required(file_name: str) -> Template:
    template = _template(file_name)
    if template is None:
        raise FileNotFoundError(f"email template {file_name} is missing from {TEMPLATES_DIR}")
    return template


@cache
def _phrases() -> dict[str, dict[str, str]]:
    with (TEMPLATES_DIR / "phrases.toml").open("rb") as file:
        return tomllib.load(file)


def phrase(section: str, key: str, **values: str) -> str:
    """A sentence from `phrases.toml`, its `$placeholders` filled with `values` (plain text)."""
    return Template(_phrases()[section][key]).substitute(values)


def has_phrase(section: str, key: str) -> bool:
    return key in _phrases().get(section, {})


def render(name: str, values: Mapping[str, str]) -> RenderedEmail:
    # A subject is one header line: values never add a line break to it.
    subject = " ".join(_required(f"{name}.subject.txt").substitute(values).split())
    text = _required(f"{name}.txt").substitute(values)
    html_template = _template(f"{name}.html")
    escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
    return RenderedEmail(
        subject=subject,
        text=text,
        html=html_template.substitute(escaped) if html_template else None,
    )
