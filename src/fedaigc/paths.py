"""Where fedaigc keeps what it can rebuild (generated data sets, trained evaluators), and how it
replaces a file that another process may be reading."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """`$FEDAIGC_CACHE`, else `~/.cache/fedaigc`."""
    return Path(os.environ.get("FEDAIGC_CACHE", Path.home() / ".cache" / "fedaigc"))


def keyed(kind: str, *parts) -> Path:
    """A cache folder named by a short hash of what determines its content."""
    key = hashlib.sha1("/".join(str(p) for p in parts).encode()).hexdigest()[:12]
    return cache_dir() / kind / key


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name next to `path` to write to; when the block succeeds it replaces `path` in one
    rename, so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)
