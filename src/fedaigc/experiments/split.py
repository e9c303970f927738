"""`fedaigc experiment split`: how much of each image the inference edge server may compute.

One cluster-aware run per seed is trained once; then every client generates its samples at each
server share s: s = 0 all on the device, s > 0 through a real inference edge server (FastAPI +
uvicorn on 127.0.0.1 inside this process, holding the run's cluster adapters) that runs the first
⌈s·T⌉ steps with the adapters of each mode (`inference.MIX_MODES`: auto, global, base, uniform),
the device the rest. Quality and the device's compute per image, per (s, mode); s = 0 once.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from pathlib import Path

import torch

from fedaigc.data.dataset import read_images
from fedaigc.errors import UserError
from fedaigc.eval.plots import curves
from fedaigc.eval.report import markdown_table, render_report
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    brief,
    numbers,
    report_data,
    sample_grid,
    write_results,
)
from fedaigc.inference import MIX_MODES
from fedaigc.inference.device import InferenceServer
from fedaigc.inference.service import run_service

log = logging.getLogger("fedaigc.experiments")

SPLITS = (0.0, 0.1, 0.2, 0.3, 0.4)
MAX_SPLIT = 0.5  # the service's default limit
OURS = Setting("cluster", "cluster-aware (ours)", {"federation": {"strategy": "cluster"}})


def split_values(only: list[str] | None) -> list[float]:
    """`--only` for this experiment: the shares s to measure (default 0, 0.1, 0.2, 0.3, 0.4)."""
    if not only:
        return list(SPLITS)
    try:
        values = sorted({float(x) for x in only})
    except ValueError:
        raise UserError(f"--only: expected split ratios such as 0,0.3, got {','.join(only)!r}") from None
    if not all(0 <= s <= MAX_SPLIT for s in values):
        raise UserError(f"--only: split ratios must lie in [0, {MAX_SPLIT}], got {','.join(only)}")
    return values


def mix_modes(modes: list[str] | None) -> list[str]:
    """`--modes` for this experiment: the modes of the server's steps (default all four), in `MIX_MODES` order."""
    if not modes:
        return list(MIX_MODES)
    unknown = [m for m in modes if m not in MIX_MODES]
    if unknown:
        raise UserError(f"--modes: unknown mode {unknown[0]!r}; choose from {', '.join(MIX_MODES)}")
    return [m for m in MIX_MODES if m in modes]


def run_split(plan: Plan, only: list[str] | None = None, modes: list[str] | None = None) -> tuple[Path, str]:
    """Train once per seed, score every (s, mode), s = 0 once; writes results.csv, plots and report.md."""
    splits, chosen = split_values(only), mix_modes(modes)
    points = [(s, mode) for s in splits for mode in (["-"] if s == 0 else chosen)]
    results = [Result(Setting(name_of(s, mode), f"s = {s:g}", columns={"mode": mode})) for s, mode in points]
    for i, seed in enumerate(plan.seeds, 1):
        run_cfg = OURS.config(plan.cfg, seed)
        run_dir = plan.out / f"cluster_seed{seed}"
        log.info("[split %d/%d] training %s, seed %d: %s", i, len(plan.seeds), OURS.label, seed, run_dir)
        run = plan.train(run_cfg, run_dir)
        rows = []
        with ExitStack() as stack:
            service = stack.enter_context(run_service(run.root / "adapters", plan.model, "split")) if max(splits) > 0 else None
            for (s, mode), result in zip(points, results, strict=True):
                log.info(
                    "[split %d/%d] seed %d, s = %g, mix = %s: the server's first ceil(s*T) steps",
                    i,
                    len(plan.seeds),
                    seed,
                    s,
                    mode,
                )
                key = key_of(s, mode)
                if s == 0:
                    metrics = plan.scored(run_cfg, run)
                else:
                    metrics = plan.scored(run_cfg, run, key=key, server=InferenceServer(*service), split_ratio=s, mix=mode)
                rows.append(numbers(metrics, key))
                result.add(run_dir, rows[-1], metrics)
                log.info(
                    "[split] s = %g, mix = %s: %s, device %.3f s per image",
                    s,
                    mode,
                    brief(rows[-1]),
                    rows[-1]["device_s_per_image"],
                )
        if splits[0] == 0:  # against doing every step on the device, within one seed
            for (s, mode), row in zip(points, rows, strict=True):
                row["device_time_ratio"] = row["device_s_per_image"] / rows[0]["device_s_per_image"]
                row["pixel_change"] = pixel_change(run_dir, key_of(s, mode), run_cfg.data.size)
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    summary = "; ".join(
        f"{r.setting.label} {r.setting.columns['mode']}: style {r.mean('style_acc'):.1%}, "
        f"device {r.mean('device_s_per_image'):.3f} s/image"
        for r in results
    )
    return write_report(plan, results, points, seconds), summary


