"""`fedaigc federate`: run the ServerApp and ClientApps on Flower's simulation engine, then score
every client's personalized adapter and write the run directory's metrics and report."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from fedaigc import config
from fedaigc.client.client_app import build_client, make_client_app
from fedaigc.data.dataset import ImageFolder, ensure_dataset, split
from fedaigc.errors import RunFailed, UserError
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.metrics import clustering_ari
from fedaigc.eval.report import save_images
from fedaigc.eval.run_report import write_run_report
from fedaigc.eval.scoring import SCORES, score
from fedaigc.inference.device import InferenceServer, PersonalModel
from fedaigc.inference.device import generate as hybrid_generate
from fedaigc.model.base import pick_device
from fedaigc.model.recipe import is_external
from fedaigc.server.central import run_central
from fedaigc.server.rundir import RunDir, read_json, write_json
from fedaigc.server.server_app import make_server_app
from fedaigc.server.strategies import Aggregator

log = logging.getLogger(__name__)


def saved_run(root: Path) -> tuple[config.Config, Path | None, Path | None]:
    """The config, data and model directories a run directory was made with."""
    cfg = config.from_saved(root / "config.toml")
    sources = root / "sources.json"
    saved = read_json(sources) if sources.exists() else {}
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k, ""), str) for k in ("data", "model"))):
        raise UserError(f'{sources} is corrupt: expected {{"data": folder, "model": folder}}')
    return cfg, Path(saved["data"]) if saved.get("data") else None, Path(saved["model"]) if saved.get("model") else None


def simulate(
    cfg: config.Config,
    out: Path,
    data: Path | None,
    model: Path | None,
    resume: bool = False,
    changes: dict | None = None,
    allow_config_change: bool = False,
):
    """Run (or resume) the federation in Flower's simulation engine (Ray), one CPU per client actor
    and, on a GPU, an equal share of it (the `central` baseline trains here, without Flower).
    A resumed run keeps its own config, with `changes` (nested dicts) merged in; it goes on only
    with the config its last round ran with (`federation.rounds` aside), unless `allow_config_change`.
    Everything is checked before Ray starts or a file is written; a run directory this call made
    is removed again if the run fails before its first round.
    Returns the run directory and the config, data and model it ran with."""
    run = RunDir(out)
    if run.last_round() and not resume:
        raise UserError(f"{out} already holds a run (round {run.last_round()} done); pass --resume to continue it")
    if resume:
        cfg, saved_data, saved_model = saved_run(run.root)
        cfg = config.apply(cfg, changes or {})
        data, model = data or saved_data, model or saved_model
    config.validate(cfg)
    run.check(cfg, allow_config_change)
    ensure_dataset(data, cfg)  # a wrong --data fails here, and the default set is rendered once, not by every client
    made = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        _run_federation(cfg, run, data, model, allow_config_change)
    except BaseException:
        if made and not run.last_round():
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    if run.last_round() < cfg.federation.rounds:
        raise RunFailed(f"the federation stopped after round {run.last_round()} of {cfg.federation.rounds}")
    return run, cfg, data, model


def _run_federation(cfg: config.Config, run: RunDir, data: Path | None, model: Path | None, allow_config_change: bool) -> None:
    config.save(cfg, run.root / "config.toml")
    paths = {"data": str(Path(data).resolve()) if data else "", "model": str(Path(model).resolve()) if model else ""}
    write_json(run.root / "sources.json", paths)
    run_config = {
        "preset": cfg.preset,
        "config": config.to_toml(cfg),
        "run-dir": str(run.root.resolve()),
        "allow-config-change": allow_config_change,
        **paths,
    }
    if cfg.federation.strategy == "central":
        run_central(cfg, run, data, model)
    else:
        from flwr.simulation import run_simulation

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        actors, gpus = client_actors(cfg, model)
        log.info("simulation: %d client actor(s) at once, %.2f GPU each", actors, gpus)
        run_simulation(
            server_app=make_server_app(run_config),
            client_app=make_client_app(run_config),
            num_supernodes=cfg.federation.num_clients,
            backend_config={
                "client_resources": {"num_cpus": max(1, (os.cpu_count() or 1) // actors), "num_gpus": gpus},
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": True},
            },
        )


def client_actors(cfg: config.Config, model: Path | None) -> tuple[int, float]:
    """How many client actors Ray runs at once and the GPU share of each. Each actor loads one copy
    of the base model (shared by the clients it serves), so on a GPU an external model (a Stable
    Diffusion folder) gets one actor per GPU by default, the embedded model one per CPU core;
    `federation.actors` sets the number."""
    cpus = os.cpu_count() or 1
    gpu_count = torch.cuda.device_count() if pick_device().type == "cuda" else 0
    default = gpu_count if gpu_count and is_external(model) else cpus
    actors = min(cfg.federation.actors or default, cfg.federation.num_clients)
    return actors, (gpu_count / actors if gpu_count else 0.0)


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
    aggregator = Aggregator(cfg.federation, cfg.client.alpha / cfg.client.rank)
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
        s = score(evaluator, images, real, client.domain, classes, cfg.evaluator.confidence)
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
