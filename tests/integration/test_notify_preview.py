"""Previewing the email templates with sample data: `python -m notify preview` and `GET /preview`.

Neither needs a database, a broker or an SMTP server: the CLI runs as a real subprocess with nothing
configured, and the route is called through the app without starting the service.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import httpx
import pytest
import zxingcpp
from PIL import Image

from esim_common.settings import load_settings
from notify.main import create_app
from notify.samples import SAMPLE_AMOUNT_TO_ADD, SAMPLE_LPA, SAMPLES

TEMPLATES = list(SAMPLES)
# What each sample must show: the LPA string for the customer, amounts for the others.
EXPECTED = {
    "esim_delivery": [SAMPLE_LPA, "5 GB · 30 days"],
    "order_failed": ["You have been refunded 39.00 USD"],
    "operator_alert": ["Failed step: refund", "39.00 USD"],
    "operator_low_balance": [f"Add at least: {SAMPLE_AMOUNT_TO_ADD.format()}", "6 h after its"],
    "operator_needs_attention": ["NOT refunded automatically", "Amount paid: 39.00 USD"],
    "operator_qr_mismatch": ["Status now: delivered", "No action is needed for the customer"],
}
UNKNOWN_MESSAGE = (
    "unknown template 'nope'; valid templates: esim_delivery, order_failed, operator_alert, "
    "operator_low_balance, operator_needs_attention, operator_qr_mismatch"
)


def preview(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m notify preview ...` in an empty directory, pointing at no database or broker."""
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "AMQP_URL": "amqp://nobody:nobody@127.0.0.1:1/",
        "SMTP_PORT": "1",
        "AWAITING_FUNDS_MAX_AGE": "21600",
    }
    return subprocess.run(
        [sys.executable, "-m", "notify", "preview", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def decoded(png: bytes) -> list[str]:
    return [barcode.text for barcode in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))]


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_preview_command_prints_each_template_with_sample_data(template, tmp_path):
    done = preview(template, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    for expected in EXPECTED[template]:
        assert expected in done.stdout
    assert done.stdout.startswith("Subject: ")


def test_the_preview_command_writes_every_template_as_html_and_eml_files(tmp_path):
    html = preview("--format", "html", "--out", str(tmp_path / "html"), cwd=tmp_path)
    eml = preview("esim_delivery", "--format", "eml", "--out", str(tmp_path / "eml"), cwd=tmp_path)

    assert html.returncode == 0 and eml.returncode == 0, html.stderr + eml.stderr
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == sorted(f"{t}.html" for t in TEMPLATES)
    page = (tmp_path / "html" / "esim_delivery.html").read_text()
    assert "cid:" not in page and SAMPLE_LPA in page
    message = message_from_bytes((tmp_path / "eml" / "esim_delivery.eml").read_bytes(), policy=default_policy)
    attached = [part.get_content() for part in message.iter_attachments()]
    assert [decoded(png) for png in attached] == [[SAMPLE_LPA]]


def test_the_preview_command_refuses_an_unknown_template_listing_the_valid_ones(tmp_path):
    done = preview("nope", cwd=tmp_path)

    assert done.returncode == 2
    assert UNKNOWN_MESSAGE in done.stderr and done.stdout == ""


# ------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
async def client():
    app = create_app(load_settings(_env_file=None))  # never started: no database, broker or SMTP
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://notify") as http:
        yield http


async def test_the_preview_route_lists_every_template(client):
    response = await client.get("/preview")

    assert response.status_code == 200
    listed = response.json()["templates"]
    assert [t["name"] for t in listed] == TEMPLATES
    assert listed[0]["links"]["html"] == "/preview/esim_delivery?format=html"


@pytest.mark.parametrize("template", TEMPLATES)
async def test_the_preview_route_shows_each_template_as_html_and_text(client, template):
    html = await client.get(f"/preview/{template}")
    text = await client.get(f"/preview/{template}", params={"format": "text"})

    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert html.text.lstrip().startswith("<!DOCTYPE html>")
    for expected in EXPECTED[template]:
        assert expected in text.text


async def test_the_html_preview_shows_the_qr_code_inline_as_a_data_uri(client):
    html = (await client.get("/preview/esim_delivery", params={"format": "html"})).text

    assert "cid:" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [decoded(base64.b64decode(image)) for image in images] == [[SAMPLE_LPA]]


async def test_the_preview_route_answers_an_unknown_template_with_a_404_listing_the_valid_ones(client):
    response = await client.get("/preview/nope")

    assert response.status_code == 404
    assert response.json() == {"detail": UNKNOWN_MESSAGE}


async def test_the_preview_route_refuses_an_unknown_format(client):
    assert (await client.get("/preview/esim_delivery", params={"format": "pdf"})).status_code == 422
