"""The evaluator: a small CNN with a domain head and a class head, trained on the real images.

It is trained to be *unsure* on what is neither (smooth noise blobs, heavy blur, cross-domain
blends), so a generated blob does not pass as "sketch" just because argmax says so. Its
penultimate features are the feature space of evaluator-FID, KID and latent alignment.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedaigc.config import EvaluatorConfig
from fedaigc.data.dataset import ImageFolder, Sample
from fedaigc.errors import UserError

log = logging.getLogger(__name__)

INPUT_SIZE = 32


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Evaluator(nn.Module):
    num_features = 64  # torchmetrics reads this to size FID/KID state

    def __init__(self, domains: list[str], classes: list[str]):
        super().__init__()
        self.domains, self.classes = list(domains), list(classes)
        self.body = nn.Sequential(
            _block(3, 16),
            _block(16, 32),
            _block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, self.num_features),
            nn.ReLU(),
        )
        self.domain_head = nn.Linear(self.num_features, len(domains))
        self.class_head = nn.Linear(self.num_features, len(classes))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of any size -> the evaluator's input."""
        if images.shape[-1] != INPUT_SIZE:
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features: this makes the module a torchmetrics FID/KID feature extractor."""
        return self.features(images)

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(images)
        return self.domain_head(f), self.class_head(f)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Domain and class probabilities and features of images in [0, 1]."""
        self.eval()
        out = {"domain": [], "class": [], "features": []}
        for i in range(0, len(images), batch_size):
            f = self.features(images[i : i + batch_size])
            out["domain"].append(self.domain_head(f).softmax(-1))
            out["class"].append(self.class_head(f).softmax(-1))
            out["features"].append(f)
        return {k: torch.cat(v) for k, v in out.items()}

    def save(self, path: Path, info: dict | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))
        meta = {"domains": self.domains, "classes": self.classes, **(info or {})}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Evaluator:
        path = Path(path)
        meta_file = path.with_suffix(".json")
        if not path.is_file() or not meta_file.is_file():
            raise UserError(f"evaluator not found: {path} (and {meta_file.name} beside it)")
        meta = json.loads(meta_file.read_text())
        model = cls(meta["domains"], meta["classes"])
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as e:  # safetensors raises several types for a bad file
            raise UserError(f"corrupt evaluator file {path}: {e}") from None
        model.info = meta
        return model.eval()


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma in pixels, one per image)."""
    k = torch.arange(-4, 5, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)
    b, c, h, wd = x.shape
    x = x.reshape(1, b * c, h, wd)
    kx = w.repeat_interleave(c, 0)[:, None, None, :]
    ky = w.repeat_interleave(c, 0)[:, None, :, None]
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="replicate"), kx, groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, 4, 4), mode="replicate"), ky, groups=b * c)
    return x.reshape(b, c, h, wd)


def _noise_blobs(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth coloured noise: what an untrained or broken generator produces."""
    low = torch.rand(n, 3, 4, 4, generator=gen)
    mid = torch.rand(n, 3, 8, 8, generator=gen) * 0.5
    x = F.interpolate(low, size=size, mode="bicubic", align_corners=False) + F.interpolate(
        mid, size=size, mode="bicubic", align_corners=False
    )
    x = (x - x.amin((1, 2, 3), keepdim=True)) / (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True) + 1e-6)
    return x * torch.rand(n, 1, 1, 1, generator=gen) * 0.8 + torch.rand(n, 1, 1, 1, generator=gen) * 0.2


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(-1)).sum(-1)


@dataclass
class EvaluatorBatch:
    images: torch.Tensor
    domain_target: torch.Tensor  # soft targets (B, D)
    class_target: torch.Tensor  # soft targets (B, C)


