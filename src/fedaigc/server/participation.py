"""Which clients train in a round, and what a simulated network makes of it.

A client is asked from its join round on (`federation.join_rounds`), only in rounds where it is
online (`network.participation`, its chance per round), and then only if the sampling picks it
(`federation.fraction` of the online clients). Every draw is a pure function of (seed, round,
client), and what depends on earlier rounds (network sampling, the participation estimate) is
replayed from round 1, so a resumed server makes exactly the choices of an uninterrupted one.

Network awareness (`federation.sampling` / `federation.weighting` = "network") corrects for
participation bias with the server's own estimate of each client's participation rate, the
Laplace estimate from the rounds since it joined: sampling prefers the clients it saw least,
and aggregation weights each update by examples / estimated rate (self-normalised inverse
propensity). Rounds are synchronous and every participant trains from what the server sent it
this round, so no update is stale; a long gap since a client's last round only says that its rate
is low, and it raises the client's weight instead of discounting it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedaigc.config import Config, NetworkConfig
from fedaigc.protocol.seeds import derived_seed


def per_client(values: tuple, cid: int, default: float) -> float:
    """Item `cid mod len(values)` of a per-client list (`default` for an empty one)."""
    return values[cid % len(values)] if values else default


@dataclass(frozen=True)
class Link:
    """One client's simulated device and network."""

    participation: float  # chance to be online in a round
    bandwidth: float  # Mbit/s, either direction
    latency: float  # seconds per message
    step_seconds: float  # seconds per local training step

    def seconds(self, bytes_down: int, bytes_up: int, steps: int) -> float:
        """A round as this client sees it: two messages, both transfers and the local steps."""
        return 2 * self.latency + 8 * (bytes_down + bytes_up) / (self.bandwidth * 1e6) + steps * self.step_seconds


def link(net: NetworkConfig, cid: int) -> Link:
    return Link(
        per_client(net.participation, cid, 1.0),
        per_client(net.bandwidth, cid, math.inf),
        per_client(net.latency, cid, 0.0),
        per_client(net.step_seconds, cid, 0.0),
    )


def join_round(cfg: Config, cid: int) -> int:
    """The first round client `cid` is asked to train (1 unless `federation.join_rounds` says later)."""
    return max(1, int(per_client(cfg.federation.join_rounds, cid, 1)))


def _rng(seed: int, kind: str, server_round: int, cid: int) -> np.random.Generator:
    """A generator for one client's draw of one kind in one round, seeded by nothing else."""
    return np.random.default_rng(derived_seed(seed, kind, server_round, cid))


def online(cfg: Config, cids: list[int], server_round: int) -> list[int]:
    """The clients that have joined by this round and are online in it."""
    seed = cfg.federation.seed
    return [
        c
        for c in sorted(cids)
        if join_round(cfg, c) <= server_round
        and _rng(seed, "online", server_round, c).random() < link(cfg.network, c).participation
    ]


def sample_clients(cids: list[int], fraction: float, seed: int, server_round: int) -> list[int]:
    """All clients when `fraction` >= 1, else ⌈fraction·n⌉ of them (at least one), drawn without
    replacement with a generator seeded by (seed, round)."""
    cids = sorted(cids)
    if fraction >= 1.0 or not cids:
        return cids
    n = max(1, math.ceil(fraction * len(cids)))
    rng = np.random.default_rng(derived_seed(seed, "sample", server_round))
    return sorted(int(c) for c in rng.choice(cids, size=n, replace=False))


def priority_sample(weights: dict[int, float], fraction: float, seed: int, server_round: int) -> list[int]:
    """⌈fraction·n⌉ clients drawn without replacement with probability ∝ weight (Gumbel top-k:
    each client's key is log w + its own Gumbel draw of (seed, round, client))."""
    if fraction >= 1.0 or not weights:
        return sorted(weights)
    n = max(1, math.ceil(fraction * len(weights)))
    keys = {c: math.log(w) + _rng(seed, "priority", server_round, c).gumbel() for c, w in weights.items()}
    return sorted(sorted(keys, key=lambda c: -keys[c])[:n])


def rate(history: list[list[int]], cid: int, joined: int) -> float:
    """The server's estimate of client `cid`'s chance to train in a round: (k + 1) / (m + 2) over
    the m rounds of `history` (who trained in rounds 1, 2, ...) since it joined, k of which it trained in."""
    since = history[joined - 1 :]
    return (sum(cid in r for r in since) + 1) / (len(since) + 2)


def schedule(cfg: Config, cids: list[int], rounds: int) -> list[list[int]]:
    """Who is asked to train in each of rounds 1..`rounds`."""
    f = cfg.federation
    history: list[list[int]] = []
    for t in range(1, rounds + 1):
        ready = online(cfg, cids, t)
        if f.sampling == "network":
            inverse = {c: 1 / rate(history, c, join_round(cfg, c)) for c in ready}
            history.append(priority_sample(inverse, f.fraction, f.seed, t))
        else:
            history.append(sample_clients(ready, f.fraction, f.seed, t))
    return history


def participants(cfg: Config, cids: list[int], server_round: int) -> list[int]:
    """The clients asked to train in `server_round`."""
    return schedule(cfg, cids, server_round)[-1]


def weights(cfg: Config, cids: list[int], server_round: int) -> dict[int, float]:
    """Per-client multipliers of the example counts in this round's aggregation: 1 (plain), or the
    inverse of the estimated participation rate from the rounds before (network)."""
    if cfg.federation.weighting == "plain":
        return dict.fromkeys(cids, 1.0)
    history = schedule(cfg, cids, server_round - 1)
    return {c: 1 / rate(history, c, join_round(cfg, c)) for c in cids}


def round_seconds(net: NetworkConfig, steps: int, down: dict[int, int], up: dict[int, int]) -> float:
    """Simulated wall time of a synchronous round: the slowest client that replied (`up`: its
    upload bytes; `down`: what it was sent)."""
    return max((link(net, c).seconds(down.get(c, 0), b, steps) for c, b in up.items()), default=0.0)
