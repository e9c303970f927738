import hashlib
import json

import numpy as np
import pytest

from fedaigc.data.dataset import ImageFolder, partition, split, write_dataset
from fedaigc.data.render import CLASSES, DOMAINS, render
from fedaigc.errors import UserError


def _digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_dataset(tmp_path / "a", per_class=2, seed=3)
    b = write_dataset(tmp_path / "b", per_class=2, seed=3)
    c = write_dataset(tmp_path / "c", per_class=2, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_and_manifest(tiny_data, tiny_cfg):
    for d in DOMAINS:
        for c in CLASSES:
            assert len(list((tiny_data / d / c).glob("*.png"))) == tiny_cfg.data.per_class
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert manifest["domains"] == list(DOMAINS) and manifest["classes"] == list(CLASSES)
    assert manifest["count"] == len(DOMAINS) * len(CLASSES) * tiny_cfg.data.per_class


def test_styles_differ_in_what_a_lora_can_learn():
    """Sketch is grey on white, cartoon has a light plain background, photo and painting are darker
    and coloured: measurable differences, not just labels."""
    imgs = {d: np.stack([np.asarray(render(d, c, s)) / 255 for c in CLASSES for s in range(4)]) for d in DOMAINS}
    saturation = {d: (x.max(-1) - x.min(-1)).mean() for d, x in imgs.items()}
    corner = {d: x[:, :3, :3].mean() for d, x in imgs.items()}
    assert saturation["sketch"] < 0.03 < saturation["photo"]
    assert corner["sketch"] > 0.85 and corner["cartoon"] > 0.85
    assert corner["photo"] < 0.8 and corner["art_painting"] < 0.8


def test_loader_reads_any_pacs_layout_with_jpg(tmp_path):
    from PIL import Image

    for d in ("photo", "sketch"):
        for c in ("dog", "horse"):
            (tmp_path / d / c).mkdir(parents=True)
            Image.new("RGB", (227, 227), "white").save(tmp_path / d / c / "pic_001.jpg")
    folder = ImageFolder(tmp_path, size=32)
    assert folder.domains == ["photo", "sketch"] and folder.classes == ["dog", "horse"]
    x = folder.stack(folder.samples)
    assert x.shape == (4, 3, 32, 32) and float(x.min()) > 0.9


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="wrong layout"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "bad" / "photo" / "dog").mkdir(parents=True)
    (tmp_path / "bad" / "photo" / "dog" / "broken.png").write_bytes(b"not a png")
    folder = ImageFolder(tmp_path / "bad")
    with pytest.raises(UserError, match="corrupt image .*broken.png"):
        folder.stack(folder.samples)


def test_split_is_stratified_disjoint_and_deterministic(tiny_data):
    samples = ImageFolder(tiny_data).samples
    train, test = split(samples, 0.5, seed=1)
    assert not {s.path for s in train} & {s.path for s in test}
    assert len(train) + len(test) == len(samples)
    for d in DOMAINS:
        for c in CLASSES:
            assert sum(s.domain == d and s.cls == c for s in test) == 3
    assert split(samples, 0.5, seed=1) == (train, test)


def test_partition_dominant_domain_purity_and_class_skew(tmp_path):
    samples = ImageFolder(write_dataset(tmp_path / "d", per_class=10)).samples
    shares = partition(samples, num_clients=8, per_client=200, purity=0.8, alpha=0.3, seed=0)
    assert [s.domain for s in shares] == list(sorted(DOMAINS)) * 2
    for share in shares:
        own = np.mean([x.domain == share.domain for x in share.samples])
        assert 0.7 < own < 0.9
        counts = np.bincount([CLASSES.index(x.cls) for x in share.samples], minlength=len(CLASSES))
        assert counts.max() / counts.sum() > 0.3  # Dirichlet(0.3): skewed, not uniform (1/6)
    pure = partition(samples, num_clients=4, per_client=50, purity=1.0, seed=0)
    assert all(x.domain == s.domain for s in pure for x in s.samples)
    with pytest.raises(UserError):
        partition(samples, 4, 10, purity=0)


def test_default_styles_render_the_pixels_they_always_did():
    """The held-out styles are additions: the default set's pixels are pinned (rendered before they existed)."""
    h = hashlib.sha256()
    for d in DOMAINS:
        for c in CLASSES:
            for s in range(3):
                h.update(np.asarray(render(d, c, s)).tobytes())
    assert h.hexdigest() == "50e2b3e96c2de6e97955d0b2efac48fa319d950cf2f3476caa1071869659ab45"


def test_heldout_styles_write_the_layout_and_differ_from_the_default(tmp_path, capsys):
    from fedaigc.cli import main
    from fedaigc.config import preset
    from fedaigc.data.dataset import ensure_dataset
    from fedaigc.data.render import HELDOUT_CLASSES, HELDOUT_DOMAINS

    out = tmp_path / "heldout"
    assert main(["data", "--preset", "tiny", "--styles", "heldout", "--per-class", "2", "--out", str(out)]) == 0
    folder = ImageFolder(out)
    assert sorted(folder.domains) == sorted(HELDOUT_DOMAINS) and sorted(folder.classes) == sorted(HELDOUT_CLASSES)
    assert len(folder) == len(HELDOUT_DOMAINS) * len(HELDOUT_CLASSES) * 2
    assert not set(HELDOUT_DOMAINS) & set(DOMAINS) and not set(HELDOUT_CLASSES) & set(CLASSES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["domains"] == list(HELDOUT_DOMAINS) and manifest["style_words"]["pixel"] == "pixel art"
    again = write_dataset(tmp_path / "again", 2, seed=0, domains=HELDOUT_DOMAINS, classes=HELDOUT_CLASSES)
    assert _digest(again) == _digest(out)
    # the generated set's cache folder is keyed by the style set too
    cfg = preset("tiny")
    default = ensure_dataset(None, cfg)
    cfg.data.styles = "heldout"
    assert ensure_dataset(None, cfg) != default
    assert sorted(ImageFolder(ensure_dataset(None, cfg)).domains) == sorted(HELDOUT_DOMAINS)
    assert sorted(ImageFolder(default).domains) == sorted(DOMAINS)
    assert main(["data", "--preset", "tiny", "--styles", "impressionist", "--out", str(tmp_path / "x")]) == 2
    assert "config key data.styles must be one of default, heldout, got 'impressionist'" in capsys.readouterr().err
