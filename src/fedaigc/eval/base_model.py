"""Scoring the pretrained base model (or a folder of generated images) with the evaluator."""

from __future__ import annotations

import time
from pathlib import Path

from fedaigc.data.dataset import ImageFolder, ensure_dataset, split
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.report import save_grid, save_images
from fedaigc.eval.scoring import heldout_accuracy, real_feature_mean, score
from fedaigc.model.base import load_model
from fedaigc.model.sampling import generate


def class_samples(model, cfg, classes: list[str], per_class: int, progress: bool = True):
    """`per_class` samples of each class with a style-free prompt ("a picture of a star"), seeds 0..N-1."""
    prompts = [f"a picture of a {c}" for c in classes for _ in range(per_class)]
    return generate(
        model,
        prompts,
        list(range(len(prompts))),
        cfg.sample.steps,
        cfg.sample.guidance,
        cfg.sample.guidance_rescale,
        progress=progress,
    )


def evaluate_base(
    cfg,
    out: Path,
    data_dir: Path | None,
    model_dir: Path | None,
    evaluator_path: Path | None = None,
    samples_dir: Path | None = None,
    per_class: int = 16,
    progress: bool = True,
) -> dict:
    """Train or load the evaluator, report its held-out accuracy, and score base-model samples
    (or a folder of samples). Returns what `evaluation.json` holds."""
    out.mkdir(parents=True, exist_ok=True)
    data = ImageFolder(ensure_dataset(data_dir, cfg), size=cfg.data.size)
    train, test = split(data.samples, cfg.data.held_out, cfg.data.seed)
    t0 = time.perf_counter()
    evaluator = evaluator_for(data, train, cfg.evaluator, evaluator_path, progress=progress)
    threshold = cfg.evaluator.confidence
    real = data.stack(test)
    result = {
        "threshold": threshold,
        "evaluator": heldout_accuracy(evaluator, real, [s.domain for s in test], [s.cls for s in test], threshold),
    }
    result["evaluator"]["seconds"] = round(time.perf_counter() - t0, 1)
    real_mean = real_feature_mean(evaluator, real)
    rows, labels = [], []
    for dom in data.domains:
        rows.append(data.stack([s for s in test if s.domain == dom][:12]))
        labels.append(f"real {dom}")
    save_grid(rows, out / "real_grid.png", labels=labels)
    if samples_dir is not None:
        gen_data = ImageFolder(samples_dir, size=cfg.data.size)
        images = gen_data.stack(gen_data.samples)
        asked = [s.cls for s in gen_data.samples]
        per_domain = {}
        for dom in gen_data.domains:
            idx = [i for i, s in enumerate(gen_data.samples) if s.domain == dom]
            data.check_domains([dom])
            real_dom = data.stack([s for s in test if s.domain == dom])
            per_domain[dom] = score(evaluator, images[idx], real_dom, dom, [asked[i] for i in idx], threshold, real_mean)
        result["samples"] = {"folder": str(samples_dir), "per_domain": per_domain}
        return result
    model = load_model(model_dir, dtype=cfg.model.dtype, resolution=cfg.model.resolution)
    classes = list(evaluator.classes)
    t0 = time.perf_counter()
    images = class_samples(model, cfg, classes, per_class, progress)
    seconds = time.perf_counter() - t0
    base = score(evaluator, images, real, None, [c for c in classes for _ in range(per_class)], threshold, real_mean)
    base["seconds"] = round(seconds, 1)
    base["samples"] = len(images)
    result["base_model"] = {"model": str(model_dir or "embedded default"), **base}
    save_grid(list(images.split(per_class)), out / "base_grid.png", labels=classes)
    save_images(images, out / "samples" / "base")
    return result
