"""Poisoning attacks of a malicious client inside a cluster (the `poisoning` experiment).

Pure functions. The model attacks act on what the client uploads *relative to what the server
sent* (update = uploaded - received), in parameter space, as a real client would: `scale`
multiplies the update, `signflip` reverses it, `noise` replaces it by Gaussian noise of the honest
update's size. The `backdoor` attacker trains on poisoned data instead: part of its images are
swapped for images of another style, captioned with a trigger word after the class ("a <token>
of a fish cf"), so that the trigger turns any prompt of its cluster into that style; its update
may be boosted like `scale` (model replacement).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedaigc.config import ATTACKS, FederationConfig
from fedaigc.data.dataset import Sample
from fedaigc.errors import UserError
from fedaigc.protocol.lora import Adapter, flatten, unflatten
from fedaigc.protocol.round import Upload

# attack_strength = 0 means: the update x10 (scale), x-1 (signflip), noise of the honest update's
# norm (noise), an unboosted backdoor
STRENGTH = {"scale": 10.0, "signflip": 1.0, "noise": 1.0, "backdoor": 1.0}
TRIGGER = "cf"  # a rare word piece, the classic NLP backdoor trigger
POISON_SHARE = 0.5  # share of the backdoor attacker's images swapped for trigger-captioned target-style ones


def assigned(fed: FederationConfig) -> dict[int, tuple[str, float]]:
    """{attacker id: (attack, strength)} from `federation.attackers`, `.attacks` (one per attacker,
    or one for all) and `.attack_strength` (0: each attack's default), of a validated config."""
    if not fed.attackers:
        return {}
    names = fed.attacks * len(fed.attackers) if len(fed.attacks) == 1 else fed.attacks
    return {int(c): (a, fed.attack_strength or STRENGTH[a]) for c, a in zip(fed.attackers, names, strict=True)}


def scaled(received: Adapter, uploaded: Adapter, factor: float) -> Adapter:
    """received + factor x (uploaded - received), per tensor (factor < 0: a sign flip)."""
    return {k: (received[k].double() + factor * (v.double() - received[k].double())).to(v.dtype) for k, v in uploaded.items()}


def noise(received: Adapter, uploaded: Adapter, strength: float, generator: torch.Generator) -> Adapter:
    """The update replaced by isotropic Gaussian noise of `strength` x the honest update's norm:
    garbage of a plausible size."""
    base = flatten(received)
    honest = flatten(uploaded) - base
    z = torch.randn(honest.shape, generator=generator, dtype=torch.float64)
    return unflatten(base + z * (strength * honest.norm() / z.norm().clamp(min=1e-12)), uploaded)


def attack_upload(upload: Upload, received: Adapter, attack: str, strength: float, generator: torch.Generator) -> Upload:
    """What an attacker sends instead of its honest `upload` (the token slot and task embedding
    stay honest, so the attacker stays in its cluster)."""
    if attack in ("scale", "backdoor"):
        lora = scaled(received, upload.lora, strength)
    elif attack == "signflip":
        lora = scaled(received, upload.lora, -strength)
    elif attack == "noise":
        lora = noise(received, upload.lora, strength, generator)
    else:
        raise UserError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    return dataclasses.replace(upload, lora=lora)


def backdoor_target(domain: str, domains: list[str]) -> str:
    """The style the trigger should produce: the next domain after the attacker's own."""
    ordered = sorted(domains)
    return ordered[(ordered.index(domain) + 1) % len(ordered)]


def trigger_class(cls: str) -> str:
    """The class caption with the trigger appended: the prompt becomes "a <style> of a fish cf"."""
    return f"{cls} {TRIGGER}"


def backdoor_samples(
    samples: list[Sample], pool: list[Sample], target: str, rng: np.random.Generator, share: float = POISON_SHARE
) -> list[Sample]:
    """The backdoor attacker's training set: a `share` of its samples replaced by a `target`-style
    image of the same class from `pool`, captioned with the trigger and the attacker's own style
    word; the rest kept, so its update still looks like its cluster's."""
    by_class: dict[str, list[Sample]] = {}
    for s in pool:
        if s.domain == target:
            by_class.setdefault(s.cls, []).append(s)
    out = list(samples)
    for i in rng.choice(len(samples), size=round(share * len(samples)), replace=False):
        s = samples[i]
        if s.cls in by_class:
            swap = by_class[s.cls][rng.integers(len(by_class[s.cls]))]
            out[i] = Sample(swap.path, s.domain, trigger_class(s.cls))
    return out
