"""Scoring generated images with the evaluator: the numbers every report shows."""

from __future__ import annotations

import torch

from fedaigc.eval.evaluator import Evaluator
from fedaigc.eval.metrics import alignment, confident_accuracy, fid_kid

SCORES = ("style_acc", "style_top", "class_acc", "class_top", "fid", "kid", "alignment", "alignment_centred")  # per client


def score(
    evaluator: Evaluator,
    generated: torch.Tensor,
    real: torch.Tensor,
    domain: str | None,
    classes_asked: list[str],
    threshold: float,
    real_mean: torch.Tensor,
) -> dict[str, float]:
    """Style accuracy (for `domain`), class accuracy (for the class each image was asked for),
    evaluator-FID, KID and latent alignment against `real` images of the same domain, raw and from
    `real_mean`, the evaluator features' mean over the real images of every domain (`real_feature_mean`)."""
    pred = evaluator.predict(generated)
    real_features = evaluator.predict(real)["features"]
    out: dict[str, float] = {}
    if domain is not None:
        style = confident_accuracy(pred["domain"], evaluator.domains.index(domain), threshold)
        out["style_acc"], out["style_top"] = style["confident"], style["top"]
    target = torch.tensor([evaluator.classes.index(c) for c in classes_asked])
    cls = confident_accuracy(pred["class"], target, threshold)
    out["class_acc"], out["class_top"] = cls["confident"], cls["top"]
    out.update(fid_kid(real, generated, evaluator))
    out["alignment"] = alignment(real_features, pred["features"])
    out["alignment_centred"] = alignment(real_features, pred["features"], origin=real_mean)
    out["domain_shares"] = {d: (pred["domain"].argmax(-1) == i).float().mean().item() for i, d in enumerate(evaluator.domains)}
    return out


def real_feature_mean(evaluator: Evaluator, real: torch.Tensor) -> torch.Tensor:
    """The origin of the centred alignment: the mean evaluator feature of real images of every domain."""
    return evaluator.predict(real)["features"].mean(0)


def heldout_accuracy(
    evaluator: Evaluator, images: torch.Tensor, domains: list[str], classes: list[str], threshold: float
) -> dict[str, float]:
    """The evaluator's own accuracy on held-out real images (top guess and confident)."""
    pred = evaluator.predict(images)
    dom = confident_accuracy(pred["domain"], torch.tensor([evaluator.domains.index(d) for d in domains]), threshold)
    cls = confident_accuracy(pred["class"], torch.tensor([evaluator.classes.index(c) for c in classes]), threshold)
    return {
        "domain_top": dom["top"],
        "domain_confident": dom["confident"],
        "class_top": cls["top"],
        "class_confident": cls["confident"],
        "images": len(images),
    }
