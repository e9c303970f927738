"""Do the clients' first-round UNet updates separate the styles? The server clusters by them
(`cluster_by = "update"`, docs/method.md); this replays round 1 of the demo federation outside
Flower, with the ClientApp's own clients and seeds: each client's profiling pass and its repeat
(`LocalClient.train_round`), clustered as the server does.

Per federation seed, for both rules: raw cosines of the first passes cut at `merge_similarity`
(without a repeat) and noise-corrected cosines of both passes cut at `merge_agreement`
(`clustering.reference_similarity`, the default): the ARI of the partition, its K, and the two
similarities a cut has to fall between: the lowest at which average linkage completes a style's
clients (last within-style merge) and the highest at which it first merges two styles.

    python benchmarks/profile_separation.py [--styles default|heldout] [--seeds 0,1,2,3,4] [--clients 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from fedaigc.client.client_app import build_client
from fedaigc.config import preset
from fedaigc.eval.metrics import clustering_ari
from fedaigc.protocol.seeds import derived_seed
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster_similarity, reference_similarity


def merge_margin(similarity: np.ndarray, domains: list[str]) -> tuple[float, float]:
    """(last within-style merge, first cross-style merge) of average linkage on 1 − similarity
    (nan where no style has two clients)."""
    distance = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    members = [{i} for i in range(len(domains))]
    within, across = [], []
    for left, right, height, _ in tree:
        merged = members[int(left)] | members[int(right)]
        members.append(merged)
        (within if len({domains[i] for i in merged}) == 1 else across).append(1.0 - height)
    return min(within, default=float("nan")), max(across, default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--styles", default="default", help="data.styles of the generated set (default: default)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="federation seeds, comma-separated (default: 0,1,2,3,4)")
    ap.add_argument("--clients", type=int, default=None, help="clients (default: the preset's 8; 7 leaves one style one client)")
    args = ap.parse_args()
    base = preset("demo")
    base.data.styles = args.styles
    fed = base.federation
    n = args.clients or fed.num_clients
    steps, bias = fed.profile_steps, base.client.timestep_bias
    print(f"{args.styles} styles, {n} clients, profiling pass {steps} steps at timestep bias {bias} and its repeat")
    print(f"raw: first passes at merge_similarity {fed.merge_similarity}; rho: both at merge_agreement {fed.merge_agreement}")
    print(f"{'seed':>4s} {'rule':>4s} {'ARI':>5s} {'K':>2s} {'last within':>11s} {'first across':>12s} {'seconds':>7s}")
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = dataclasses.replace(base, federation=dataclasses.replace(fed, seed=seed, num_clients=n))
        t0 = time.perf_counter()
        firsts, repeats, domains = [], [], []
        for cid in range(n):
            client = build_client(cfg, cid, n)
            generator = torch.Generator().manual_seed(derived_seed(seed, 1, cid))
            upload = client.train_round(None, None, 0, generator, profile_steps=steps, profile_bias=bias)
            firsts.append(agg.change(upload.profile, None))
            repeats.append(agg.change(upload.profile_repeat, None))
            domains.append(client.domain)
        g = agg.gram(firsts + repeats).numpy()
        norms = np.sqrt(np.diag(g)[:n])
        rules = {
            "raw": (g[:n, :n] / np.outer(norms, norms), fed.merge_similarity),
            "rho": (reference_similarity(g), fed.merge_agreement),
        }
        seconds = time.perf_counter() - t0
        for name, (similarity, cut) in rules.items():
            labels = cluster_similarity(similarity, cut)
            within, across = merge_margin(similarity, domains)
            ari = clustering_ari(domains, list(labels))
            k = len(set(labels))
            print(f"{seed:4d} {name:>4s} {ari:5.2f} {k:2d} {within:11.3f} {across:12.3f} {seconds:7.0f}", flush=True)


if __name__ == "__main__":
    main()
