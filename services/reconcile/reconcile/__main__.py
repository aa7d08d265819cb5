"""`python -m reconcile`: serve the reconcile service (consumers, admin API, /metrics) on port 8084."""

from __future__ import annotations

from esim_common.service import run
from esim_common.settings import load_settings
from reconcile.main import DEFAULT_PORT, create_app


def main() -> None:
    settings = load_settings()
    run(create_app(settings), settings, default_port=DEFAULT_PORT)


if __name__ == "__main__":
    main()
