"""Seeds derived from what a random draw belongs to (seed, round, client id, ...), stable across
processes and machines (Python's `hash` of a string is salted per process)."""

from __future__ import annotations

import zlib


def derived_seed(*parts) -> int:
    """A stable 32-bit seed from (seed, round, client id, ...): crc32 of their text joined by '/'."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())
