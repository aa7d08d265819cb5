"""Wiring only: `create_app(settings)` builds the notify service; nothing connects until it starts."""

from __future__ import annotations

from fastapi import FastAPI

from esim_common.service import ServiceContext, service_app
from esim_common.settings import Settings
from notify import handlers
from notify.mailer import SmtpMailer
from notify.routes import preview_router

SERVICE_NAME = "notify"


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE_NAME, settings)
    handlers.register(ctx, SmtpMailer.from_settings(settings))
    return service_app(ctx, title=SERVICE_NAME, routers=(preview_router(settings),))
