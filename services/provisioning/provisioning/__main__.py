"""`python -m provisioning`: serve the provisioning service until SIGTERM/SIGINT."""

from __future__ import annotations

from esim_common.service import run
from esim_common.settings import load_settings
from provisioning.main import create_app

DEFAULT_PORT = 8082


def main() -> None:
    settings = load_settings()
    run(create_app(settings), settings, default_port=DEFAULT_PORT)


if __name__ == "__main__":
    main()
