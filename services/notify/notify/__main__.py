"""`python -m notify`: serve the notify service (consumers, /healthz, /metrics) on port 8083."""

from __future__ import annotations

from esim_common.service import run
from esim_common.settings import load_settings
from notify.main import DEFAULT_PORT, create_app


def main() -> None:
    settings = load_settings()
    run(create_app(settings), settings, default_port=DEFAULT_PORT)


if __name__ == "__main__":
    main()
