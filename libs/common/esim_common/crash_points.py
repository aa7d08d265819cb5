"""Named points where a process can be made to die abruptly, so recovery tests crash it exactly there.

    CRASH_POINTS=funding.after_card_created python -m funding

`crash_here("funding.after_card_created")` then ends the process with `os._exit` — no `finally`, no
ack, no flush, no closing of connections: what a SIGKILL or a lost machine does at that instant. The
setting is refused outside `ENVIRONMENT=sandbox` (see `Settings`), and with no points armed a call is
one set lookup.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

log = logging.getLogger("esim.crash_points")

# The exit status of a crashed process (that of SIGKILL as a shell reports it), so a test can tell
# an armed crash from any other exit.
CRASH_EXIT_STATUS = 137

_armed: frozenset[str] = frozenset()


def arm(points: Iterable[str]) -> None:
    global _armed
    _armed = frozenset(points)
    if _armed:
        log.warning("crash points armed: the process dies at them", extra={"crash_points": sorted(_armed)})


def crash_here(point: str) -> None:
    if point in _armed:
        # One line on stderr, unbuffered, so the test can see which point fired; then die at once.
        sys.stderr.write(f"crash point {point}: exiting abruptly\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_STATUS)
