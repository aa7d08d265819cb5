"""`python -m esim_sandbox.storage_emulator --port 12113 [--bucket esim-qrcodes] [--public-bucket]`."""

from __future__ import annotations

import argparse

from esim_sandbox.serve import LOOPBACK, serve_forever

from .app import DEFAULT_BUCKET, DEFAULT_JWT_SECRET, create_app
from .state import InitialBucket


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esim_sandbox.storage_emulator", description=__doc__)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=12113)
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="a bucket that exists from the start")
    parser.add_argument("--public-bucket", action="store_true", help="make that bucket public")
    parser.add_argument("--jwt-secret", default=DEFAULT_JWT_SECRET, help="signs the project's keys")
    args = parser.parse_args(argv)
    app = create_app(
        jwt_secret=args.jwt_secret, buckets=(InitialBucket(args.bucket, public=args.public_bucket),)
    )
    serve_forever(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
