"""The reconciliation mismatches in the admin API, behind the admin bearer token (`admin.admin_guard`).

    GET  /api/admin/mismatches?kind=…&include_resolved=…&limit=…   open ones (and resolved ones), newest first
    POST /api/admin/mismatches/{id}/acknowledge {"note"}            close one by hand (aged out, or settled)
    POST /api/admin/reconcile/run                                   run the ledger checks now; their result
    POST /api/admin/reconcile/wallet/accept {"note"}                accept Zendit's balance as it is now

A run stores what it finds exactly like the scheduled one (the two never interleave: see mismatch_store).
A provider that does not answer is not an HTTP error here: the result names it under `sources_failed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from esim_common.service import ServiceContext
from reconcile import ledger_checks, mismatch_store
from reconcile.admin import admin_guard, json_body
from reconcile.domain import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from reconcile.ledger_checks import ExtraCheck, LedgerRunResult
from reconcile.mismatch_store import StoredMismatch
from reconcile.mismatches import MISMATCH_KINDS
from reconcile.schemas import ErrorResponse

_INVALID: dict[int | str, dict[str, Any]] = {
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "description": "Invalid request (an unknown kind lists the valid ones)."
    }
}


class MismatchList(BaseModel):
    open: dict[str, int] = Field(description="Open mismatches per kind (every kind, 0 included).")
    mismatches: list[StoredMismatch] = Field(
        description="Open first, then (with include_resolved) resolved; most recently seen first."
    )


class NoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # No NUL character: Postgres text cannot store one (it came back as a 500; now a 422).
    note: str = Field(
        min_length=1, max_length=500, pattern=r"^[^\x00]*$", description="Why (kept in operator_actions)."
    )


class AcknowledgeResponse(BaseModel):
    id: int
    acknowledged: bool = True


class AcceptWalletRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(
        min_length=1, max_length=500, pattern=r"^[^\x00]*$", description="Why the balance is right (audited)."
    )


class AcceptWalletResponse(BaseModel):
    accepted: bool = Field(description="False when no anchor was stored (nothing to accept).")
    currency: str | None


def mismatch_admin_router(
    ctx: ServiceContext, *, extra_checks: Callable[[], Sequence[ExtraCheck]] = tuple
) -> APIRouter:
    """`extra_checks`: the producers stored with the ledger checks on each run (the Issuing checks)."""
    router = APIRouter(
        prefix="/api/admin",
        tags=["admin: reconciliation"],
        dependencies=[Depends(admin_guard(ctx))],
        responses={status.HTTP_401_UNAUTHORIZED: {"model": ErrorResponse, "description": "No valid token."}},
    )

    @router.get(
        "/mismatches",
        responses=_INVALID,
    )
    async def list_mismatches(
        kind: Annotated[str | None, Query(description=f"One of {', '.join(MISMATCH_KINDS)}.")] = None,
        include_resolved: Annotated[
            bool, Query(description="Also the ones a later run no longer found.")
        ] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = DEFAULT_LIST_LIMIT,
    ) -> MismatchList:
        """What scheduled reconciliation found wrong between our records, Stripe and Zendit."""
        if kind is not None and kind not in MISMATCH_KINDS:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"unknown mismatch kind; valid kinds: {', '.join(MISMATCH_KINDS)}",
            )
        return MismatchList(
            open=await mismatch_store.open_counts(ctx.pool),
            mismatches=await mismatch_store.list_mismatches(
                ctx.pool, kind=kind, include_resolved=include_resolved, limit=limit
            ),
        )

    @router.post(
        "/mismatches/{mismatch_id}/acknowledge",
        responses={
            status.HTTP_404_NOT_FOUND: {"model": ErrorResponse, "description": "No such mismatch."},
            status.HTTP_409_CONFLICT: {
                "model": ErrorResponse,
                "description": "Resolved already, or a balance drift (accept it).",
            },
            **_INVALID,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": NoteRequest.model_json_schema()}},
            }
        },
    )
    async def acknowledge(
        mismatch_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
        body: Annotated[NoteRequest, Depends(json_body(NoteRequest))],
    ) -> AcknowledgeResponse:
        """Close an open mismatch by hand: one settled outside the system, or one whose evidence is older
        than the look-back window (runs no longer re-check those, so they never resolve by themselves)."""
        try:
            found = await mismatch_store.acknowledge(ctx.pool, mismatch_id, body.note)
        except (mismatch_store.AlreadyResolved, mismatch_store.UseAcceptWallet) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
        if not found:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no mismatch {mismatch_id}")
        return AcknowledgeResponse(id=mismatch_id)

    @router.post("/reconcile/run")
    async def run_now() -> LedgerRunResult:
        """Run the reconciliation checks now (as the schedule does) and answer their result."""
        return await ledger_checks.run_with_settings(ctx.pool, ctx.settings, extra=extra_checks())

    @router.post(
        "/reconcile/wallet/accept",
        responses=_INVALID,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": AcceptWalletRequest.model_json_schema()}},
            }
        },
    )
    async def accept_wallet(
        body: Annotated[AcceptWalletRequest, Depends(json_body(AcceptWalletRequest))],
    ) -> AcceptWalletResponse:
        """Accept the Zendit wallet's balance as it is now (after settling a wallet_balance_drift with
        Zendit): the balance check forgets what it expected and the next run starts from the current
        balance, which resolves the drift. Recorded in operator_actions with the note."""
        currency = await mismatch_store.accept_wallet_balance(ctx.pool, body.note)
        return AcceptWalletResponse(accepted=currency is not None, currency=currency)

    return router
