"""`python -m webhook`: serve the edge on HTTP_PORT (default 8080)."""

from esim_common.service import run
from esim_common.settings import load_settings
from webhook.main import DEFAULT_PORT, create_app


def main() -> None:
    settings = load_settings()
    run(create_app(settings), settings, default_port=DEFAULT_PORT)


if __name__ == "__main__":
    main()
