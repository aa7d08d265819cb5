"""Start every emulator on loopback and say where each one listens.

    python -m esim_sandbox [--stripe-port 12111] [--zendit-port 12112] [--storage-port 12113]
                           [--smtp-port 1025] [--mail-dir var/mail] [--stripe-webhook-url URL]
                           [--stripe-issuing-authorization-url URL]
                           [--stripe-webhook-secret S] [--stripe-issuing-authorization-secret S]
                           [--storage-bucket esim-qrcodes] [--storage-public-bucket]

Runs until Ctrl-C (or SIGTERM), then stops them all.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from esim_sandbox import smtp_capture, storage_emulator, stripe_emulator, zendit_emulator
from esim_sandbox.serve import LOOPBACK, serve_in_thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esim_sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=LOOPBACK, help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--stripe-port", type=int, default=12111)
    parser.add_argument("--zendit-port", type=int, default=12112)
    parser.add_argument("--storage-port", type=int, default=12113, help="the Supabase Storage emulator")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--mail-dir", type=Path, default=Path("var/mail"))
    parser.add_argument("--stripe-webhook-url", help="where the Stripe emulator delivers events")
    parser.add_argument(
        "--stripe-issuing-authorization-url",
        help="the real-time Issuing authorisation endpoint, asked before any card charge is approved",
    )
    parser.add_argument(
        "--wallet-balance",
        type=int,
        default=0,
        help="opening Zendit wallet balance in USD cents (0: the first order needs a card top-up)",
    )
    parser.add_argument("--stripe-webhook-secret", default="whsec_sandbox")
    parser.add_argument(
        "--stripe-issuing-authorization-secret",
        default=None,
        help="signs real-time authorisation requests (default: the webhook secret)",
    )
    parser.add_argument(
        "--storage-bucket",
        default=storage_emulator.DEFAULT_BUCKET,
        help="a Storage bucket that exists from the start (private unless --storage-public-bucket)",
    )
    parser.add_argument("--storage-public-bucket", action="store_true")
    args = parser.parse_args(argv)

    stripe = serve_in_thread(
        stripe_emulator.create_app(
            webhook_url=args.stripe_webhook_url,
            webhook_secret=args.stripe_webhook_secret,
            issuing_auth_webhook_url=args.stripe_issuing_authorization_url,
            issuing_authorization_secret=args.stripe_issuing_authorization_secret,
        ),
        host=args.host,
        port=args.stripe_port,
    )
    zendit = serve_in_thread(
        zendit_emulator.create_app(
            stripe_url=f"http://{LOOPBACK}:{stripe.port}", wallet_balance=args.wallet_balance
        ),
        host=args.host,
        port=args.zendit_port,
    )
    storage = serve_in_thread(
        storage_emulator.create_app(
            buckets=(storage_emulator.InitialBucket(args.storage_bucket, public=args.storage_public_bucket),)
        ),
        host=args.host,
        port=args.storage_port,
    )
    args.mail_dir.mkdir(parents=True, exist_ok=True)
    smtp = smtp_capture.SmtpCapture(args.mail_dir, host=args.host, port=args.smtp_port)
    smtp.start()

    print("sandbox emulators are listening:", flush=True)
    print(f"  Stripe        {stripe.url}          (STRIPE_API_BASE; control routes under /_sandbox/)")
    print(f"  Zendit        {zendit.url}/v1       (ZENDIT_API_BASE; top-up gateway /v1/wallet/topup)")
    visibility = "public" if args.storage_public_bucket else "private"
    print(
        f"  Storage       {storage.url}          (SUPABASE_URL with the sandbox service-role key; "
        f"bucket {args.storage_bucket}, {visibility})"
    )
    print(
        f"  SMTP capture  {LOOPBACK}:{smtp.port}        (messages as .eml files in {args.mail_dir.resolve()})"
    )
    if args.stripe_webhook_url:
        print(f"  Stripe events are delivered to {args.stripe_webhook_url}")
    if args.stripe_issuing_authorization_url:
        print(f"  Issuing authorisations are decided by {args.stripe_issuing_authorization_url}")
    print("Ctrl-C stops them.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        smtp.stop()
        storage.stop()
        zendit.stop()
        stripe.stop()
        print("sandbox stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
