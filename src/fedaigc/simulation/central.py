"""The `central` baseline, the upper bound: no federation, no Flower. For each domain one trainer
learns from the pooled images of every client whose dominant domain it is (the federation's
partition), `rounds` x `client.steps` steps at the clients' batch size and learning rate, and each
of those clients gets its adapter and token slot.

It trains in rounds of `client.steps` steps (a fresh optimizer each, as every federated client
has) so that it writes the run directory a federation writes, round by round: `evaluate_run`, the
report and `--resume` read it unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from fedaigc import config
from fedaigc.client.train import LocalClient
from fedaigc.data.dataset import ImageFolder, ensure_dataset, partition, read_images, split
from fedaigc.model.base import load_model
from fedaigc.protocol.seeds import derived_seed
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import make_strategy

log = logging.getLogger(__name__)


def run_central(cfg: config.Config, run: RunDir, data: Path | None, model: Path | None) -> None:
    """Train (or resume) one adapter per domain on pooled client data; clusters = domain index."""
    fed = cfg.federation
    folder = ImageFolder(ensure_dataset(data, cfg), size=cfg.data.size)
    train, _ = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    shares = partition(train, fed.num_clients, fed.per_client, fed.purity, fed.dirichlet, seed=fed.seed)
    groups: dict[str, list[int]] = {}
    for share in shares:
        groups.setdefault(share.domain, []).append(share.client_id)
    trainers = {}
    for domain, members in groups.items():
        pool = [s for c in members for s in shares[c].samples]
        base = load_model(model, dtype=cfg.model.dtype, resolution=cfg.model.resolution)
        torch.manual_seed(fed.seed)  # the same LoRA initialisation as every federated client
        trainers[domain] = LocalClient(
            base,
            read_images([s.path for s in pool], base.image_size),
            [s.domain for s in pool],
            [s.cls for s in pool],
            cfg.client,
            seed=derived_seed(fed.seed, "token", "central", domain),
        )
    aggregator = make_strategy(cfg)
    done = run.start(cfg, aggregator)  # simulate checked the config against the run's saved rounds
    for r in range(done + 1, fed.rounds + 1):
        t0, losses = time.perf_counter(), []
        for domain, members in groups.items():
            adapter, slot = aggregator.model_for(members[0])
            generator = torch.Generator().manual_seed(derived_seed(fed.seed, r, "central", domain))
            upload = trainers[domain].train_round(adapter, slot, cfg.client.steps, generator)
            aggregator.set_pooled(folder.domains.index(domain), members, upload)
            losses.append((upload.train_loss, upload.num_examples))
        entry = {
            "round": r,
            "train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses),
            "clusters": {str(c): k for c, k in sorted(aggregator.assignment.items())},
            "bytes_up": 0,
            "bytes_down": 0,
            "seconds": round(time.perf_counter() - t0, 2),
            "missing": [],
            "rejected": {},
        }
        run.save_round(aggregator, entry, next(iter(trainers.values())).spec, cfg)
        log.info("central round %d/%d done in %.1f s: loss %.4f", r, fed.rounds, entry["seconds"], entry["train_loss"])
