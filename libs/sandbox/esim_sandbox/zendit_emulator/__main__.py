"""`python -m esim_sandbox.zendit_emulator --port 12112 --stripe-url http://127.0.0.1:12111`."""

from __future__ import annotations

import argparse

from esim_sandbox.serve import LOOPBACK, serve_forever

from .app import (
    DEFAULT_API_KEY,
    DEFAULT_PURCHASE_DELAY_SECONDS,
    DEFAULT_TOPUP_API_KEY,
    DEFAULT_WALLET_BALANCE,
    create_app,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esim_sandbox.zendit_emulator", description=__doc__)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=12112)
    parser.add_argument("--stripe-url", default=None, help="Stripe emulator base URL (card network)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--topup-api-key", default=DEFAULT_TOPUP_API_KEY)
    parser.add_argument(
        "--wallet-balance",
        type=int,
        default=DEFAULT_WALLET_BALANCE,
        help="opening balance in the wallet's minor units",
    )
    parser.add_argument("--wallet-currency", default="USD")
    parser.add_argument(
        "--purchase-delay",
        type=float,
        default=DEFAULT_PURCHASE_DELAY_SECONDS,
        help="seconds from ACCEPTED to DONE",
    )
    args = parser.parse_args(argv)
    app = create_app(
        api_key=args.api_key,
        topup_api_key=args.topup_api_key,
        wallet_balance=args.wallet_balance,
        wallet_currency=args.wallet_currency,
        stripe_url=args.stripe_url,
        purchase_delay_seconds=args.purchase_delay,
    )
    serve_forever(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
