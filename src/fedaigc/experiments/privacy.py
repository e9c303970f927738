"""`fedaigc experiment privacy`: private style tokens against plain prompts, both with the
cluster-aware strategy. What the privacy costs in utility, and whether the server can still
cluster clients by task without seeing their style word (clustering ARI every round).
"""

from __future__ import annotations

from pathlib import Path

from fedaigc import config
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    closing,
    federated,
    intro,
    quality_table,
    run_lines,
    sample_grid,
    select,
    write_results,
)
from fedaigc.server.rundir import RunDir

SETTINGS = [
    Setting("plain", "plain prompts", {"federation": {"strategy": "cluster"}, "client": {"prompt_mode": "plain"}}),
    Setting("private", "private tokens (ours)", {"federation": {"strategy": "cluster"}, "client": {"prompt_mode": "private"}}),
]
UTILITY = [("style_acc", "style acc"), ("class_acc", "class acc"), ("alignment", "alignment")]


def run_privacy(plan: Plan, only: list[str] | None = None) -> tuple[Path, str]:
    """Both prompt modes (or those in `only`) for every seed; writes results.csv, plots and report.md."""

    def ari_per_round(_cfg: config.Config, run: RunDir) -> dict[str, float]:
        return {f"ari_round_{r['round']}": r["ari"] for r in run.metrics()["rounds"]}

    results = federated("privacy", plan, select(SETTINGS, only), ari_per_round)
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    summary = "; ".join(
        f"{r.setting.label}: style {r.mean('style_acc'):.1%}, FID {r.mean('fid'):.1f}, clustering ARI {r.mean('ari'):.2f}"
        for r in results
    )
    return write_report(plan, results, seconds), summary


def write_report(plan: Plan, results: list[Result], seconds: float) -> Path:
    plots = plan.out / "plots"
    curves(
        {r.setting.label: r.per_round("ari") for r in results},
        "Clustering ARI against the true dominant domains, per round",
        "round",
        "adjusted Rand index",
        plots / "ari_per_round.png",
    )
    grouped_bars(
        [label for _, label in UTILITY],
        {r.setting.label: [r.mean(key) for key, _ in UTILITY] for r in results},
        "Utility: plain prompts vs private tokens",
        "share / cosine",
        plots / "utility.png",
        ylim=(0, 1),
    )
    rounds = results[0].per_round("ari")[0]
    grid, shown = sample_grid(
        plan, [(r.setting.label, r.runs[0] / "samples", r.metrics[0]["final"]["per_client"]) for r in results]
    )
    lines = [
        "# Experiment: privacy of prompts (plain vs private tokens)",
        "",
        intro(plan, seconds),
        "",
        "## What the training edge server receives",
        "",
        "Both modes upload the LoRA tensors, the number of examples and a task embedding, never text or images. "
        '*Plain*: prompts name the style as written ("a sketch of a dog") and the task embedding is the frozen text '
        "encoder's pooled output of the client's style phrases (\"a sketch\"), which anyone holding that public encoder "
        "can match to the word. *Private*: the style word becomes a per-client token whose name stays on the device; the "
        "task embedding and the uploaded slot are the token's learned embedding, which starts from the neutral word "
        '"picture" and says only what the client\'s images taught it.',
        "",
        "## Utility",
        "",
        quality_table("prompt mode", results),
        "",
        "![utility](plots/utility.png)",
        "",
        "## Clustering per round",
        "",
        "Adjusted Rand index of the server's clusters after each round against the clients' true dominant domains "
        "(1 = the domains exactly, about 0 = chance).",
        "",
        markdown_table(
            ["prompt mode", *[f"round {x}" for x in rounds]],
            [[r.setting.label] + [r.cell(f"ari_round_{x}", 2) for x in rounds] for r in results],
        ),
        "",
        "![ARI per round](plots/ari_per_round.png)",
        "",
    ] + closing(plan, grid, shown, run_lines(results))
    path = plan.out / "report.md"
    path.write_text("\n".join(lines))
    return path
