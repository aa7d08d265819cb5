"""Which failures mean "a dependency is down right now" (answer 503: try again) rather than a bug (500)."""

from __future__ import annotations

from asyncpg import exceptions as pg

from esim_common.errors import TransientError

DEPENDENCY_UNAVAILABLE: tuple[type[BaseException], ...] = (
    TransientError,  # PublishFailed, Stripe/Zendit transient errors
    OSError,  # refused connections and timeouts (TimeoutError is an OSError)
    pg.InterfaceError,  # a closed pool or connection
    pg.PostgresConnectionError,
    pg.OperatorInterventionError,  # the server is shutting down or starting
    pg.InsufficientResourcesError,  # too many connections, disk full
    pg.TransactionRollbackError,  # serialization failure, deadlock: retrying succeeds
)
