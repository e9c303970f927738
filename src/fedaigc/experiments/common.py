"""What the three experiments share: settings applied to a config, one normal run directory per
(setting, seed) trained once (an experiment run again reuses finished runs and resumes the others),
flat per-run numbers, mean ± std over seeds, `results.csv` and a sample grid."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedaigc import config
from fedaigc.data.dataset import ImageFolder, ensure_dataset, read_images, split
from fedaigc.errors import UserError
from fedaigc.eval.evaluate import evaluate_run
from fedaigc.eval.report import markdown_table, save_grid
from fedaigc.eval.scoring import SCORES
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import make_strategy
from fedaigc.simulation.federate import simulate

log = logging.getLogger("fedaigc.experiments")

SHOWN = 3  # sample-grid images per domain and row
TABLE = {  # results.csv column -> quality-table header
    "style_acc": "style acc",
    "style_top": "style top",
    "class_acc": "class acc",
    "class_top": "class top",
    "fid": "evaluator-FID",
    "kid": "KID",
    "alignment": "alignment",
    "alignment_centred": "centred alignment",
    "ari": "clustering ARI",
}


@dataclass
class Plan:
    """What an experiment runs on: the base config, its directory, data and model, the seeds."""

    cfg: config.Config
    out: Path
    data: Path | None
    model: Path | None
    seeds: list[int]
    progress: bool = True
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def train(self, run_cfg: config.Config, run_dir: Path) -> RunDir:
        """Federate once into `run_dir`. A finished run of the same config is reused and an unfinished
        one resumed, so a stopped experiment continues; a run of another config, or of an older
        fedaigc (`config.from_saved`), is never mixed in."""
        saved = run_dir / "config.toml"
        if saved.is_file() and config.from_saved(saved) != run_cfg:
            raise UserError(f"{run_dir} holds a run of another config: remove it or choose another --out")
        run = RunDir(run_dir)
        done = run.last_round()
        if done >= run_cfg.federation.rounds:
            # restoring checks that the state means what this fedaigc makes of it (an older run's may not)
            run.restore(make_strategy(run_cfg), done)
            log.info("%s: trained already (%d rounds), reusing it", run_dir, done)
            return run
        return simulate(run_cfg, run_dir, self.data, self.model, resume=done > 0)[0]

    def scored(self, run_cfg: config.Config, run: RunDir, key: str = "final", **kw) -> dict:
        """`evaluate_run` under `key`, unless the run holds that score already (same config, same
        images: the samples are deterministic)."""
        metrics = run.metrics()
        if key in metrics:
            return metrics
        return evaluate_run(run_cfg, run, self.data, self.model, self.progress, key=key, **kw)


@dataclass(frozen=True)
class Setting:
    """One thing an experiment compares: the config changes that set it apart, and its names."""

    name: str  # run directory prefix, results.csv key, a name for `--only`
    label: str  # tables and plots
    overrides: dict = field(default_factory=dict)  # {config section: {field: value}}
    columns: dict[str, str] = field(default_factory=dict)  # text columns of results.csv after the label (split: mode)

    def config(self, cfg: config.Config, seed: int) -> config.Config:
        out = copy.deepcopy(cfg)
        for section, values in self.overrides.items():
            for key, value in values.items():
                setattr(getattr(out, section), key, value)
        out.federation.seed = seed
        return out


def select(settings: list[Setting], only: list[str] | None) -> list[Setting]:
    """The settings named by `--only` (all without it), in the experiment's order."""
    if not only:
        return settings
    names = [s.name for s in settings]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UserError(f"--only: unknown setting {unknown[0]!r}; choose from {', '.join(names)}")
    return [s for s in settings if s.name in only]


def numbers(metrics: dict, key: str = "final") -> dict[str, float]:
    """One run's score `key` as flat columns: the means over clients, style accuracy and
    evaluator-FID per domain, clustering, training cost per round and generation cost per image."""
    final = metrics[key]
    row = {k: final["mean"].get(k, math.nan) for k in SCORES}  # nan: a score the run's fedaigc did not have ("-")
    per_client = list(final["per_client"].values())
    for domain in sorted({p["domain"] for p in per_client}):
        mine = [p for p in per_client if p["domain"] == domain]
        for k in ("style_acc", "fid"):
            row[f"{k}_{domain}"] = sum(p[k] for p in mine) / len(mine)
    rounds = metrics["rounds"]
    row |= {
        "ari": metrics["clustering"]["ari"],
        "final_loss": rounds[-1]["train_loss"],
        "kib_up": float(np.mean([r["bytes_up"] for r in rounds])) / 1024,
        "kib_down": float(np.mean([r["bytes_down"] for r in rounds])) / 1024,
        "s_per_round": float(np.mean([r["seconds"] for r in rounds])),
    }
    inf = final["inference"]
    images = final["samples_per_client"] * len(per_client)
    row |= {
        "server_steps": float(inf["server_steps"]),
        "device_s_per_image": inf["device_seconds"] / images,
        "kib_sent_per_image": inf["bytes_sent"] / images / 1024,
        "kib_received_per_image": inf["bytes_received"] / images / 1024,
    }
    return row


