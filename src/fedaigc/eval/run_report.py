"""`report.md` of one run directory: what `fedaigc federate` leaves beside metrics.json (and every
run inside the demo and the experiments): the scores per client, the rounds, two plots and a
grid of the samples behind the scores."""

from __future__ import annotations

from pathlib import Path

from fedaigc.data.dataset import read_images
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table, render_report, save_grid
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
    data = {
        "name": root.name,
        "metrics": metrics,
        "final": final,
        "rounds": rounds,
        "clients": clients,
        "server_steps": inference["server_steps"] if inference.get("hybrid") else None,  # None: on the devices alone
        "per_row": per_row,
        "mean": markdown_table(
            ["style acc", "style top", "class acc", "class top", "evaluator-FID", "KID", "alignment", "centred alignment"],
            [[final["mean"][k] for k in SCORES]],
        ),
        "per_client": markdown_table(
            ["client", "domain", "cluster", "style acc", "class acc", "evaluator-FID", "alignment", "centred alignment"],
            [
                [c, per_client[c]["domain"], last.get(c, "-")]
                + [per_client[c][k] for k in ("style_acc", "class_acc", "fid", "alignment", "alignment_centred")]
                for c in clients
            ],
        ),
        "rounds_table": markdown_table(
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
    }
    return render_report("run", data, root / "report.md")
