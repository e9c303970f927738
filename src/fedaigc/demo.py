"""`fedaigc demo`: the main job on the embedded default model.

Data -> evaluator -> base-model check -> federated LoRA fine-tuning with the cluster-aware
strategy and with FedAvg on Flower's simulation engine -> every client's samples scored ->
`report.md` with the comparison table, plots and sample grids.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from fedaigc import config
from fedaigc.data.dataset import ImageFolder, ensure_dataset, read_images, split
from fedaigc.eval.base_model import evaluate_base
from fedaigc.eval.evaluate import evaluate_run
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table, render_report, save_grid
from fedaigc.eval.scoring import SCORES
from fedaigc.inference import MIX_MODES
from fedaigc.inference.device import InferenceServer
from fedaigc.inference.service import run_service
from fedaigc.model.base import pick_device
from fedaigc.server.rundir import RunDir
from fedaigc.simulation.federate import simulate

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "cluster")
LABELS = {"fedavg": "FedAvg", "cluster": "cluster-aware (ours, hybrid inference)"}


def run_demo(cfg: config.Config, out: Path, data: Path | None, model: Path | None, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config.save(cfg, out / "config.toml")
    log.info("step 1/3: data, evaluator and the base model (the diffusion model runs on %s)", pick_device())
    base = evaluate_base(cfg, out, data, model, per_class=8, progress=progress)
    runs = {}
    for i, strategy in enumerate(STRATEGIES, start=2):
        log.info("step %d/3: federating %d clients with %s", i, cfg.federation.num_clients, LABELS[strategy])
        run_cfg = copy.deepcopy(cfg)
        run_cfg.federation.strategy = strategy
        run_dir = out / strategy
        resume = (run_dir / "config.toml").is_file()
        run, run_cfg, _, _ = simulate(run_cfg, run_dir, data, model, resume=resume)
        if strategy == "cluster":
            runs[strategy] = evaluate_hybrid(run_cfg, run, data, model, progress)
        else:
            runs[strategy] = evaluate_run(run_cfg, run, data, model, progress=progress)
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "base": base,
        "strategies": {s: {"final": m["final"], "clustering": m["clustering"], "rounds": m["rounds"]} for s, m in runs.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(cfg, out, summary, data)
    return summary


def evaluate_hybrid(cfg: config.Config, run: RunDir, data: Path | None, model: Path | None, progress: bool) -> dict:
    """The cluster-aware clients generate as the product does: a real inference edge server on
    127.0.0.1 holds the run's cluster adapters and runs the first ⌈s·T⌉ steps of every image."""
    with run_service(run.root / "adapters", model, "demo") as (url, token):
        share = 100 * cfg.sample.split
        log.info("hybrid inference: the inference edge server on %s runs %.0f%% of every image's steps", url, share)
        server = InferenceServer(url, token)
        return evaluate_run(cfg, run, data, model, progress, server=server, split_ratio=cfg.sample.split)


def _sample_grid(cfg: config.Config, out: Path, summary: dict, data: Path | None) -> Path:
    """One row per client: its real images, FedAvg samples, cluster-aware samples."""
    folder = ImageFolder(ensure_dataset(data, cfg), size=cfg.data.size)
    _, test = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    rows, labels = [], []
    per_client = summary["strategies"]["cluster"]["final"]["per_client"]
    n = 6
    for cid, info in sorted(per_client.items(), key=lambda kv: int(kv[0])):
        rows.append(folder.stack([s for s in test if s.domain == info["domain"]][:n]))
        labels.append(f"{cid} {info['domain']} real")
        for strategy in STRATEGIES:
            pngs = sorted((out / strategy / "samples" / f"client_{cid}").glob("*.png"))[:n]
            rows.append(read_images(pngs, cfg.data.size))
            labels.append(f"{cid} {LABELS[strategy].split(' ')[0]}")
    return save_grid(rows, out / "samples_grid.png", labels=labels, scale=2)


