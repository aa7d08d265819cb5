"""`GET /api/offers[?country=XX]`: the sellable offers for the shop, from the cached catalogue.

Served from memory (`webhook.catalogue`), never from Zendit per request: the catalogue is thousands of
offers, and a shop's browse traffic must not become Zendit traffic. Prices are ours (computed by the
rule checkout applies), never Zendit's cost. Checkout itself still reads its one offer live, so a
price changed at Zendit since the last refresh is what checkout charges and answers with.

The router's lifespan runs the catalogue's background refresh while the app serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Query, Response

from webhook.catalogue import Catalogue, CatalogueNotLoaded
from webhook.ports import PortsDep
from webhook.responses import api_errors
from webhook.schemas import OfferList

# The first load usually takes a second or two; the shop's retry should not hammer us meanwhile.
NOT_LOADED_RETRY_AFTER_SECONDS = 5
COUNTRY_PATTERN = r"^[A-Za-z]{2}$"


@asynccontextmanager
async def run_catalogue(app: FastAPI) -> AsyncIterator[None]:
    """Load the catalogue in the background from start-up on (the app serves at once: the edge's
    webhooks must not wait for, or fail with, Zendit), and stop refreshing when the app stops."""
    catalogue: Catalogue = app.state.ports.catalogue
    catalogue.start()
    try:
        yield
    finally:
        await catalogue.stop()


router = APIRouter(prefix="/api", tags=["offers"], lifespan=run_catalogue)


@router.get(
    "/offers",
    response_model=OfferList,
    responses=api_errors(e503="The catalogue is not loaded yet; retry after Retry-After seconds."),
)
async def list_offers(
    ports: PortsDep,
    country: Annotated[
        str | None,
        Query(
            pattern=COUNTRY_PATTERN,
            description="ISO 3166-1 alpha-2 code (any case); only that country's offers. "
            "Without it, every offer, regional ones included.",
        ),
    ] = None,
) -> Response:
    try:
        body = ports.catalogue.listing(country.upper() if country else None)
    except CatalogueNotLoaded:
        raise HTTPException(
            status_code=503,
            detail="catalogue not loaded yet; retry",
            headers={"Retry-After": str(NOT_LOADED_RETRY_AFTER_SECONDS)},
        ) from None
    return Response(content=body, media_type="application/json")
