"""Do the clients' first-round UNet updates separate the styles? The server clusters by them
(`cluster_by = "update"`, docs/method.md); this replays round 1 of the demo federation outside
Flower, with the ClientApp's own clients and seeds, and clusters the updates as the server does.

Per federation seed: the K = 4 partition's ARI at `merge_similarity`, and the two similarities
that threshold has to fall between: the lowest at which average linkage completes a style's
pair (last within-style merge) and the highest at which it first merges two styles.

    python benchmarks/profile_separation.py [--seeds 5] [--steps 40] [--bias 2.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from fedaigc.client.client_app import build_client, derived_seed
from fedaigc.config import preset
from fedaigc.eval.metrics import clustering_ari
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster


def merge_margin(similarity: np.ndarray, domains: list[str]) -> tuple[float, float]:
    """(last within-style merge, first cross-style merge) of average linkage on 1 − similarity."""
    distance = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    members = [{i} for i in range(len(domains))]
    within, across = [], []
    for left, right, height, _ in tree:
        merged = members[int(left)] | members[int(right)]
        members.append(merged)
        (within if len({domains[i] for i in merged}) == 1 else across).append(1.0 - height)
    return min(within), max(across)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="federation seeds 0..N-1 (default: 5)")
    ap.add_argument("--steps", type=int, default=None, help="local steps of the replayed round (default: the preset's)")
    ap.add_argument("--bias", type=float, default=None, help="timestep bias of those steps (default: the preset's)")
    args = ap.parse_args()
    base = preset("demo")
    steps = args.steps or base.client.steps
    bias = args.bias or base.client.timestep_bias
    print(f"round 1 replayed: {steps} steps, timestep bias {bias}, merge similarity {base.federation.merge_similarity}")
    print(f"{'seed':>4s} {'ARI':>5s} {'K':>2s} {'last within':>11s} {'first across':>12s} {'seconds':>7s}")
    for seed in range(args.seeds):
        cfg = dataclasses.replace(base, federation=dataclasses.replace(base.federation, seed=seed))
        t0 = time.perf_counter()
        changes, domains = [], []
        for cid in range(cfg.federation.num_clients):
            client = build_client(cfg, cid, cfg.federation.num_clients)
            generator = torch.Generator().manual_seed(derived_seed(seed, 1, cid))
            upload = client.train_round(None, None, steps, generator, timestep_bias=bias)
            changes.append(agg.change(upload.lora, None))
            domains.append(client.domain)
        g = agg.gram(changes)
        norms = g.diagonal().sqrt()
        similarity = (g / norms[:, None] / norms[None, :]).numpy()
        labels = cluster(agg.gram_points(g), distance_threshold=1.0 - cfg.federation.merge_similarity, center=False)
        within, across = merge_margin(similarity, domains)
        ari = clustering_ari(domains, list(labels))
        seconds = time.perf_counter() - t0
        print(f"{seed:4d} {ari:5.2f} {len(set(labels)):2d} {within:11.3f} {across:12.3f} {seconds:7.0f}", flush=True)


if __name__ == "__main__":
    main()
