"""`python -m notify`: serve the notify service (consumers, /healthz, /metrics, /preview) on port 8083.

`python -m notify preview [TEMPLATE] [--format text|html|eml] [--out DIR]` prints every email template
filled with sample data instead (no database, broker or SMTP server needed).
"""

from __future__ import annotations

import argparse

from esim_common.settings import load_settings
from notify import preview

DEFAULT_PORT = 8083


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m notify", description="The notify service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (what `python -m notify` alone does)")
    preview.add_arguments(
        commands.add_parser("preview", help="show the email templates filled with sample data")
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "preview":
        raise SystemExit(preview.run_cli(args, settings))
    # Imported here so that a preview does not load the web and broker stacks it does not use.
    from esim_common.service import run
    from notify.main import create_app

    run(create_app(settings), settings, default_port=DEFAULT_PORT)


if __name__ == "__main__":
    main()
