"""`fedaigc federate`: run the ServerApp and ClientApps on Flower's simulation engine (the `central`
baseline without Flower), into a run directory that `--resume` continues; scoring the result is
`fedaigc.eval.evaluate`."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from fedaigc import config
from fedaigc.client.client_app import make_client_app
from fedaigc.data.dataset import ensure_dataset
from fedaigc.errors import RunFailed, UserError
from fedaigc.model.base import pick_device
from fedaigc.model.recipe import is_external
from fedaigc.server.rundir import RunDir, read_json, write_json
from fedaigc.server.server_app import make_server_app
from fedaigc.simulation.central import run_central

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
