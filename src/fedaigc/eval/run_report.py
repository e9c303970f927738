"""`report.md` of one run directory: what `fedaigc federate` leaves beside metrics.json (and every
run inside the demo and the experiments): the scores per client, the rounds, two plots and a
grid of the samples behind the scores."""

from __future__ import annotations

from pathlib import Path

from fedaigc.data.dataset import read_images
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table, save_grid
from fedaigc.eval.scoring import SCORES


def write_run_report(root: Path, metrics: dict, image_size: int, per_row: int = 8) -> Path:
    """Everything from `metrics` (metrics.json's content, scored) and the PNGs in `samples/`."""
    final, rounds = metrics["final"], metrics["rounds"]
    per_client = final["per_client"]
    clients = sorted(per_client, key=int)
    names = [f"{c} {per_client[c]['domain']}" for c in clients]
    last = rounds[-1]["clusters"] if rounds else {}
    threshold = final["threshold"]
    grouped_bars(
        names,
        {
            f"style (p >= {threshold})": [per_client[c]["style_acc"] for c in clients],
            f"class (p >= {threshold})": [per_client[c]["class_acc"] for c in clients],
        },
        f"Confident accuracy per client ({metrics['strategy']})",
        "share of samples",
        root / "plots" / "accuracy_per_client.png",
        ylim=(0, 1),
    )
    curves(
        {"mean local loss": ([r["round"] for r in rounds], [r["train_loss"] for r in rounds])},
        f"Mean local training loss per round ({metrics['strategy']})",
        "round",
        "diffusion loss",
        root / "plots" / "train_loss.png",
    )
    rows = [read_images(sorted((root / "samples" / f"client_{c}").glob("*.png"))[:per_row], image_size) for c in clients]
    save_grid(rows, root / "samples_grid.png", labels=names, scale=2)
    inference = final.get("inference", {})
    made = (
        f"by hybrid inference (the inference edge server ran the first {inference['server_steps']} steps of each)"
        if inference.get("hybrid")
        else "on the devices alone"
    )
    whose = "the global LoRA" if final["adapters"] == "global" else "the adapter and token slot the server gives it"
    lines = [
        f"# Run `{root.name}`: strategy `{metrics['strategy']}`",
        "",
        f"{len(clients)} clients, {len(rounds)} rounds; {final['samples_per_client']} samples per client made {made}, "
        f"each with {whose}. Clustering ARI against the "
        f"clients' dominant domains after the last round: {metrics['clustering']['ari']:.2f}. A sample is in style "
        f"(right class) when the evaluator's top guess is right with probability >= {threshold}; *top* counts every "
        "right top guess. Every number comes from `metrics.json`.",
        "",
        "## Mean over clients",
        "",
        markdown_table(
            ["style acc", "style top", "class acc", "class top", "evaluator-FID", "KID", "alignment"],
            [[final["mean"][k] for k in SCORES]],
        ),
        "",
        "## Per client",
        "",
        markdown_table(
            ["client", "domain", "cluster", "style acc", "class acc", "evaluator-FID", "alignment"],
            [
                [c, per_client[c]["domain"], last.get(c, "-")]
                + [per_client[c][k] for k in ("style_acc", "class_acc", "fid", "alignment")]
                for c in clients
            ],
        ),
        "",
        "![accuracy per client](plots/accuracy_per_client.png)",
        "",
        "## Rounds",
        "",
        markdown_table(
            ["round", "train loss", "clusters", "clustering ARI", "bytes up", "bytes down", "seconds", "missing", "rejected"],
            [
                [
                    r["round"],
                    r["train_loss"],
                    len(set(r["clusters"].values())),
                    r.get("ari", float("nan")),
                    r["bytes_up"],
                    r["bytes_down"],
                    r["seconds"],
                    ", ".join(map(str, r.get("missing", []))) or "-",
                    ", ".join(f"{c}: {why}" for c, why in r.get("rejected", {}).items()) or "-",
                ]
                for r in rounds
            ],
        ),
        "",
        "![training loss](plots/train_loss.png)",
        "",
        f"## Samples (per client, the first {per_row})",
        "",
        "![samples](samples_grid.png)",
        "",
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
