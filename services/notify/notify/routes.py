"""The notify service's own HTTP routes: the email previews for an operator (`notify.preview`).

    GET /preview                                  the templates, with a link per format
    GET /preview/{template}?format=html|text|eml  one of them filled with sample data (html by default)

Only sample data is ever shown, never an order's: the routes need no database and no credentials.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import HTMLResponse, PlainTextResponse

from esim_common.settings import Settings
from notify.preview import FORMATS, Format, NoHtmlPart, render_preview
from notify.samples import SAMPLES, UnknownTemplate


def preview_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/preview", tags=["preview"])

    @router.get("")
    async def list_templates() -> dict[str, Any]:
        """The templates that can be previewed, each with a link per format."""
        return {
            "templates": [
                {
                    "name": name,
                    "description": description,
                    "links": {fmt: f"/preview/{name}?format={fmt}" for fmt in FORMATS},
                }
                for name, (description, _) in SAMPLES.items()
            ]
        }

    @router.get(
        "/{template}",
        response_class=HTMLResponse,
        responses={
            200: {"content": {"text/plain": {}, "message/rfc822": {}}},
            404: {"description": "Unknown template, or one without that format (the answer lists them)."},
        },
    )
    async def show_template(
        template: str, fmt: Annotated[Format, Query(alias="format")] = "html"
    ) -> Response:
        """One template filled with sample data; 404 (listing the valid names) for an unknown one."""
        try:
            rendered = await render_preview(template, fmt, settings)
        except (UnknownTemplate, NoHtmlPart) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        if isinstance(rendered, bytes):
            return Response(rendered, media_type="message/rfc822")
        if fmt == "text":
            return PlainTextResponse(rendered)
        return HTMLResponse(rendered)

    return router