def make_batch(images, domains, classes, n_dom, n_cls, gen) -> EvaluatorBatch:
    """Augmented real images (labels kept) + a quarter of "unsure" images (uniform targets)."""
    b = images.shape[0]
    x = images.clone()
    x = torch.where((torch.rand(b, generator=gen) < 0.5)[:, None, None, None], x.flip(-1), x)
    shift = torch.randint(-2, 3, (2,), generator=gen)
    x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
    light = torch.rand(b, generator=gen) < 0.5
    x = torch.where(light[:, None, None, None], _blur(x, torch.rand(b, generator=gen) * 0.7 + 0.1), x)
    x = (x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06).clamp(0, 1)
    dt = F.one_hot(domains, n_dom).float()
    ct = F.one_hot(classes, n_cls).float()
    q = b // 4
    # unsure 1: noise blobs (both heads uniform)
    x[:q] = _noise_blobs(q, x.shape[-1], gen)
    dt[:q] = 1.0 / n_dom
    ct[:q] = 1.0 / n_cls
    # unsure 2: heavy blur destroys the style (domain uniform), the silhouette may survive
    hb = slice(q, q + q // 2)
    x[hb] = _blur(x[hb], torch.rand(q // 2, generator=gen) * 1.5 + 1.8)
    dt[hb] = 1.0 / n_dom
    # unsure 3: blends of two images: soft targets, never confident
    bl = slice(q + q // 2, 2 * q)
    m = bl.stop - bl.start
    lam = torch.rand(m, 1, 1, 1, generator=gen) * 0.4 + 0.3
    perm = torch.randperm(b, generator=gen)[:m]
    x[bl] = lam * x[bl] + (1 - lam) * images[perm]
    dt[bl] = lam.view(m, 1) * dt[bl] + (1 - lam.view(m, 1)) * F.one_hot(domains[perm], n_dom).float()
    ct[bl] = lam.view(m, 1) * ct[bl] + (1 - lam.view(m, 1)) * F.one_hot(classes[perm], n_cls).float()
    return EvaluatorBatch(x, dt, ct)


def train_evaluator(data: ImageFolder, train: list[Sample], cfg: EvaluatorConfig, progress: bool = True) -> Evaluator:
    """Trained on one thread, so the same data and config give the same evaluator on any core
    count: the float sums of a multi-threaded backward pass depend on the number of threads, and
    an evaluator trained on 2 threads moved the demo's evaluator-FID from 16.8 to 16.1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_evaluator(data, train, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train_evaluator(data: ImageFolder, train: list[Sample], cfg: EvaluatorConfig, progress: bool) -> Evaluator:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Evaluator(data.domains, data.classes)
    images = data.stack(train)
    dom = torch.tensor([data.domains.index(s.domain) for s in train])
    cls = torch.tensor([data.classes.index(s.cls) for s in train])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    model.train()
    for _ in tqdm(range(cfg.steps), desc="training evaluator", unit="step", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        batch = make_batch(images[idx], dom[idx], cls[idx], len(data.domains), len(data.classes), gen)
        d_logits, c_logits = model.logits(batch.images)
        loss = (_soft_ce(d_logits, batch.domain_target) + _soft_ce(c_logits, batch.class_target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def evaluator_for(
    data: ImageFolder, train: list[Sample], cfg: EvaluatorConfig, path: Path | None = None, progress: bool = True
) -> Evaluator:
    """Load the evaluator at `path`, else the one cached for this data and config, else train
    (and cache) one. The cache key covers the data folder's manifest and the training config."""
    if path is not None:
        return Evaluator.load(path)
    from fedaigc.paths import keyed

    manifest = data.root / "manifest.json"
    stamp = manifest.read_text() if manifest.is_file() else str([(s.path.name, s.domain, s.cls) for s in train])
    shapes = [tuple(p.shape) for p in Evaluator(data.domains, data.classes).parameters()]
    cached = keyed("evaluators", stamp, len(train), cfg, shapes) / "evaluator.safetensors"
    if cached.is_file():
        try:
            model = Evaluator.load(cached)
            log.info("using cached evaluator %s", cached)
            return model
        except UserError as e:
            log.warning("retraining the evaluator: the cached one is unusable (%s)", e)
    model = train_evaluator(data, train, cfg, progress=progress)
    model.save(cached, {"train_images": len(train), "steps": cfg.steps})
    return model
