"""Which clients train in a round. Pure functions of (seed, round), so a resumed server samples
the same clients as an uninterrupted one."""

from __future__ import annotations

import math

import numpy as np

from fedaigc.client.client_app import derived_seed


def sample_clients(cids: list[int], fraction: float, seed: int, server_round: int) -> list[int]:
    """All clients when `fraction` >= 1, else ⌈fraction·n⌉ of them (at least one), drawn without
    replacement with a generator seeded by (seed, round)."""
    cids = sorted(cids)
    if fraction >= 1.0 or not cids:
        return cids
    n = max(1, math.ceil(fraction * len(cids)))
    rng = np.random.default_rng(derived_seed(seed, "sample", server_round))
    return sorted(int(c) for c in rng.choice(cids, size=n, replace=False))
