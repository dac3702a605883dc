"""Where edgefed keeps its state: $EDGEFED_HOME, or ~/.edgefed.

Tests point EDGEFED_HOME at a temporary folder so they never touch a user's real state.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "EDGEFED_HOME"


def edgefed_home() -> Path:
    """The root of edgefed's state (workspaces, caches)."""
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".edgefed")


def cache_dir(kind: str) -> Path:
    """A cache folder of one kind (e.g. 'nf4'), safe to delete at any time."""
    return edgefed_home() / "cache" / kind
