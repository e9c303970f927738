"""`fedaigc experiment aggregation`: the strategies side by side, and ablations of ours.

Strategies: local (no federation), FedAvg, FedGeoMed, FLoRA, cluster-aware (ours), central (pooled
data per domain, the upper bound). Ablations of ours: no DED, no SNT, `exact` instead of `fedit`
intra-cluster averaging, k fixed to the number of domains instead of chosen automatically.

DED and SNT only shape the global LoRA (the exact stack of the cluster LoRAs that the inference
server holds); clients train and generate with their cluster's adapter and never receive it. So
every cluster-aware run is also scored with its global LoRA alone, where those ablations act.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from fedaigc import config
from fedaigc.data.dataset import ImageFolder, ensure_dataset
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table, render_report
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    federated,
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

ABLATIONS = ("no_ded", "no_snt", "exact", "fixed_k")
GLOBAL_COLUMNS = ("style_acc", "class_acc", "fid", "kid", "alignment")


def settings(cfg: config.Config, num_domains: int) -> list[Setting]:
    """Every setting, strategies first; `fixed_k` uses as many clusters as the clients have
    dominant domains (client i's is domain i mod D)."""
    k = min(num_domains, cfg.federation.num_clients)

    def fed(**values) -> dict:
        return {"federation": values}

    return [
        Setting("local", "local (no federation)", fed(strategy="local")),
        Setting("fedavg", "FedAvg", fed(strategy="fedavg")),
        Setting("fedgeomed", "FedGeoMed", fed(strategy="fedgeomed")),
        Setting("flora", "FLoRA", fed(strategy="flora")),
        Setting("cluster", "cluster-aware (ours)", fed(strategy="cluster")),
        Setting("central", "central (pooled data)", fed(strategy="central")),
        Setting("no_ded", "ours without DED", fed(strategy="cluster", use_ded=False)),
        Setting("no_snt", "ours without SNT", fed(strategy="cluster", use_snt=False)),
        Setting("exact", "ours, exact intra-cluster", fed(strategy="cluster", intra="exact")),
        Setting("fixed_k", f"ours, fixed k = {k}", fed(strategy="cluster", k=k)),
    ]


def run_aggregation(plan: Plan, only: list[str] | None = None) -> tuple[Path, str]:
    """Every chosen setting for every seed; writes results.csv, plots and report.md. Returns the
    report and a one-line summary."""
    domains = ImageFolder(ensure_dataset(plan.data, plan.cfg), size=plan.cfg.data.size).domains
    chosen = select(settings(plan.cfg, len(domains)), only)

    def global_lora(run_cfg: config.Config, run: RunDir) -> dict[str, float]:
        if run_cfg.federation.strategy != "cluster":
            return {}
        log.info("%s: scoring its global LoRA alone (where DED and SNT act)", run.root)
        metrics = plan.scored(run_cfg, run, key="global", global_stack=True)
        row = numbers(metrics, "global")
        cols = {f"global_{k}": row[k] for k in GLOBAL_COLUMNS}
        cols |= {f"global_{k}": v for k, v in row.items() if k.startswith("style_acc_")}
        return cols | {"fedit_error": float(metrics["rounds"][-1]["fedit_error"])}

    results = federated("aggregation", plan, chosen, global_lora)
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    return write_report(plan, results, seconds), headline(results)


def write_report(plan: Plan, results: list[Result], seconds: float) -> Path:
    plots = plan.out / "plots"
    strategies = [r for r in results if r.setting.name not in ABLATIONS]
    family = [r for r in results if r.setting.overrides["federation"]["strategy"] == "cluster"]
    domains = sorted(c.removeprefix("style_acc_") for c in results[0].rows[0] if c.startswith("style_acc_"))
    curves(
        {r.setting.label: r.per_round("train_loss") for r in results},
        "Convergence: mean local training loss per round",
        "round",
        "diffusion loss (last quarter of local steps)",
        plots / "train_loss.png",
    )
    curves(
        {r.setting.label: per_round_kib(r) for r in results},
        "Communication per client and round (upload + download)",
        "round",
        "KiB per client",
        plots / "bytes_per_round.png",
    )
    communication = markdown_table(
        ["setting", "KiB up / client / round", "KiB down / client / round", "s / round", "final train loss"],
        [
            [r.setting.label, r.cell("kib_up", 1), r.cell("kib_down", 1), r.cell("s_per_round", 1), r.cell("final_loss", 4)]
            for r in results
        ],
    )
    grid_rows = [(r.setting.label, r.runs[0] / "samples", r.metrics[0]["final"]["per_client"]) for r in results]
    grid_rows += [
        (f"{r.setting.label}, global LoRA", r.runs[0] / "samples" / "global", r.metrics[0]["global"]["per_client"])
        for r in family
    ]
    data = report_data(plan, seconds, sample_grid(plan, grid_rows), run_lines(results)) | {
        "strategies": strategy_tables(plan.cfg, strategies, domains, plots) if strategies else None,
        "ablations": ablation_tables(family, domains, plots) if family else None,
        "communication": communication,
    }
    return render_report("aggregation", data, plan.out / "report.md")


def per_domain(
    results: list[Result], domains: list[str], col: str, title: str, ylabel: str, path: Path, digits: int = 3, ylim=None
) -> str:
    """Bars of `col` per domain (`<col>_<domain>`: mean over that domain's clients) and over all
    clients; returns the same numbers as a table."""
    grouped_bars(
        [*domains, "mean"],
        {r.setting.label: [r.mean(f"{col}_{d}") for d in domains] + [r.mean(col)] for r in results},
        title,
        ylabel,
        path,
        ylim=ylim,
    )
    return markdown_table(
        ["setting", *domains, "mean"],
        [[r.setting.label] + [r.cell(f"{col}_{d}", digits) for d in domains] + [r.cell(col, digits)] for r in results],
    )


def strategy_tables(cfg: config.Config, strategies: list[Result], domains: list[str], plots: Path) -> dict:
    return {
        "quality": quality_table("strategy", strategies),
        "versus_fedavg": versus_fedavg(strategies),
        "style": per_domain(
            strategies,
            domains,
            "style_acc",
            f"Confident style accuracy per domain (p >= {cfg.evaluator.confidence})",
            "style accuracy",
            plots / "style_per_domain.png",
            ylim=(0, 1),
        ),
        "fid": per_domain(
            strategies,
            domains,
            "fid",
            "Evaluator-FID per domain (lower is better)",
            "evaluator-FID",
            plots / "fid_per_domain.png",
            1,
        ),
    }


def ablation_tables(family: list[Result], domains: list[str], plots: Path) -> dict:
    own = ["style_acc", "fid", "alignment", "ari", "fedit_error"]
    glob = ["global_style_acc", "global_class_acc", "global_fid", "global_kid", "global_alignment"]
    header = ["setting", "style acc", "evaluator-FID", "alignment", "clustering ARI", "fedit error"]
    header += ["global: style acc", "global: class acc", "global: evaluator-FID", "global: KID", "global: alignment"]
    return {
        "table": markdown_table(header, [[r.setting.label] + [r.cell(c) for c in own + glob] for r in family]),
        "style": per_domain(
            family,
            domains,
            "global_style_acc",
            "Global LoRA alone: confident style accuracy per domain",
            "style accuracy",
            plots / "global_lora_style.png",
            ylim=(0, 1),
        ),
    }


def per_round_kib(result: Result) -> tuple[list[int], list[float]]:
    rounds, up = result.per_round("bytes_up")
    _, down = result.per_round("bytes_down")
    return rounds, [(u + d) / 1024 for u, d in zip(up, down, strict=True)]


def versus_fedavg(results: list[Result]) -> str | None:
    """The seed paper's headline comparison, where both ours and FedAvg ran."""
    by = {r.setting.name: r for r in results}
    if "cluster" not in by or "fedavg" not in by:
        return None
    c, f = by["cluster"], by["fedavg"]
    return (
        f"Ours / FedAvg: evaluator-FID ratio {ratio(c.mean('fid'), f.mean('fid')):.2f} (paper: 0.6), latent alignment "
        f"ratio {ratio(c.mean('alignment'), f.mean('alignment')):.2f} (paper: 1.4), centred alignment ratio "
        f"{ratio(c.mean('alignment_centred'), f.mean('alignment_centred')):.2f}."
    )


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def headline(results: list[Result]) -> str:
    parts = [f"{r.setting.label}: style {r.mean('style_acc'):.1%}, FID {r.mean('fid'):.1f}" for r in results]
    return "; ".join(parts + [versus_fedavg(results) or ""]).strip("; ")
