"""Pictures for people: image grids (PNG), small Markdown tables and the Markdown reports, rendered
from the Jinja2 templates in `eval/templates/` (the prose lives there, the numbers come from the caller)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageOps


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image in [0, 1] (3, H, W) as an 8-bit PIL image."""
    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def save_grid(rows: list[torch.Tensor], path: Path, labels: list[str] | None = None, scale: int = 3) -> Path:
    """One row per tensor of images in [0, 1] (N, 3, H, W), upscaled `scale`x (nearest), with an
    optional label to the left of each row. The tiles are laid out by diffusers' `make_image_grid`
    (short rows padded with white); the label column is ours, which diffusers has none of."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rows[0].shape[-2:]
    cols = max(len(r) for r in rows)
    blank = Image.new("RGB", (w * scale, h * scale), "white")
    tiles = []
    for images in rows:
        row = [to_pil(img).resize(blank.size, Image.Resampling.NEAREST) for img in images]
        tiles += [ImageOps.expand(tile, border=1, fill="white") for tile in row + [blank] * (cols - len(row))]
    body = make_image_grid(tiles, rows=len(rows), cols=cols)
    label_w = 8 * max((len(s) for s in labels), default=0) + 8 if labels else 0
    grid = Image.new("RGB", (label_w + body.width, body.height), "white")
    grid.paste(body, (label_w, 0))
    draw = ImageDraw.Draw(grid)
    row_h = body.height // len(rows)
    for r, label in enumerate(labels or []):
        draw.text((4, r * row_h + row_h // 2 - 5), label, fill="black")
    grid.save(path)
    return path


def save_images(images: torch.Tensor, folder: Path, prefix: str = "") -> list[Path]:
    """Each image as its own PNG (so anyone can re-score them with another evaluator)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{prefix}{i:04d}.png"
        to_pil(img).save(p)
        paths.append(p)
    return paths


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("fedaigc.eval"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_TEMPLATES.filters["fmt"] = format  # {{ x | fmt(".1%") }}: Python's format spec, as in an f-string


def render_report(name: str, data: dict, path: Path) -> Path:
    """Write `templates/<name>.md.j2` rendered with `data` to `path`; a key the template uses and
    `data` lacks raises (StrictUndefined) instead of leaving a blank in the report."""
    path.write_text(_TEMPLATES.get_template(f"{name}.md.j2").render(data))
    return path