def write_report(cfg: config.Config, out: Path, summary: dict, data: Path | None) -> Path:
    base, strategies = summary["base"], summary["strategies"]
    rows = []
    for s in STRATEGIES:
        m = strategies[s]
        r = m["rounds"]
        rows.append(
            [LABELS[s]]
            + [m["final"]["mean"][k] for k in SCORES]
            + [
                m["clustering"]["ari"],
                int(sum(x["bytes_up"] for x in r) / len(r)),
                int(sum(x["bytes_down"] for x in r) / len(r)),
                sum(x["seconds"] for x in r) / len(r),
            ]
        )
    clients = sorted(strategies["cluster"]["final"]["per_client"], key=int)
    per_client_rows = []
    for cid in clients:
        row = [cid, strategies["cluster"]["final"]["per_client"][cid]["domain"]]
        for s in STRATEGIES:
            pc = strategies[s]["final"]["per_client"][cid]
            row += [pc["style_acc"], pc["class_acc"], pc["fid"]]
        per_client_rows.append(row)
    plots = out / "plots"
    grouped_bars(
        [f"{c} {strategies['cluster']['final']['per_client'][c]['domain']}" for c in clients],
        {LABELS[s]: [strategies[s]["final"]["per_client"][c]["style_acc"] for c in clients] for s in STRATEGIES},
        f"Confident style accuracy per client (p >= {cfg.evaluator.confidence})",
        "style accuracy",
        plots / "style_per_client.png",
        ylim=(0, 1),
    )
    grouped_bars(
        [f"{c} {strategies['cluster']['final']['per_client'][c]['domain']}" for c in clients],
        {LABELS[s]: [strategies[s]["final"]["per_client"][c]["fid"] for c in clients] for s in STRATEGIES},
        "Evaluator-FID per client (lower is better)",
        "evaluator-FID",
        plots / "fid_per_client.png",
    )
    curves(
        {
            LABELS[s]: ([r["round"] for r in strategies[s]["rounds"]], [r["train_loss"] for r in strategies[s]["rounds"]])
            for s in STRATEGIES
        },
        "Mean local training loss per round",
        "round",
        "diffusion loss",
        plots / "train_loss.png",
    )
    c, f = strategies["cluster"]["final"]["mean"], strategies["fedavg"]["final"]["mean"]
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    ev = base["evaluator"]
    report = {
        "cfg": cfg,
        "seconds": summary["seconds"],
        "threshold": base["threshold"],
        "strategies": markdown_table(
            [
                "strategy",
                "style acc",
                "style top",
                "class acc",
                "class top",
                "evaluator-FID",
                "KID",
                "alignment",
                "centred alignment",
                "clustering ARI",
                "bytes up/round",
                "bytes down/round",
                "s/round",
            ],
            rows,
        ),
        "fid_ratio": ratio(c["fid"], f["fid"]),
        "alignment_ratio": ratio(c["alignment"], f["alignment"]),
        "centred_alignment_ratio": ratio(c["alignment_centred"], f["alignment_centred"]),
        "hybrid": hybrid(strategies["cluster"]["final"]),
        "per_client": markdown_table(
            ["client", "domain"] + [f"{LABELS[s].split(' ')[0]} {k}" for s in STRATEGIES for k in ("style", "class", "FID")],
            per_client_rows,
        ),
        "grid": _sample_grid(cfg, out, summary, data).name,
        "evaluator": markdown_table(
            ["held-out images", "domain top", "domain confident", "class top", "class confident"],
            [[ev["images"], ev["domain_top"], ev["domain_confident"], ev["class_top"], ev["class_confident"]]],
        ),
        "base_model": base["base_model"],
    }
    return render_report("demo", report, out / "report.md")


def hybrid(final: dict) -> dict | None:
    """Hybrid inference's cost per image, for the report; None where the devices generated alone."""
    inf = final.get("inference", {})
    if not inf.get("hybrid"):
        return None
    images = final["samples_per_client"] * len(final["per_client"])
    return {
        "server_steps": inf["server_steps"],
        "split": inf["split"],
        "mix": inf["mix"],
        "mix_meaning": MIX_MODES[inf["mix"]],
        "device_seconds": inf["device_seconds"] / images,
        "kib_sent": inf["bytes_sent"] / images / 1024,
        "kib_received": inf["bytes_received"] / images / 1024,
    }


def headline(summary: dict) -> str:
    c = summary["strategies"]["cluster"]["final"]["mean"]
    f = summary["strategies"]["fedavg"]["final"]["mean"]
    return (
        f"style accuracy: cluster-aware {c['style_acc']:.1%} vs FedAvg {f['style_acc']:.1%}; evaluator-FID "
        f"{c['fid']:.1f} vs {f['fid']:.1f}; alignment {c['alignment']:.3f} vs {f['alignment']:.3f}; clustering ARI "
        f"{summary['strategies']['cluster']['clustering']['ari']:.2f}"
    )
