"""Writing, reading, splitting and partitioning image sets in the PACS folder layout.

`ROOT/<domain>/<class>/*.png|jpg` (+ an optional `manifest.json`). The reader accepts any folder in
that layout, so the real PACS works unchanged; the writer produces the procedural set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from fedaigc.data.render import CLASSES, DOMAINS, STYLE_SETS, STYLE_WORDS, render
from fedaigc.errors import UserError
from fedaigc.protocol.seeds import derived_seed

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def style_set(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (domains, classes) of the generated set that `data.styles` names."""
    if name not in STYLE_SETS:
        raise UserError(f"unknown data.styles {name!r}; choose one of: {', '.join(STYLE_SETS)}")
    return STYLE_SETS[name]


def write_dataset(out: Path, per_class: int, size: int = 32, seed: int = 0, domains=DOMAINS, classes=CLASSES) -> Path:
    """Render `per_class` images for every (domain, class) into `out` and write `manifest.json`."""
    out = Path(out)
    jobs = [(d, c, i) for d in domains for c in classes for i in range(per_class)]
    for d, c, i in tqdm(jobs, desc="rendering images", unit="img", leave=False):
        path = out / d / c / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render(d, c, derived_seed(seed, d, c, i), size).save(path, optimize=False)
    manifest = {
        "generator": "fedaigc.data.render",
        "seed": seed,
        "size": size,
        "per_class": per_class,
        "domains": list(domains),
        "classes": list(classes),
        "style_words": {d: STYLE_WORDS[d] for d in domains},
        "count": len(jobs),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file as a float tensor (3, size, size) in [0, 1]: resized on its short side and
    centre-cropped, as diffusers' training scripts do (never squashed); a clear error if it is corrupt."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"corrupt image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_images(paths: list[Path], size: int) -> torch.Tensor:
    return torch.stack([read_image(p, size) for p in paths]) if paths else torch.empty(0, 3, size, size)


@dataclass(frozen=True)
class Sample:
    path: Path
    domain: str
    cls: str


class ImageFolder:
    """All images of a PACS-layout folder, with their domain and class taken from the path."""

    def __init__(self, root: Path, size: int = 32):
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise UserError(f"data folder not found: {self.root}")
        self.domains = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.domains:
            raise UserError(f"wrong layout in {self.root}: expected ROOT/<domain>/<class>/*.png, found no domain folders")
        samples = []
        for d in self.domains:
            for c in sorted(p.name for p in (self.root / d).iterdir() if p.is_dir()):
                files = sorted(f for f in (self.root / d / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                samples += [Sample(f, d, c) for f in files]
        if not samples:
            raise UserError(f"wrong layout in {self.root}: no images under ROOT/<domain>/<class>/")
        self.samples = samples
        self.classes = sorted({s.cls for s in samples})
        self._cache: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, sample: Sample) -> torch.Tensor:
        """The image as a float tensor (3, size, size) in [0, 1]."""
        if sample.path not in self._cache:
            self._cache[sample.path] = read_image(sample.path, self.size)
        return self._cache[sample.path]

    def stack(self, samples: list[Sample]) -> torch.Tensor:
        return torch.stack([self.load(s) for s in samples]) if samples else torch.empty(0, 3, self.size, self.size)

    def check_domains(self, wanted) -> None:
        unknown = [d for d in wanted if d not in self.domains]
        if unknown:
            raise UserError(f"unknown domain {unknown[0]!r} in {self.root}; found: {', '.join(self.domains)}")


def split(samples: list[Sample], held_out: float = 0.2, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Train / held-out split, stratified by (domain, class), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.domain, s.cls), []).append(s)
    train, test = [], []
    for key in sorted(groups):
        g = groups[key]
        order = rng.permutation(len(g))
        n_test = int(round(held_out * len(g)))
        test += [g[i] for i in order[:n_test]]
        train += [g[i] for i in order[n_test:]]
    return train, test


@dataclass
class ClientShare:
    client_id: int
    domain: str  # the dominant domain: the client's true "taste"
    samples: list[Sample]


def partition(
    samples: list[Sample],
    num_clients: int,
    per_client: int,
    purity: float = 0.9,
    alpha: float = 1.0,
    seed: int = 0,
    domains: list[str] | None = None,
) -> list[ClientShare]:
    """Non-IID shares: client i's dominant domain is domains[i % D]; a `purity` share of its
    images comes from it, the rest from the other domains; classes follow Dirichlet(alpha).

    Images are drawn without replacement from each (domain, class) pool while it lasts; a pool
    that runs dry starts over (clients may then share an image, as real users may).
    """
    if not 0 < purity <= 1:
        raise UserError(f"purity must be in (0, 1], got {purity}")
    if alpha <= 0:
        raise UserError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    domains = domains or sorted({s.domain for s in samples})
    classes = sorted({s.cls for s in samples})
    pools: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        pools.setdefault((s.domain, s.cls), []).append(s)
    for key in pools:
        pools[key] = [pools[key][i] for i in rng.permutation(len(pools[key]))]
    cursor = dict.fromkeys(pools, 0)
    shares = []
    for cid in range(num_clients):
        dominant = domains[cid % len(domains)]
        class_p = rng.dirichlet([alpha] * len(classes))
        others = [d for d in domains if d != dominant] or [dominant]
        chosen = []
        for _ in range(per_client):
            d = dominant if rng.random() < purity else others[rng.integers(len(others))]
            c = classes[rng.choice(len(classes), p=class_p)]
            pool = pools.get((d, c))
            if not pool:
                continue
            chosen.append(pool[cursor[(d, c)] % len(pool)])
            cursor[(d, c)] += 1
        shares.append(ClientShare(cid, dominant, chosen))
    return shares


def ensure_dataset(data: Path | None, cfg) -> Path:
    """The folder to read: `data` if given (it must exist), else the generated set of the config's
    `data.styles`, rendered into the cache on first use."""
    if data is not None:
        if not Path(data).is_dir():
            raise UserError(f"data folder not found: {data}")
        return Path(data)
    from fedaigc.paths import keyed

    d = cfg.data
    domains, classes = style_set(d.styles)
    root = keyed("data", "v1", d.styles, d.per_class, d.size, d.seed)
    if not (root / "manifest.json").is_file():
        write_dataset(root, d.per_class, d.size, d.seed, domains, classes)
    return root
