"""The reference: a bare FastAPI endpoint served exactly like the webhook service, with no work behind it.

    HTTP_PORT=9000 python -m bench.bare_app

Same framework, same `esim_common.service.run` (uvicorn settings), same JSON logging set-up (so the
access log costs the same); the endpoint reads the body and answers `{"received": true}`. Whatever the
webhook service costs beyond this is our code: signature check, database, broker.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from esim_common.logging import configure_logging
from esim_common.service import run
from esim_common.settings import load_settings

DEFAULT_PORT = 8090


def create_app() -> FastAPI:
    app = FastAPI(title="bench bare endpoint")

    @app.post("/api/webhooks/stripe")
    async def webhook(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"received": True})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": "ready"})

    return app


def main() -> None:
    settings = load_settings()
    configure_logging(service="bench-bare", level=settings.log_level)
    run(create_app(), settings, default_port=DEFAULT_PORT)


if __name__ == "__main__":
    main()
