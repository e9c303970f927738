"""Where fedaigc keeps what it can rebuild: generated data sets and trained evaluators."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """`$FEDAIGC_CACHE`, else `~/.cache/fedaigc`."""
    return Path(os.environ.get("FEDAIGC_CACHE", Path.home() / ".cache" / "fedaigc"))


def keyed(kind: str, *parts) -> Path:
    """A cache folder named by a short hash of what determines its content."""
    key = hashlib.sha1("/".join(str(p) for p in parts).encode()).hexdigest()[:12]
    return cache_dir() / kind / key
