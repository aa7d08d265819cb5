"""HTTP routes of the provisioning service: the stored QR codes, for `qr_code_url` links."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from provisioning.storage import LocalQrStorage

# The image carries the customer's eSIM activation code: caches in between must not keep it.
QR_HEADERS = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}


def qr_code_router(storage: LocalQrStorage) -> APIRouter:
    router = APIRouter(tags=["qr codes"])

    @router.get(
        "/qrcodes/{transaction_id}.png",
        response_class=FileResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "The PNG."},
            404: {"description": "Unknown or malformed id, or no QR code stored yet."},
        },
    )
    async def qr_code(transaction_id: str) -> FileResponse:
        """The QR code PNG of a provisioned order (404 for an unknown or malformed id)."""
        path = storage.path_of(transaction_id)
        if path is None or not path.is_file():
            raise HTTPException(status_code=404, detail="QR code not found")
        return FileResponse(path, media_type="image/png", headers=QR_HEADERS)

    return router
