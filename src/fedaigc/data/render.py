"""Procedural PACS-like images: object classes differ by silhouette, style domains by rendering.

Every image is drawn at 4x its size and downsampled, from a numpy Generator seeded by
(seed, domain, class, index), so the same seed always writes the same bytes.

What a style LoRA can learn, per domain:
- photo:        shaded colour object on a textured two-tone scene (sky/ground), no outline.
- art_painting: brush-stroke texture everywhere, warm saturated palette, dark soft edge.
- cartoon:      flat saturated fill, thick black outline, plain light background.
- sketch:       grey pencil outline and hatching on white paper, no colour.

A second, held-out set (`STYLE_SETS["heldout"]`) has four other styles and six other object
classes. It exists to measure what was not tuned: no constant of fedaigc is chosen on it.
- watercolor:   pastel washes that bleed past the silhouette, pigment pooled at the edge, paper.
- mosaic:       Voronoi tiles with dark grout, bright tiles inside the object, muted outside.
- neon:         a glowing saturated outline on a dark night background.
- pixel:        a 16 x 16 block image, few quantized colours, dithered background, block outline.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial import cKDTree

DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
CLASSES = ("star", "house", "tree", "fish", "moon", "heart")

HELDOUT_DOMAINS = ("watercolor", "mosaic", "neon", "pixel")
HELDOUT_CLASSES = ("arrow", "bolt", "bell", "flower", "butterfly", "key")
# `fedaigc data --styles NAME` (`data.styles`): which domains and classes are rendered
STYLE_SETS = {"default": (DOMAINS, CLASSES), "heldout": (HELDOUT_DOMAINS, HELDOUT_CLASSES)}

# The word a user would write for each domain ("a sketch of a fish"); clients replace it
# with their private token, the pretraining prompts never contain it.
STYLE_WORDS = {
    "photo": "photo",
    "art_painting": "painting",
    "cartoon": "cartoon",
    "sketch": "sketch",
    "watercolor": "watercolor",
    "mosaic": "mosaic",
    "neon": "neon",
    "pixel": "pixel art",
}

SUPERSAMPLE = 4


def _star(n: int = 5) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else 0.42
        a = -math.pi / 2 + i * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _house() -> list[tuple[float, float]]:
    return [(-0.75, 1.0), (-0.75, -0.1), (0.0, -0.95), (0.75, -0.1), (0.75, 1.0)]


def _tree() -> list[tuple[float, float]]:
    return [(-0.14, 1.0), (-0.14, 0.55), (-0.8, 0.55), (0.0, -1.0), (0.8, 0.55), (0.14, 0.55), (0.14, 1.0)]


def _fish() -> list[tuple[float, float]]:
    body = [(-0.2 + 0.65 * math.cos(a), 0.45 * math.sin(a)) for a in np.linspace(0.5, 2 * math.pi - 0.5, 40)]
    tail = [(0.55, -0.08), (1.0, -0.6), (0.85, 0.0), (1.0, 0.6), (0.55, 0.08)]
    return body + tail


def _moon() -> list[tuple[float, float]]:
    outer = [(math.cos(a), math.sin(a)) for a in np.linspace(math.pi * 0.35, math.pi * 1.65, 30)]
    inner = [(0.45 + 0.75 * math.cos(a), 0.8 * math.sin(a)) for a in np.linspace(math.pi * 1.5, math.pi * 0.5, 30)]
    return outer + inner


def _heart() -> list[tuple[float, float]]:
    pts = []
    for t in np.linspace(0, 2 * math.pi, 60)[:-1]:
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.1))
    return pts


def _arrow() -> list[tuple[float, float]]:
    return [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.62), (1.0, 0.0), (0.15, 0.62), (0.15, 0.22), (-1.0, 0.22)]


def _bolt() -> list[tuple[float, float]]:
    return [(0.2, -1.0), (-0.55, 0.15), (-0.05, 0.15), (-0.3, 1.0), (0.55, -0.25), (0.07, -0.25), (0.42, -1.0)]


def _bell() -> list[tuple[float, float]]:
    right = [(0.22 + 0.5 * ((y + 0.75) / 1.45) ** 2.2, y) for y in np.linspace(-0.75, 0.7, 24)] + [(0.85, 0.82)]
    clapper = [(0.12, 0.82), (0.0, 1.0), (-0.12, 0.82)]
    knob = [(0.12 * math.cos(a), -0.85 + 0.12 * math.sin(a)) for a in np.linspace(math.pi, 2 * math.pi, 12)]
    return right + clapper + [(-x, y) for x, y in reversed(right)] + knob


def _flower() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
    r = 0.45 + 0.55 * np.abs(np.cos(2.5 * t))
    return list(zip(r * np.cos(t), r * np.sin(t), strict=True))


def _butterfly() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, 160, endpoint=False)
    r = 0.12 + np.abs(np.sin(2 * t)) * np.where(np.sin(t) < 0, 0.95, 0.65)
    return list(zip(r * np.cos(t), r * np.sin(t) + 0.1, strict=True))


def _key() -> list[tuple[float, float]]:
    head = [(-0.55 + 0.42 * math.cos(a), 0.42 * math.sin(a)) for a in np.linspace(0.25, 2 * math.pi - 0.25, 32)]
    teeth = [(1.0, -0.1), (1.0, 0.38), (0.86, 0.38), (0.86, 0.1), (0.72, 0.1), (0.72, 0.3), (0.58, 0.3), (0.58, 0.1)]
    return head + teeth


SHAPES = {"star": _star, "house": _house, "tree": _tree, "fish": _fish, "moon": _moon, "heart": _heart}
SHAPES |= {"arrow": _arrow, "bolt": _bolt, "bell": _bell, "flower": _flower, "butterfly": _butterfly, "key": _key}


def _place(points, rng: np.random.Generator, canvas: int) -> list[tuple[float, float]]:
    """Random scale, small rotation and offset, in pixel coordinates of the canvas."""
    scale = canvas * rng.uniform(0.30, 0.38)
    angle = rng.uniform(-0.25, 0.25)
    cx = canvas / 2 + rng.uniform(-0.08, 0.08) * canvas
    cy = canvas / 2 + rng.uniform(-0.08, 0.08) * canvas
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in points]


def _mask(poly, canvas: int) -> np.ndarray:
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).polygon(poly, fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def _outline(poly, canvas: int, width: int) -> np.ndarray:
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).line(poly + [poly[0]], fill=255, width=width, joint="curve")
    return np.asarray(img, dtype=np.float32) / 255.0


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _strokes(rng, canvas: int, n: int, palette: list[np.ndarray], length: float, width: int) -> np.ndarray:
    """An RGB layer of short brush strokes in random directions."""
    img = Image.new("RGB", (canvas, canvas))
    draw = ImageDraw.Draw(img)
    base = palette[0]
    draw.rectangle([0, 0, canvas, canvas], fill=tuple(int(255 * c) for c in base))
    for _ in range(n):
        x, y = rng.uniform(0, canvas, size=2)
        a = rng.uniform(0, math.pi)
        dx, dy = length * math.cos(a), length * math.sin(a)
        c = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.15)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=tuple(int(255 * min(1, v)) for v in c), width=width)
    return np.asarray(img, dtype=np.float32) / 255.0


def _photo(rng, poly, canvas):
    m = _mask(poly, canvas)[..., None]
    y = np.linspace(0, 1, canvas, dtype=np.float32)[:, None, None]
    sky = _hsv(rng.uniform(0.52, 0.62), rng.uniform(0.25, 0.5), rng.uniform(0.55, 0.8))
    ground = _hsv(rng.uniform(0.08, 0.3), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.5))
    horizon = rng.uniform(0.55, 0.75)
    w = 1 / (1 + np.exp(-(y - horizon) * 30))
    bg = sky * (1 - w) + ground * w
    bg = bg * (1 + (y - 0.5) * 0.3)
    bg = np.broadcast_to(bg, (canvas, canvas, 3)) + rng.normal(0, 0.035, (canvas, canvas, 3))
    base = _hsv(rng.uniform(0, 1), rng.uniform(0.35, 0.65), rng.uniform(0.45, 0.75))
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
    shade = 1.25 - 0.6 * (0.5 * xx + 0.5 * yy)
    obj = base * shade[..., None] + rng.normal(0, 0.02, (canvas, canvas, 3))
    # soft shadow under the object
    shadow = np.asarray(Image.fromarray((m[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(canvas / 24)))
    shadow = np.roll(shadow, (canvas // 24, canvas // 24), axis=(0, 1)).astype(np.float32)[..., None] / 255.0
    bg = bg * (1 - 0.35 * shadow)
    return bg * (1 - m) + obj * m


def _art_painting(rng, poly, canvas):
    m = _mask(poly, canvas)[..., None]
    h0 = rng.uniform(0.0, 0.15) if rng.random() < 0.7 else rng.uniform(0.55, 0.7)
    bg_pal = [_hsv(h0 + rng.uniform(-0.05, 0.05), rng.uniform(0.45, 0.75), rng.uniform(0.45, 0.8)) for _ in range(4)]
    bg = _strokes(rng, canvas, 260, bg_pal, canvas / 10, max(2, canvas // 16))
    h1 = h0 + rng.uniform(0.35, 0.65)
    ob_pal = [_hsv(h1 + rng.uniform(-0.04, 0.04), rng.uniform(0.7, 0.95), rng.uniform(0.6, 0.95)) for _ in range(3)]
    obj = _strokes(rng, canvas, 220, ob_pal, canvas / 14, max(2, canvas // 20))
    edge = _outline(poly, canvas, max(2, canvas // 20))[..., None]
    dark = bg_pal[0] * 0.3
    out = bg * (1 - m) + obj * m
    out = out * (1 - 0.8 * edge) + dark * 0.8 * edge
    img = Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(canvas / 96))
    return np.asarray(img, dtype=np.float32) / 255.0


def _cartoon(rng, poly, canvas):
    m = _mask(poly, canvas)[..., None]
    bg = _hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.18), rng.uniform(0.95, 1.0))
    fill = _hsv(rng.uniform(0, 1), rng.uniform(0.85, 1.0), rng.uniform(0.9, 1.0))
    edge = _outline(poly, canvas, max(3, canvas // 9))[..., None]
    out = np.broadcast_to(bg, (canvas, canvas, 3)) * (1 - m) + fill * m
    return out * (1 - edge)


def _sketch(rng, poly, canvas):
    m = _mask(poly, canvas)
    paper = rng.uniform(0.94, 1.0)
    out = np.full((canvas, canvas), paper, dtype=np.float32) - np.abs(rng.normal(0, 0.015, (canvas, canvas)))
    hatch = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(hatch)
    step = max(3, canvas // int(rng.integers(8, 12)))
    angle = rng.choice([1, -1])
    for k in range(-canvas, 2 * canvas, step):
        draw.line([(k, 0), (k + angle * canvas, canvas)], fill=255, width=max(1, canvas // 64))
    hatch_a = np.asarray(hatch, dtype=np.float32) / 255.0 * m
    lead = rng.uniform(0.2, 0.4)
    edge = _outline(poly, canvas, max(2, canvas // 28))
    jitter = _outline(
        [(x + rng.normal(0, canvas / 90), y + rng.normal(0, canvas / 90)) for x, y in poly], canvas, max(1, canvas // 48)
    )
    out = out * (1 - 0.55 * hatch_a)
    out = out * (1 - np.maximum(edge, 0.7 * jitter)) + lead * np.maximum(edge, 0.7 * jitter)
    return np.repeat(out[..., None], 3, axis=2)


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a (H, W) array in [0, 1]."""
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(img, dtype=np.float32) / 255.0


