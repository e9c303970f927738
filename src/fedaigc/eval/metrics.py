"""Metric functions: pure (tensors in, numbers out), so they test without a model.

- confident accuracy: share of samples whose top guess is the target *and* whose probability is at
  least the threshold; the top-guess share is reported beside it.
- evaluator-FID / KID: torchmetrics' FID and KID with a caller-given feature extractor (the
  evaluator's penultimate layer), never a downloaded Inception.
- latent alignment: mean cosine similarity of generated features to the centroid of real ones,
  raw and centred on the mean of all real images.
"""

from __future__ import annotations

import torch
from sklearn.metrics import adjusted_rand_score
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


def confident_accuracy(probs: torch.Tensor, target: int | torch.Tensor, threshold: float) -> dict[str, float]:
    """`confident`: top guess == target and its probability >= threshold; `top`: top guess == target."""
    if len(probs) == 0:
        return {"confident": float("nan"), "top": float("nan")}
    target = torch.as_tensor(target).expand(len(probs))
    p, guess = probs.max(-1)
    right = guess == target
    return {"confident": (right & (p >= threshold)).float().mean().item(), "top": right.float().mean().item()}


def alignment(real_features: torch.Tensor, fake_features: torch.Tensor, origin: torch.Tensor | float = 0.0) -> float:
    """Mean cosine similarity of each generated feature vector to the real features' centroid, with
    every vector measured from `origin` (0: the spec's alignment). From the mean of all
    real images (every domain), it is the centred alignment: features share a large common part, so
    the raw cosine is high for any image, and the centred one says whether an image leans towards its
    own domain's centroid rather than the others'."""
    centroid = real_features.mean(0, keepdim=True) - origin
    return torch.nn.functional.cosine_similarity(fake_features - origin, centroid, dim=-1).mean().item()


def fid_kid(real: torch.Tensor, fake: torch.Tensor, features: torch.nn.Module, kid_subsets: int = 50) -> dict[str, float]:
    """FID and KID (mean) between two image sets in [0, 1], in the feature space of `features`
    (a module with a `num_features` attribute). KID's subset size is the smaller set's size."""
    features.eval()
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    subset = min(len(real), len(fake), 1000)
    kid = KernelInceptionDistance(feature=features, normalize=True, subsets=kid_subsets, subset_size=subset)
    with torch.no_grad():
        for metric in (fid, kid):
            metric.update(real.float(), real=True)
            metric.update(fake.float(), real=False)
        kid_mean, _ = kid.compute()
        return {"fid": fid.compute().item(), "kid": kid_mean.item()}


def clustering_ari(true_labels: list, cluster_ids: list) -> float:
    """Adjusted Rand index of a clustering against the true groups (1 = perfect, ~0 = chance)."""
    return float(adjusted_rand_score(true_labels, cluster_ids))