PLOTS = {  # plot -> (results.csv column, title, y label); one line per mode
    "style_vs_split": ("style_acc", "Confident style accuracy vs the server's share of the steps", "share"),
    "class_vs_split": ("class_acc", "Confident class accuracy vs the server's share of the steps", "share"),
    "alignment_vs_split": ("alignment", "Alignment vs the server's share of the steps", "cosine"),
    "fid_vs_split": ("fid", "Evaluator-FID vs the server's share of the steps", "evaluator-FID (lower is better)"),
    "device_time_vs_split": (
        "device_s_per_image",
        "Device compute per image vs the server's share",
        "seconds per image on the device",
    ),
}


def write_report(plan: Plan, results: list[Result], points: list[tuple[float, str]], seconds: float) -> Path:
    cfg, plots = plan.cfg, plan.out / "plots"
    x = "s (share of the T steps on the inference edge server)"
    modes = list(dict.fromkeys(mode for s, mode in points if s > 0))
    for name, (col, title, ylabel) in PLOTS.items():
        lines_of = {}
        for mode in modes or ["-"]:  # every mode's line starts at s = 0, where the device runs every step
            shown = [(s, r.mean(col)) for (s, m), r in zip(points, results, strict=True) if s == 0 or m == mode]
            lines_of[f"mix = {mode}"] = ([s for s, _ in shown], [v for _, v in shown])
        curves(lines_of, title, x, ylabel, plots / f"{name}.png", integer_x=False)
    base = results[0] if points[0][0] == 0 else None
    rows = []
    for r in results:
        change = r.mean("style_acc") - base.mean("style_acc") if base else math.nan
        rows.append(
            [
                r.setting.label,
                r.setting.columns["mode"],
                f"{r.mean('server_steps'):.0f} / {cfg.sample.steps}",
                r.cell("device_s_per_image"),
                r.cell("device_time_ratio", 2),
                r.cell("kib_sent_per_image", 1),
                r.cell("kib_received_per_image", 1),
                r.cell("style_acc"),
                "-" if math.isnan(change) else f"{change:+.3f}",
                r.cell("pixel_change", 4),
                r.cell("style_top"),
                r.cell("class_acc"),
                r.cell("fid", 1),
                r.cell("kid"),
                r.cell("alignment"),
                r.cell("alignment_centred"),
            ]
        )
    shown_rows = []
    for (s, mode), r in zip(points, results, strict=True):
        key = key_of(s, mode)
        shown_rows.append((f"{r.setting.label} {mode}", samples_of(r.runs[0], key), r.metrics[0][key]["per_client"]))
    table = markdown_table(
        [
            "s",
            "mode",
            "server steps",
            "device s / image",
            "device time vs s = 0",
            "KiB sent / image",
            "KiB received / image",
            "style acc",
            "style acc change vs s = 0",
            "pixel change vs s = 0",
            "style top",
            "class acc",
            "evaluator-FID",
            "KID",
            "alignment",
            "centred alignment",
        ],
        rows,
    )
    runs = [
        f"- seed {seed}: `cluster_seed{seed}/` (s = 0: `final` in its metrics.json and `samples/`; s > 0: `split_<s>` "
        f"(auto) or `split_<s>_<mode>` and the same folder under `samples/`)"
        for seed in plan.seeds
    ]
    data = report_data(plan, seconds, sample_grid(plan, shown_rows), runs) | {
        "modes": {k: v for k, v in MIX_MODES.items() if k in modes},
        "table": table,
        "plots": list(PLOTS),
    }
    return render_report("split", data, plan.out / "report.md")


def pixel_change(run_dir: Path, key: str, size: int) -> float:
    """Mean absolute pixel difference (0-1) of every client's images under score `key` from its
    all-local images (same noise seeds): whether the server's part changed the pictures at all."""
    diffs = []
    for local in sorted((run_dir / "samples").glob("client_*")):
        split_dir = samples_of(run_dir, key) / local.name
        a, b = (read_images(sorted(d.glob("*.png")), size) for d in (local, split_dir))
        diffs.append((a - b).abs().mean())
    return float(torch.stack(diffs).mean())


def samples_of(run_dir: Path, key: str) -> Path:
    return run_dir / "samples" if key == "final" else run_dir / "samples" / key


def key_of(s: float, mode: str) -> str:
    """Where `evaluate_run` keeps the score at share s in `mode`: `final` (all on the device),
    `split_<s>` (auto, the key before there were modes: older scores are reused) or `split_<s>_<mode>`."""
    return "final" if s == 0 else f"split_{s:g}" if mode == "auto" else f"split_{s:g}_{mode}"


def name_of(s: float, mode: str) -> str:
    """The setting's name in results.csv: `s=0`, `s=<s>/<mode>`."""
    return "s=0" if s == 0 else f"s={s:g}/{mode}"
