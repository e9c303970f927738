"""Screening a cluster's uploads against poisoning, in ΔW space (`federation.defense = "robust"`).

Member i's update is U_i = s·(B_i A_i - B_0 A_0) against what the server sent it (B_0 A_0; none
in round 1, when LoRA B starts at zero, so ΔW = 0). Their Gram matrices ⟨U_i, U_j⟩_F per layer
come from products of the thin factors, never a full matrix; they fix the updates' geometry, so
geometric medians (robust: one attacker in five cannot drag them far) and every norm and cosine
follow from n numbers per member. Rejected: an update longer than `norm_bound` x the median norm
(scaled or boosted updates), or one pointing away from the other members' geometric median update
(sign-flipped or random updates), i.e. with a cosine to it well below the cluster's typical one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedaigc.protocol.lora import Adapter
from fedaigc.server import aggregation as agg

MIN_MEMBERS = 3  # below this a median cannot out-vote one attacker: such clusters are not screened


def update_grams(uploaded: Sequence[Adapter], received: Sequence[Adapter | None], scale: float) -> torch.Tensor:
    """(layers, n, n): per layer, the Gram matrix of the members' ΔW updates U_i = s·(B_i A_i − B_0 A_0)
    against what each was sent (`aggregation.change`, `aggregation.layer_grams`), text encoder included."""
    changes = [agg.change(up, ref, prefix="", dtype=torch.float64) for up, ref in zip(uploaded, received, strict=True)]
    return scale**2 * agg.layer_grams(changes)


def balanced(grams: torch.Tensor) -> torch.Tensor:
    """The layers' Gram matrices summed, each divided by its members' median squared norm, so every
    layer gets one vote: measured on the demo, the 24 text-encoder layers carry most of the norm
    and agree least across clients, and would drown the UNet layers where clients agree."""
    typical = grams.diagonal(dim1=1, dim2=2).median(dim=1).values
    keep = typical > 0  # a layer that most members leave unchanged says nothing about agreement
    return (grams[keep] / typical[keep, None, None]).sum(0)


def leave_one_out_cosines(points: torch.Tensor) -> torch.Tensor:
    """Each point's cosine to the geometric median of the others (equal votes: a claimed example
    count buys no weight). Honest updates of one style share a direction only weakly (measured on
    the demo: pairwise cosines about 0-0.3 after 40 local steps), so a point's own vote would hide an outlier."""
    n = len(points)
    medians = [agg.geometric_median(points[[j for j in range(n) if j != i]], [1.0] * (n - 1)) for i in range(n)]
    return torch.nn.functional.cosine_similarity(points, torch.stack(medians), dim=1, eps=1e-12)


def screen_cluster(
    uploaded: dict[int, Adapter],
    received: dict[int, Adapter | None],
    scale: float,
    norm_bound: float = 3.0,
    cos_factor: float = 0.3,
) -> tuple[list[int], dict[int, str]]:
    """Accepted member ids and {id: reason} rejections: a ΔW update longer than `norm_bound` x the
    members' median norm, or whose cosine (layers balanced) to the other members' median update is
    below `cos_factor` x the members' median such cosine (no cosine test where that median is <= 0:
    the cluster agrees on nothing). Clusters of fewer than `MIN_MEMBERS` pass unscreened."""
    ids = sorted(uploaded)
    if len(ids) < MIN_MEMBERS:
        return ids, {}
    grams = update_grams([uploaded[c] for c in ids], [received[c] for c in ids], scale)
    norms = grams.sum(0).diagonal().sqrt()
    cosines = leave_one_out_cosines(agg.gram_points(balanced(grams)))
    median_norm, median_cos = norms.median().item(), cosines.median().item()
    rejected: dict[int, str] = {}
    for c, n, cos in zip(ids, norms.tolist(), cosines.tolist(), strict=True):
        if median_norm > 0 and n > norm_bound * median_norm:
            rejected[c] = f"ΔW update norm {n:.3g} > {norm_bound:g} x cluster median {median_norm:.3g}"
        elif median_cos > 0 and cos < cos_factor * median_cos:
            rejected[c] = (
                f"ΔW update cosine {cos:.2f} to the others' median update < {cos_factor:g} x cluster median {median_cos:.2f}"
            )
    return [c for c in ids if c not in rejected], rejected