@dataclass
class Result:
    """One setting over every seed: its run directories, flat numbers and metrics.json."""

    setting: Setting
    runs: list[Path] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def add(self, run_dir: Path, row: dict[str, float], metrics: dict) -> None:
        self.runs.append(run_dir)
        self.rows.append(row)
        self.metrics.append(metrics)

    def mean(self, col: str) -> float:
        values = [r.get(col, math.nan) for r in self.rows]
        return float(np.mean(values)) if values else math.nan

    def std(self, col: str) -> float:
        """Sample standard deviation over seeds (NaN with one seed)."""
        values = [r.get(col, math.nan) for r in self.rows]
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    def cell(self, col: str, digits: int = 3) -> str:
        """`mean ± std` for a table; `-` where the setting has no such number."""
        m, s = self.mean(col), self.std(col)
        if math.isnan(m):
            return "-"
        return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"

    def per_round(self, key: str) -> tuple[list[int], list[float]]:
        """(round, mean over seeds of rounds[key]) for curves."""
        rounds = [[r[key] for r in m["rounds"]] for m in self.metrics]
        return list(range(1, len(rounds[0]) + 1)), [float(v) for v in np.mean(rounds, axis=0)]


def federated(
    name: str, plan: Plan, chosen: list[Setting], extra: Callable[[config.Config, RunDir], dict[str, float]] | None = None
) -> list[Result]:
    """Train and score every setting for every seed, one run directory `<setting>_seed<seed>`
    each, logging a line before and after each run; `extra` adds columns from further scores."""
    results = [Result(s) for s in chosen]
    total, i = len(chosen) * len(plan.seeds), 0
    for seed in plan.seeds:
        for result in results:
            i += 1
            run_cfg = result.setting.config(plan.cfg, seed)
            run_dir = plan.out / f"{result.setting.name}_seed{seed}"
            log.info("[%s %d/%d] %s, seed %d: %s", name, i, total, result.setting.label, seed, run_dir)
            t0 = time.perf_counter()
            run = plan.train(run_cfg, run_dir)
            row = numbers(plan.scored(run_cfg, run))
            if extra is not None:
                row |= extra(run_cfg, run)
            result.add(run_dir, row, run.metrics())
            log.info("[%s %d/%d] %s: %s (%.0f s)", name, i, total, result.setting.label, brief(row), time.perf_counter() - t0)
    return results


def brief(row: dict[str, float]) -> str:
    return (
        f"style {row['style_acc']:.0%}, class {row['class_acc']:.0%}, evaluator-FID {row['fid']:.1f}, "
        f"alignment {row['alignment']:.3f}, clustering ARI {row['ari']:.2f}"
    )


def write_results(plan: Plan, results: list[Result], seconds: float) -> Path:
    """`results.csv`: one row per setting, every column as mean and `_std` over seeds (empty where a
    setting has no such number or one seed), `results.json` with every seed's numbers, and the
    experiment's `config.toml` (each run directory has its own, with the setting applied)."""
    out = plan.out
    config.save(plan.cfg, out / "config.toml")
    text = list(dict.fromkeys(c for r in results for c in r.setting.columns))
    columns: list[str] = []
    for result in results:
        for row in result.rows:
            columns += [c for c in row if c not in columns]
    path = out / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "label", *text, "seeds"] + [c + s for c in columns for s in ("", "_std")])
        for r in results:
            values = [v for c in columns for v in (r.mean(c), r.std(c))]
            writer.writerow(
                [r.setting.name, r.setting.label, *(r.setting.columns.get(c, "") for c in text), len(r.rows)]
                + ["" if math.isnan(v) else f"{v:.6g}" for v in values]
            )
    detail = {
        "seconds": round(seconds, 1),
        "settings": {
            r.setting.name: {"label": r.setting.label, "runs": [str(p) for p in r.runs], "per_seed": r.rows} for r in results
        },
    }
    (out / "results.json").write_text(json.dumps(detail, indent=2) + "\n")
    return path


def sample_grid(plan: Plan, rows: list[tuple[str, Path, dict]]) -> tuple[Path, list[str]]:
    """`samples_grid.png`: one row per (label, samples folder, per-client scores) with `SHOWN`
    images of the first client of each domain, after a row of real held-out images. Returns the
    grid and its domains."""
    cfg = plan.cfg
    folder = ImageFolder(ensure_dataset(plan.data, cfg), size=cfg.data.size)
    _, test = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    first: dict[str, str] = {}
    for cid, info in sorted(rows[0][2].items(), key=lambda kv: int(kv[0])):
        first.setdefault(info["domain"], cid)
    domains = [d for d in folder.domains if d in first]
    images = [torch.cat([folder.stack([s for s in test if s.domain == d][:SHOWN]) for d in domains])]
    labels = ["real"]
    for label, samples, _ in rows:
        pngs = [sorted((samples / f"client_{first[d]}").glob("*.png"))[:SHOWN] for d in domains]
        images.append(torch.cat([read_images(p, cfg.data.size) for p in pngs]))
        labels.append(label)
    return save_grid(images, plan.out / "samples_grid.png", labels=labels, scale=2), domains


def report_data(plan: Plan, seconds: float, grid: tuple[Path, list[str]] | None, runs: list[str]) -> dict:
    """What `_experiment.md.j2` (the frame of every experiment report) shows: the setup, the sample
    grid and its domains (`sample_grid`'s return; None: no grid) and the run directory lines."""
    return {
        "cfg": plan.cfg,
        "seeds": plan.seeds,
        "seconds": seconds,
        "grid": grid[0].name if grid else None,
        "domains": grid[1] if grid else [],
        "shown": SHOWN,
        "runs": runs,
    }


def quality_table(first: str, results: list[Result]) -> str:
    """The means (± std) of the quality columns and clustering ARI, one row per setting."""
    return markdown_table([first, *TABLE.values()], [[r.setting.label] + [r.cell(c) for c in TABLE] for r in results])


def run_lines(results: list[Result]) -> list[str]:
    return [f"- {r.setting.label}: " + ", ".join(f"`{p.name}/`" for p in r.runs) for r in results]
