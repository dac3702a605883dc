"""Crash points for fault-injection tests: `kill -9` this process at a named point.

Crash safety is only proven by crashing. Tests start real edgefed processes with
EDGEFED_CRASH_AT=<point> and the process kills itself with SIGKILL when it reaches that point:
no cleanup handler, no finally block, no flush runs, exactly as if the power went out. A rerun
must then finish the work without repeating what was done. Unset, a crash point costs one
environment lookup.

Points: train-checkpoint (after the first checkpoint is written), store-write (a folder store's
blob written to its temp file, not yet linked to its name: a device writing a shared folder, or
a relay writing its own), publish-blob (adapter uploaded, manifest not yet), aggregate-mix
(mixed adapter written, trust row not yet), and round-<step> (a round step's work done, its
completion not yet recorded).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "EDGEFED_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process when EDGEFED_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