def _smooth_noise(rng, canvas: int, cells: int) -> np.ndarray:
    """A low-frequency field in [0, 1]: `cells` x `cells` uniform noise, upsampled bicubically."""
    small = Image.fromarray((rng.uniform(0, 1, (cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((canvas, canvas), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _watercolor(rng, poly, canvas):
    paper = rng.uniform(0.93, 0.99) - 0.05 * _smooth_noise(rng, canvas, 24)
    m = _blur(_mask(poly, canvas), canvas / 40)  # the wash bleeds past the silhouette
    edge = np.clip(4 * m * (1 - m), 0, 1)  # pigment pools where the wash dries
    hue = rng.uniform(0, 1)
    pigment = _hsv(hue, rng.uniform(0.35, 0.6), rng.uniform(0.8, 0.95))
    opacity = (0.45 + 0.45 * _smooth_noise(rng, canvas, 5)) * m + 0.35 * edge
    wash = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3), 1.0)
    sky = 0.35 * _smooth_noise(rng, canvas, 3) * (1 - m)  # a faint second wash behind
    out = paper[..., None] * (1 - sky[..., None] * (1 - wash))
    return out * (1 - np.clip(opacity, 0, 1)[..., None] * (1 - pigment * (1 - 0.35 * edge[..., None])))


def _mosaic(rng, poly, canvas):
    m = _mask(poly, canvas)
    cells = int(rng.integers(6, 9))
    grid = (np.stack(np.mgrid[0:cells, 0:cells], -1).reshape(-1, 2) + rng.uniform(0.15, 0.85, (cells**2, 2))) * canvas / cells
    pixels = np.stack(np.mgrid[0:canvas, 0:canvas], -1).reshape(-1, 2)
    dist, nearest = cKDTree(grid).query(pixels, k=2)
    tile = nearest[:, 0].reshape(canvas, canvas)
    grout = (dist[:, 1] - dist[:, 0] < canvas / 48).reshape(canvas, canvas).astype(np.float32)
    h0, h1 = rng.uniform(0, 1), rng.uniform(0, 1)
    bg = np.stack([_hsv(h0 + rng.uniform(-0.06, 0.06), rng.uniform(0.2, 0.4), rng.uniform(0.45, 0.7)) for _ in grid])
    ob = np.stack([_hsv(h1 + rng.uniform(-0.05, 0.05), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)) for _ in grid])
    out = np.where(m[..., None] > 0.5, ob[tile], bg[tile])
    grout = np.maximum(grout, _outline(poly, canvas, max(2, canvas // 40)))
    return out * (1 - grout[..., None]) + 0.18 * grout[..., None]


def _neon(rng, poly, canvas):
    y = np.linspace(0, 1, canvas, dtype=np.float32)[:, None, None]
    night = _hsv(rng.uniform(0.6, 0.8), rng.uniform(0.5, 0.8), rng.uniform(0.08, 0.16)) * (1.2 - 0.4 * y)
    tube = _hsv(rng.uniform(0, 1), rng.uniform(0.75, 1.0), 1.0)
    line = _outline(poly, canvas, max(2, canvas // 36))
    glow = np.clip(1.6 * _blur(line, canvas / 14), 0, 1)
    m = _mask(poly, canvas)
    out = np.broadcast_to(night, (canvas, canvas, 3)) + 0.1 * m[..., None] * tube + glow[..., None] * tube
    return out * (1 - line[..., None]) + line[..., None] * (0.45 * tube + 0.55)


def _quantize(colour: np.ndarray) -> np.ndarray:
    """4 levels per channel: pixel art's small palette."""
    return np.round(np.clip(colour, 0, 1) * 3) / 3


def _pixel(rng, poly, canvas):
    blocks = 16
    m = Image.fromarray((_mask(poly, canvas) * 255).astype(np.uint8)).resize((blocks, blocks), Image.Resampling.BOX)
    m = np.asarray(m) > 127
    grown = m | np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1)
    outline = grown & ~m
    bg = _quantize(_hsv(rng.uniform(0, 1), rng.uniform(0.4, 0.7), rng.uniform(0.5, 0.8)))
    fill = _quantize(_hsv(rng.uniform(0, 1), 1.0, 1.0))
    checker = (np.add.outer(np.arange(blocks), np.arange(blocks)) % 2).astype(bool)
    out = np.where(checker[..., None], bg, _quantize(bg * 0.7))
    out = np.where(m[..., None], fill, out)
    out = np.where(outline[..., None], 0.0, out)
    return np.repeat(np.repeat(out, canvas // blocks, 0), canvas // blocks, 1).astype(np.float32)


RENDERERS = {"photo": _photo, "art_painting": _art_painting, "cartoon": _cartoon, "sketch": _sketch}
RENDERERS |= {"watercolor": _watercolor, "mosaic": _mosaic, "neon": _neon, "pixel": _pixel}


def render(domain: str, cls: str, seed: int, size: int = 32) -> Image.Image:
    """One image of object `cls` in style `domain`; deterministic in (domain, cls, seed, size)."""
    if domain not in RENDERERS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(RENDERERS)}")
    if cls not in SHAPES:
        raise ValueError(f"unknown class {cls!r}; known: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    canvas = size * SUPERSAMPLE
    poly = _place(SHAPES[cls](), rng, canvas)
    if rng.random() < 0.5:
        poly = [(canvas - x, y) for x, y in poly]
    arr = RENDERERS[domain](rng, poly, canvas)
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), "RGB")
    return img.resize((size, size), Image.Resampling.LANCZOS)
