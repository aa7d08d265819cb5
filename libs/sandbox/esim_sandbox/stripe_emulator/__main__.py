"""`python -m esim_sandbox.stripe_emulator --port 12111 [--webhook-url URL] [--webhook-secret S]
[--issuing-auth-webhook-url URL] [--issuing-authorization-secret S]`."""

from __future__ import annotations

import argparse
import logging

from esim_sandbox.serve import LOOPBACK, serve_forever

from .app import create_app
from .state import DEFAULT_ISSUING_FLOAT, DEFAULT_WEBHOOK_SECRET

# stripe-mock's port, so tools that know it find us.
DEFAULT_PORT = 12111


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m esim_sandbox.stripe_emulator",
        description="Run the Stripe emulator in the foreground.",
    )
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--webhook-url", default=None, help="where to POST signed events")
    parser.add_argument("--webhook-secret", default=DEFAULT_WEBHOOK_SECRET)
    parser.add_argument("--issuing-auth-webhook-url", default=None, help="real-time authorisation endpoint")
    parser.add_argument(
        "--issuing-authorization-secret",
        default=None,
        help="signs real-time authorisation requests (default: the webhook secret)",
    )
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any sk_test_...)")
    parser.add_argument("--issuing-float", type=int, default=DEFAULT_ISSUING_FLOAT, help="USD cents")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        issuing_auth_webhook_url=args.issuing_auth_webhook_url,
        issuing_authorization_secret=args.issuing_authorization_secret,
        api_key=args.api_key,
        issuing_float=args.issuing_float,
    )
    serve_forever(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
