"""`fedaigc experiment network`: clients with unequal networks and participation.

A simulated network (`[network]`, server/participation.py): the first half of the clients are
online every round on a fast link and device; the second half ("rare": one client of each domain
at the demo's 8 clients) are online with probability `RARE_ONLINE` on a slow link and device.
Each round half of the online clients train. Two cluster-aware federations per seed, with the
same clients and the same online draws, for twice the preset's rounds:

- plain: uniform sampling of the online clients, aggregation weights ∝ examples;
- network-aware: sampling ∝ 1 / the server's estimate of each client's participation rate (the
  rarely seen first), weights ∝ examples / that estimate.

Every client is scored halfway and after the last round. Per setting: per-client and worst-client
quality, how often each client trained, and the simulated time and bytes each needed to reach a
common target quality.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedaigc import config
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table, render_report
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    numbers,
    quality_table,
    report_data,
    run_lines,
    sample_grid,
    select,
    write_results,
)
from fedaigc.server.rundir import RunDir

log = logging.getLogger("fedaigc.experiments")

FRACTION = 0.5  # of the online clients, trained each round
RARE_ONLINE = 0.3
FAST = {"participation": 1.0, "bandwidth": 20.0, "latency": 0.02, "step_seconds": 0.25}  # Mbit/s, s, s per step
SLOW = {"participation": RARE_ONLINE, "bandwidth": 2.0, "latency": 0.2, "step_seconds": 1.0}


def rare(num_clients: int) -> list[int]:
    """The clients on the slow, rarely online profile: the second half."""
    return list(range(num_clients // 2, num_clients))


def settings(cfg: config.Config) -> list[Setting]:
    n = cfg.federation.num_clients
    slow = rare(n)
    network = {key: tuple(SLOW[key] if c in slow else FAST[key] for c in range(n)) for key in FAST}
    fed = {"strategy": "cluster", "fraction": FRACTION}
    return [
        Setting("plain", "plain", {"federation": fed | {"sampling": "uniform", "weighting": "plain"}, "network": network}),
        Setting(
            "network",
            "network-aware (ours)",
            {"federation": fed | {"sampling": "network", "weighting": "network"}, "network": network},
        ),
    ]


def checkpoints(rounds: int) -> list[int]:
    """The rounds after which every client is scored: halfway and the last."""
    return sorted({max(1, rounds // 2), rounds})


def measure(plan: Plan, run_cfg: config.Config, run: RunDir) -> dict[str, float]:
    """The usual numbers after the last round, each client's and the worst client's quality,
    how often each client trained, and per checkpoint the quality, simulated time and bytes so far."""
    rounds = run_cfg.federation.rounds
    for r in checkpoints(rounds)[:-1]:
        plan.scored(run_cfg, run, key=f"round_{r}", at_round=r)
    metrics = plan.scored(run_cfg, run)
    row = numbers(metrics)
    per_client = metrics["final"]["per_client"]
    slow = rare(run_cfg.federation.num_clients)
    row["worst_style_acc"] = min(p["style_acc"] for p in per_client.values())
    row["worst_fid"] = max(p["fid"] for p in per_client.values())
    trained = {int(c): 0 for c in per_client}
    for entry in metrics["rounds"]:
        for c in set(entry["sampled"]) - set(entry["missing"]):
            trained[c] += 1
    for c, p in per_client.items():
        row[f"c{c}_style_acc"] = p["style_acc"]
        row[f"c{c}_rounds"] = trained[int(c)]
    for name, group in (("rare", slow), ("frequent", [c for c in trained if c not in slow])):
        if group:
            row[f"{name}_style_acc"] = float(np.mean([per_client[str(c)]["style_acc"] for c in group]))
            row[f"{name}_rounds"] = float(np.mean([trained[c] for c in group]))
    seconds, mib = 0.0, 0.0
    for entry in metrics["rounds"]:
        seconds += entry["sim_seconds"]
        mib += (entry["bytes_up"] + entry["bytes_down"]) * (len(entry["sampled"]) - len(entry["missing"])) / 2**20
        if entry["round"] in checkpoints(rounds):
            key = "final" if entry["round"] == rounds else f"round_{entry['round']}"
            row[f"style_acc_round_{entry['round']}"] = metrics[key]["mean"]["style_acc"]
            row[f"sim_minutes_round_{entry['round']}"] = seconds / 60
            row[f"mib_round_{entry['round']}"] = mib
    return row


def to_target(results: list[Result], rounds: int) -> float:
    """The common target: the best mean style accuracy the weaker setting reaches at a checkpoint.
    Adds to every row the simulated minutes and MiB to the first checkpoint at or above it."""
    best = [max(row[f"style_acc_round_{r}"] for r in checkpoints(rounds)) for result in results for row in result.rows]
    target = min(best)
    for result in results:
        for row in result.rows:
            first = next(r for r in checkpoints(rounds) if row[f"style_acc_round_{r}"] >= target)
            row["target_round"] = first
            row["sim_minutes_to_target"] = row[f"sim_minutes_round_{first}"]
            row["mib_to_target"] = row[f"mib_round_{first}"]
    return target


def run_network(plan: Plan, only: list[str] | None = None) -> tuple[Path, str]:
    """Both settings (or those in `only`) for every seed, twice the preset's rounds (partial
    participation needs more); writes results.csv, plots and report.md."""
    cfg = copy.deepcopy(plan.cfg)
    cfg.federation.rounds *= 2
    plan = replace(plan, cfg=cfg)
    results = [Result(s) for s in select(settings(cfg), only)]
    for seed in plan.seeds:
        for i, result in enumerate(results, 1):
            run_cfg = result.setting.config(plan.cfg, seed)
            run_dir = plan.out / f"{result.setting.name}_seed{seed}"
            log.info("[network %d/%d] %s, seed %d: %s", i, len(results), result.setting.label, seed, run_dir)
            run = plan.train(run_cfg, run_dir)
            result.add(run_dir, measure(plan, run_cfg, run), run.metrics())
    rounds = cfg.federation.rounds
    target = to_target(results, rounds)
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    summary = "; ".join(
        f"{r.setting.label}: style {r.mean('style_acc'):.1%}, worst client {r.mean('worst_style_acc'):.1%}, "
        f"{r.mean('sim_minutes_to_target'):.1f} simulated min to style {target:.1%}"
        for r in results
    )
    return write_report(plan, results, rounds, target, seconds), summary


def write_report(plan: Plan, results: list[Result], rounds: int, target: float, seconds: float) -> Path:
    cfg, plots = plan.cfg, plan.out / "plots"
    n = cfg.federation.num_clients
    slow = rare(n)
    per_client = results[0].metrics[0]["final"]["per_client"]
    names = [f"{c} ({per_client[str(c)]['domain']}, {'rare' if c in slow else 'frequent'})" for c in range(n)]
    grouped_bars(
        names,
        {r.setting.label: [r.mean(f"c{c}_style_acc") for c in range(n)] for r in results},
        "Confident style accuracy per client after the last round",
        "style accuracy",
        plots / "style_per_client.png",
        ylim=(0, 1),
    )
    grouped_bars(
        names,
        {r.setting.label: [r.mean(f"c{c}_rounds") for c in range(n)] for r in results},
        f"Rounds each client trained in (of {rounds})",
        "rounds",
        plots / "rounds_per_client.png",
    )
    points = checkpoints(rounds)
    for x, unit, name in (
        ("sim_minutes", "simulated minutes", "quality_vs_time"),
        ("mib", "MiB transferred", "quality_vs_bytes"),
    ):
        curves(
            {
                r.setting.label: ([r.mean(f"{x}_round_{p}") for p in points], [r.mean(f"style_acc_round_{p}") for p in points])
                for r in results
            },
            f"Mean confident style accuracy vs {unit}",
            f"{unit} (cumulative)",
            "style accuracy",
            plots / f"{name}.png",
            integer_x=False,
        )
    profile = markdown_table(
        ["clients", "online per round", "bandwidth (Mbit/s)", "latency (s)", "s per local step"],
        [
            [", ".join(map(str, group)), p["participation"], p["bandwidth"], p["latency"], p["step_seconds"]]
            for group, p in (([c for c in range(n) if c not in slow], FAST), (slow, SLOW))
            if group
        ],
    )
    per_client_table = markdown_table(
        [
            "setting",
            "worst client: style acc",
            "worst client: evaluator-FID",
            "rare: style acc",
            "frequent: style acc",
            "rare: rounds trained",
            "frequent: rounds trained",
        ],
        [
            [r.setting.label]
            + [r.cell(k) for k in ("worst_style_acc", "worst_fid", "rare_style_acc", "frequent_style_acc")]
            + [r.cell(k, 1) for k in ("rare_rounds", "frequent_rounds")]
            for r in results
        ],
    )
    to_target = markdown_table(
        [
            "setting",
            *[f"style acc after round {p}" for p in points],
            "checkpoint reaching the target",
            "simulated minutes to target",
            "MiB to target",
            f"simulated minutes, all {rounds} rounds",
            f"MiB, all {rounds} rounds",
        ],
        [
            [r.setting.label]
            + [r.cell(f"style_acc_round_{p}") for p in points]
            + [r.cell("target_round", 0), r.cell("sim_minutes_to_target", 1), r.cell("mib_to_target", 1)]
            + [r.cell(f"sim_minutes_round_{rounds}", 1), r.cell(f"mib_round_{rounds}", 1)]
            for r in results
        ],
    )
    grid = sample_grid(plan, [(r.setting.label, r.runs[0] / "samples", r.metrics[0]["final"]["per_client"]) for r in results])
    data = report_data(plan, seconds, grid, run_lines(results)) | {
        "rounds": rounds,
        "fraction": FRACTION,
        "profile": profile,
        "quality": quality_table("setting", results),
        "per_client": per_client_table,
        "points": points,
        "target": target,
        "to_target": to_target,
    }
    return render_report("network", data, plan.out / "report.md")
