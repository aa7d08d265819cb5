"""`GET /api/admin/failures?since_hours=24`: failed orders per step, from the `order.failed` history.

Every `order.failed` event reconcile consumed is a row of `order_failures` (see `reconcile.handlers`), so
the answer is exact across restarts and replicas; it counts failure events, so an order that failed at
two steps (a purchase, then its refund) counts once at each.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, Field

from esim_common.events import FailedStep
from esim_common.service import ServiceContext
from reconcile.admin import DATABASE_ERRORS, admin_guard
from reconcile.history_repository import StepFailures, failures_since
from reconcile.schemas import ErrorResponse

log = logging.getLogger("esim.reconcile.admin")

# A day, what an on-call shift looks back over; at most a quarter, what the table is queried for.
DEFAULT_SINCE_HOURS = 24
MAX_SINCE_HOURS = 90 * 24
STEPS: tuple[str, ...] = get_args(FailedStep)


class StepFailureSummary(BaseModel):
    step: str = Field(description="The step that failed for good (every step is listed, zero or not).")
    failures: int = Field(description="order.failed events for this step in the window.")
    last_reason: str | None = Field(description="The latest one's reason code (e.g. topup_declined).")
    last_at: datetime | None = Field(description="When it failed.")
    last_transaction_id: str | None = Field(description="The order (see GET /api/admin/orders/{id}).")


class FailuresResponse(BaseModel):
    generated_at: datetime
    since: datetime = Field(description="Start of the window.")
    since_hours: int
    total: int = Field(description="order.failed events in the window, over every step.")
    steps: list[StepFailureSummary]


def summarise(found: dict[str, StepFailures]) -> list[StepFailureSummary]:
    """Every known step in a stable order, then any other the history holds (an older event version)."""
    names = [*STEPS, *sorted(set(found) - set(STEPS))]
    summaries = []
    for name in names:
        row = found.get(name)
        summaries.append(
            StepFailureSummary(
                step=name,
                failures=row.failures if row else 0,
                last_reason=row.last_reason if row else None,
                last_at=row.last_at if row else None,
                last_transaction_id=row.last_transaction_id if row else None,
            )
        )
    return summaries


_RESPONSES: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: {"model": ErrorResponse, "description": "No valid bearer token."},
    status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "`since_hours` out of range."},
    status.HTTP_503_SERVICE_UNAVAILABLE: {"model": ErrorResponse, "description": "The database is away."},
}


def failure_admin_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(prefix="/api/admin", tags=["failures"])

    @router.get("/failures", dependencies=[Depends(admin_guard(ctx))], responses=_RESPONSES)
    async def list_failures(
        since_hours: Annotated[
            int, Query(ge=1, le=MAX_SINCE_HOURS, description="How far back, in hours.")
        ] = DEFAULT_SINCE_HOURS,
    ) -> FailuresResponse:
        """Orders that failed for good, per step: how many in the window and the latest reason."""
        now = datetime.now(UTC)
        since = now - timedelta(hours=since_hours)
        try:
            found = await failures_since(ctx.pool, since)
        except DATABASE_ERRORS as exc:
            log.warning("failure history unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, detail="the database is unavailable"
            ) from exc
        steps = summarise(found)
        return FailuresResponse(
            generated_at=now,
            since=since,
            since_hours=since_hours,
            total=sum(s.failures for s in steps),
            steps=steps,
        )

    return router
