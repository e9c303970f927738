"""`fedaigc experiment NAME`: the seed paper's three experiments, each into one directory.

- `aggregation`: local, FedAvg, FedGeoMed, FLoRA, cluster-aware (ours), central; ablations of ours
  (no DED, no SNT, `exact` intra-cluster mode, fixed k).
- `split`: the inference edge server's share s of the denoising steps: quality and device compute.
- `privacy`: plain prompts, private style tokens, + a keyed rotation, + the Gaussian mechanism:
  attribute-inference attacks by the server against utility and clustering ARI.
- `dynamic`: clients that join after round 1: placement, newcomers vs from scratch, existing clients.
- `network`: unequal networks and participation: plain vs network-aware sampling and weighting.
- `poisoning`: attackers inside clusters (scale, sign flip, noise, backdoor) without and with the robust defense.

Each writes one normal run directory per (setting, seed), `results.csv` (mean and std over seeds),
`results.json`, `report.md`, PNG plots and a sample grid; running it again reuses finished runs.
"""

from __future__ import annotations

from pathlib import Path

from fedaigc import config
from fedaigc.errors import UserError
from fedaigc.experiments.aggregation import run_aggregation
from fedaigc.experiments.common import Plan
from fedaigc.experiments.dynamic import run_dynamic
from fedaigc.experiments.network import run_network
from fedaigc.experiments.poisoning import run_poisoning
from fedaigc.experiments.privacy import run_privacy
from fedaigc.experiments.split import run_split

EXPERIMENTS = {
    "aggregation": run_aggregation,
    "split": run_split,
    "privacy": run_privacy,
    "dynamic": run_dynamic,
    "network": run_network,
    "poisoning": run_poisoning,
}


def run_experiment(
    name: str,
    cfg: config.Config,
    out: Path,
    data: Path | None,
    model: Path | None,
    seeds: int = 1,
    only: list[str] | None = None,
    progress: bool = True,
    modes: list[str] | None = None,
) -> tuple[Path, str]:
    """Run experiment `name` with `seeds` federation seeds from the config's (mean ± std over
    them), the settings in `only` (all without it) and, for split, the server's `modes` (all four
    without it); returns its report and a one-line summary."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if modes and name != "split":
        raise UserError(f"--modes is an option of the split experiment, not of {name}")
    first = cfg.federation.seed
    plan = Plan(cfg, out, data, model, list(range(first, first + seeds)), progress)
    return run_split(plan, only, modes) if name == "split" else EXPERIMENTS[name](plan, only)
