"""The shop's offer catalogue: Zendit's thousands of offers held in memory, refreshed in the background.

    refresh()          read every page of `GET /esim/offers` (`page_size` a call; Zendit allows 1..1024),
                       price each offer with the rule checkout applies (`webhook.quotes`), keep only the
                       sellable ones, and swap the new copy in at once. Raises when any page fails.
    run_once()         refresh(); a failure is logged as a warning and counted, and the last good copy
                       stays in service. Returns the number of sellable offers loaded (0: none loaded).
    run_forever()      run_once() at once, then every `refresh_seconds` (sooner while it fails)
    start() / stop()   that loop as a background task: the offers router's lifespan
    listing(country)   the JSON body of `GET /api/offers`; CatalogueNotLoaded before the first load

Each listing (all offers, and one per country) is rendered to JSON once per load rather than once per
request: the whole catalogue is a few hundred kilobytes of JSON per thousand offers, and this process
also has to answer Stripe's webhooks fast. A copy never changes once built, so a request reads it
without locks while the next one is being loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from esim_common.providers.zendit import MAX_PAGE_SIZE, ZenditClient, ZenditError
from webhook import metrics
from webhook.domain import PricingPolicy
from webhook.quotes import NotForSale, Quote, Refusal, quote
from webhook.schemas import OfferList, ShopOffer

log = logging.getLogger("esim.webhook.catalogue")

# After a failed load, try again this soon (or at the regular period, if that is shorter): a shop
# that started during a Zendit blip should get its catalogue within seconds, not a full period later.
RETRY_AFTER_FAILURE_SECONDS = 15.0


class CatalogueNotLoaded(Exception):
    """No load has succeeded yet since start-up."""


class CatalogueEmpty(Exception):
    """Zendit listed no offers at all: thousands yesterday and none now is an outage upstream, not a
    closed shop, so it must not replace a good copy."""


@dataclass(frozen=True)
class Snapshot:
    """One load of the catalogue, rendered."""

    loaded_at: datetime
    loaded_monotonic: float
    listed: int  # offers Zendit listed
    sellable: int  # offers the shop may sell
    everything: bytes  # the OfferList JSON of every sellable offer
    by_country: Mapping[str, bytes]  # the OfferList JSON of one country's offers
    nothing: bytes  # the OfferList JSON of a country without offers

    def listing(self, country: str | None) -> bytes:
        if country is None:
            return self.everything
        return self.by_country.get(country.upper(), self.nothing)


def shop_offer(offer_quote: Quote) -> ShopOffer:
    offer = offer_quote.offer
    return ShopOffer(
        offer_id=offer.offer_id,
        country=offer.country.upper() or None,
        regions=list(offer.regions),
        dataGB=offer.data_gb,  # the alias: what mypy and the wire both call it
        data_unlimited=offer.data_unlimited,
        duration_days=offer.duration_days,
        notes=offer.notes,
        amount=offer_quote.price.amount,
        currency=offer_quote.price.currency,
    )


def _render(offers: list[ShopOffer], loaded_at: datetime) -> bytes:
    return OfferList(offers=offers, updated_at=loaded_at).model_dump_json(by_alias=True).encode()


class Catalogue:
    def __init__(
        self,
        *,
        zendit: ZenditClient,
        wallet_currency: Callable[[], Awaitable[str]],
        pricing: PricingPolicy,
        refresh_seconds: float,
        page_size: int = MAX_PAGE_SIZE,
        retry_seconds: float = RETRY_AFTER_FAILURE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_seconds <= 0:
            raise ValueError(f"CATALOGUE_REFRESH_SECONDS must be positive, got {refresh_seconds}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        self._zendit = zendit
        self._wallet_currency = wallet_currency
        self._pricing = pricing
        self.refresh_seconds = refresh_seconds
        self.page_size = page_size
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._started_monotonic = clock()
        self._snapshot: Snapshot | None = None
        self._last_refresh_ok = False
        self._refreshing = asyncio.Lock()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- reading ------------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def listing(self, country: str | None = None) -> bytes:
        """The JSON body for `GET /api/offers[?country=XX]`."""
        snapshot = self._snapshot
        if snapshot is None:
            raise CatalogueNotLoaded("the catalogue has not been loaded yet")
        return snapshot.listing(country)

    def age_seconds(self) -> float:
        """Since the last successful load, or since start-up while there was none (so an alert on the
        age also fires when the catalogue never loads)."""
        snapshot = self._snapshot
        since = snapshot.loaded_monotonic if snapshot is not None else self._started_monotonic
        return max(0.0, self._clock() - since)

    async def wait_until_loaded(self) -> None:
        await self._loaded.wait()

    # -- loading ------------------------------------------------------------------------------------
    async def refresh(self) -> Snapshot:
        async with self._refreshing:
            started = self._clock()
            wallet_currency = await self._wallet_currency()
            quotes: list[Quote] = []
            refused: Counter[Refusal] = Counter()
            seen: set[str] = set()
            async for offer in self._zendit.iter_offers(page_size=self.page_size):
                # Offset paging over a catalogue that changes meanwhile can list an offer twice (or
                # skip one, which the next refresh picks up).
                if offer.offer_id in seen:
                    continue
                seen.add(offer.offer_id)
                try:
                    quotes.append(quote(offer, wallet_currency, self._pricing))
                except NotForSale as exc:
                    refused[exc.refusal] += 1
            if not seen:
                raise CatalogueEmpty("Zendit listed no offers at all")
            snapshot = self._build(quotes, listed=len(seen))
            self._snapshot = snapshot
            self._loaded.set()
        metrics.catalogue_offers.labels(kind="listed").set(snapshot.listed)
        metrics.catalogue_offers.labels(kind="sellable").set(snapshot.sellable)
        log.info(
            "catalogue loaded",
            extra={
                "listed": snapshot.listed,
                "sellable": snapshot.sellable,
                "refused": {refusal.value: count for refusal, count in refused.items()},
                "seconds": round(self._clock() - started, 3),
            },
        )
        return snapshot

    def _build(self, quotes: list[Quote], *, listed: int) -> Snapshot:
        loaded_at = datetime.now(UTC)
        offers = [shop_offer(q) for q in quotes]
        countries: dict[str, list[ShopOffer]] = {}
        for offer in offers:
            if offer.country is not None:
                countries.setdefault(offer.country, []).append(offer)
        return Snapshot(
            loaded_at=loaded_at,
            loaded_monotonic=self._clock(),
            listed=listed,
            sellable=len(offers),
            everything=_render(offers, loaded_at),
            by_country={country: _render(group, loaded_at) for country, group in countries.items()},
            nothing=_render([], loaded_at),
        )

    async def run_once(self) -> int:
        try:
            snapshot = await self.refresh()
        except Exception as exc:
            self._last_refresh_ok = False
            metrics.catalogue_refreshes_total.labels(outcome="failed").inc()
            log.warning(
                "catalogue refresh failed",
                extra={
                    "error": f"{type(exc).__name__}: {exc}",
                    "serving_last_good_copy": self._snapshot is not None,
                },
                exc_info=not isinstance(exc, ZenditError | CatalogueEmpty),  # a bug deserves its traceback
            )
            return 0
        self._last_refresh_ok = True
        metrics.catalogue_refreshes_total.labels(outcome="ok").inc()
        return snapshot.sellable

    async def run_forever(self) -> None:
        while True:
            await self.run_once()
            delay = self.refresh_seconds
            if not self._last_refresh_ok:
                delay = min(self.retry_seconds, self.refresh_seconds)
            await asyncio.sleep(delay)

    def start(self) -> None:
        if self._task is not None:
            return
        metrics.catalogue_age_seconds.set_function(self.age_seconds)
        self._task = asyncio.create_task(self.run_forever(), name="catalogue-refresh")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
