"""Scoring a run: every client generates with its personalized adapter and private token as its
device would (optionally through an inference edge server), and the images are scored against the
held-out real images of its style; the scores go to the run's metrics.json and report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedaigc import config
from fedaigc.client.client_app import build_client
from fedaigc.data.dataset import ImageFolder, ensure_dataset, split
from fedaigc.errors import UserError
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.metrics import clustering_ari
from fedaigc.eval.report import save_images
from fedaigc.eval.run_report import write_run_report
from fedaigc.eval.scoring import SCORES, real_feature_mean, score
from fedaigc.inference.device import InferenceServer, PersonalModel
from fedaigc.inference.device import generate as hybrid_generate
from fedaigc.server.rundir import RunDir, write_json
from fedaigc.server.strategies import make_strategy

log = logging.getLogger(__name__)


SAMPLE_SEED = 10_000


def sample_seed(cid: int) -> int:
    """The noise seed of client `cid`'s first evaluation sample (then +1 per sample). Each client
    draws its own noises: the members of a cluster share its adapter, and with shared seeds they
    would make the same images, so the cluster's score would rest on one member's samples."""
    return SAMPLE_SEED + 100_000 * cid


def evaluate_run(
    cfg: config.Config,
    run: RunDir,
    data: Path | None,
    model: Path | None,
    progress: bool = True,
    server: InferenceServer | None = None,
    split_ratio: float = 0.3,
    mix: str = "auto",
    key: str = "final",
    global_stack: bool = False,
    at_round: int | None = None,
    clients: list[int] | None = None,
) -> dict:
    """Each client generates `client.samples` images with its personalized adapter and token slot
    (FLoRA: the global stack merged into the base, no LoRA of its own) as the device would, and
    is scored against held-out real images of its dominant domain. With `server`, the images are
    made by hybrid inference: the inference edge server runs the first ⌈s·T⌉ steps with the adapters
    `mix` chooses (`inference.MIX_MODES`), the client the rest.

    The result goes to `metrics[key]` and the images to `samples/` (`samples/<key>/` for another
    key), so one run can be scored several ways. `global_stack` (cluster runs) scores the global
    LoRA instead of the cluster adapters: the only place where DED and SNT act. `at_round` scores
    the server's state after that round instead of the last; `clients` scores only those clients
    (the clustering ARI needs every client's domain and is then left as it was)."""
    if key in ("rounds", "clustering", "strategy"):
        raise UserError(f"metrics.json's {key!r} is not a place for a score")
    folder = ImageFolder(ensure_dataset(data, cfg), size=cfg.data.size)
    train, test = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    evaluator = evaluator_for(folder, train, cfg.evaluator, progress=progress)
    real_mean = real_feature_mean(evaluator, folder.stack(test))
    aggregator = make_strategy(cfg)
    run.restore(aggregator, at_round or run.last_round())
    if global_stack and (cfg.federation.strategy != "cluster" or aggregator.global_adapter is None):
        raise UserError(f"{run.root}: only a finished cluster run has a global LoRA of its own to score")
    samples = run.root / "samples" if key == "final" else run.root / "samples" / key
    metrics = run.metrics()
    per_client, truth = {}, {}
    device_seconds = 0.0
    n = cfg.client.samples
    classes = [folder.classes[i % len(folder.classes)] for i in range(n)]
    for cid in range(cfg.federation.num_clients) if clients is None else clients:
        client = build_client(cfg, cid, cfg.federation.num_clients, data, model)
        truth[cid] = client.domain
        adapter, slot = aggregator.model_for(cid)
        delta = aggregator.base_delta()
        if global_stack:  # the stack (scale 1) merged into the base as FLoRA's is, no cluster LoRA, the cluster's slot
            adapter, delta = None, aggregator.global_adapter
        client.load(adapter, slot, delta)
        if client.token is not None and at_round is None:  # what the device keeps: in a deployment only the device has it
            client.token.save(run.device_dir(cid) / "style_token.safetensors")
        prompts = [client.prompt_for(client.domain, c) for c in classes]
        device = PersonalModel(client.model, client.token)
        made = hybrid_generate(
            device,
            prompts,
            sample_seed(cid),
            cfg.sample.steps,
            cfg.sample.guidance,
            server=server,
            split=split_ratio,
            guidance_rescale=cfg.sample.guidance_rescale,
            mix=mix,
        )
        images, device_seconds = made.images, device_seconds + made.device_seconds
        save_images(images, samples / f"client_{cid}")
        real = folder.stack([s for s in test if s.domain == client.domain])
        s = score(evaluator, images, real, client.domain, classes, cfg.evaluator.confidence, real_mean)
        per_client[str(cid)] = {"domain": client.domain, **s}
        log.info(
            "client %d (%s): style %.0f%%, class %.0f%%, evaluator-FID %.1f",
            cid,
            client.domain,
            100 * s["style_acc"],
            100 * s["class_acc"],
            s["fid"],
        )
    metrics[key] = {
        "adapters": "global" if global_stack else "own",
        "mean": {k: float(torch.tensor([v[k] for v in per_client.values()]).mean()) for k in SCORES},
        "per_client": per_client,
        "threshold": cfg.evaluator.confidence,
        "samples_per_client": n,
        "inference": {
            "hybrid": server is not None,
            "split": split_ratio if server is not None else 0.0,
            "mix": mix if server is not None else None,
            "server_steps": made.server_steps,
            "device_seconds": device_seconds,
            "bytes_sent": server.bytes_sent if server else 0,
            "bytes_received": server.bytes_received if server else 0,
        },
    }
    if clients is None:
        order = sorted(truth)
        for entry in metrics["rounds"]:
            entry["ari"] = clustering_ari([truth[c] for c in order], [entry["clusters"].get(str(c), -1) for c in order])
        metrics["clustering"] = {
            "ari": metrics["rounds"][-1]["ari"] if metrics["rounds"] else float("nan"),
            "true_domains": {str(c): truth[c] for c in order},
        }
    metrics["strategy"] = cfg.federation.strategy
    write_json(run.metrics_file, metrics)
    if key == "final" and clients is None:
        write_run_report(run.root, metrics, cfg.data.size)
    return metrics
