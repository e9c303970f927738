"""Do the clients' first-round UNet updates separate the styles? The server clusters by them
(`cluster_by = "update"`, docs/method.md); this replays round 1 of the demo federation outside
Flower, with the ClientApp's own clients and seeds: each client's profiling pass and its repeat
(`LocalClient.train_round`), clustered as the server does.

Per federation seed, for three rules: raw cosines of the first passes cut at `merge_similarity`
(without a repeat), noise-corrected cosines of both passes cut at `merge_agreement`
(`clustering.reference_similarity`, the server's rule) and a candidate measured here only, 1 − the
separation in units of the clients' own noise cut at 0 (`separation` below): the ARI of the
partition, its K, and the two similarities a cut has to fall between: the lowest at which average
linkage completes a style's clients (last within-style merge) and the highest at which it first
merges two styles; `lone`, of the n federations without one of the clients (its style partner then
alone), how many are clustered exactly; `partial`, of the C(n, n/2) halves clustered first with the
others then joining one by one (`clustering.join_similarity`), how many end exact.

`--save DIR` writes each seed's Gram matrix of first passes and repeats (what the rules need; also per layer) to
`DIR/<styles>_seed<N>.npz` as soon as the seed is done; `--load DIR` evaluates the saved seeds
without building a model, and `--centred` first removes the federation's mean pass from every pass
(a diagnostic: the server does not centre).

    python benchmarks/profile_separation.py [--styles default|heldout] [--seeds 0,1,2,3,4] [--clients 8]
        [--save DIR | --load DIR [--centred] [--candidates]]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from fedaigc.client.client_app import build_client
from fedaigc.config import Config, FederationConfig, preset
from fedaigc.eval.metrics import clustering_ari
from fedaigc.protocol.seeds import derived_seed
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster_similarity, join_similarity, reference_similarity


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


def separation(gram: np.ndarray) -> np.ndarray:
    """A candidate rule measured here and not adopted (docs/results.md): how far apart n clients'
    noise-free updates are in units of their own training noise, from the Gram of two passes each.
    Δ_ij = ⟨A_i − A_j, B_i − B_j⟩ pairs noises that never meet, so E Δ_ij = ‖m_i − m_j‖²; half a
    client's pass difference is pure noise with the spread of the noise in its mean pass, so
    N_ij = ‖(A_i − B_i)/2 − (A_j − B_j)/2‖² is what noise alone puts between two mean passes, and
    z = Δ / N is 0 for clients that learn the same thing. A direction every client learns cancels in
    the difference; but z grows with how much a client's own images differ from its style partner's."""
    n = len(gram) // 2
    a, ab, b = gram[:n, :n], gram[:n, n:], gram[n:, n:]
    delta = np.diag(ab)[:, None] + np.diag(ab)[None, :] - ab - ab.T
    noise_gram = (a + b - ab - ab.T) / 4
    d = np.diag(noise_gram)
    noise = d[:, None] + d[None, :] - 2 * noise_gram
    z = np.divide(delta, noise, out=np.zeros_like(delta), where=noise > 0)
    np.fill_diagonal(z, 0.0)
    return z


def noise_twin_candidates(gram: np.ndarray) -> dict[str, np.ndarray]:
    """Labels of three more candidates (`--candidates`; docs/results.md), from the cross-pass Gram
    S = (⟨A_i, B_j⟩ + ⟨B_i, A_j⟩)/2 (the noise-free ⟨m_i, m_j⟩ without bias) and the Gram D of the half
    pass differences (A_i − B_i)/2 (pure noise with the mean passes' spread): `centred`, the noise-
    corrected cosine of S centred on the clients' mean, cut at 0.5; `rho_K` and `centred_K`, ρ and
    that centred cosine cut into K = 1 + the eigenvalues of H S H above the largest of H D H."""
    n = len(gram) // 2
    a, ab, b = gram[:n, :n], gram[:n, n:], gram[n:, n:]
    h = np.eye(n) - 1.0 / n
    signal, noise = h @ ((ab + ab.T) / 2) @ h, h @ ((a + b - ab - ab.T) / 4) @ h
    d = np.diag(signal)
    centred = np.full((n, n), -1.0)
    ok = d > 0
    centred[np.ix_(ok, ok)] = signal[np.ix_(ok, ok)] / np.sqrt(np.outer(d[ok], d[ok]))
    np.fill_diagonal(centred, 1.0)
    centred = np.clip(centred, -1.0, 1.0)
    k = 1 + int((np.linalg.eigvalsh(signal) > np.linalg.eigvalsh(noise).max()).sum())
    return {
        "centred": cluster_similarity(centred, 0.5),
        "rho_K": cluster_similarity(reference_similarity(gram), k=k),
        "centred_K": cluster_similarity(centred, k=k),
    }


def centre(g: np.ndarray) -> np.ndarray:
    """Gram matrix of the passes minus their mean (H G H, H = I − 11ᵀ/m): the federation's mean
    profile removed from every pass, from inner products alone."""
    h = np.eye(len(g)) - 1.0 / len(g)
    return h @ g @ h


def similarities(g: np.ndarray, fed: FederationConfig) -> dict[str, tuple[np.ndarray, float]]:
    """{rule: (similarity between the n clients, its cut)} from the 2n x 2n Gram `g` of first passes
    (rows 0..n-1) and repeats."""
    n = len(g) // 2
    norms = np.sqrt(np.diag(g)[:n])
    return {
        "raw": (g[:n, :n] / np.outer(norms, norms), fed.merge_similarity),
        "rho": (reference_similarity(g), fed.merge_agreement),
        "sep": (1.0 - separation(g), 0.0),
    }


def exact(similarity: np.ndarray, cut: float, domains: list[str], first: list[int]) -> bool:
    """Is the partition exact when the clients `first` are clustered and the others then join one by
    one, as newcomers do (`clustering.join_similarity`)? `first` = everyone: the plain clustering."""
    order = first + [i for i in range(len(domains)) if i not in first]
    s = similarity[np.ix_(order, order)]
    labels = cluster_similarity(s[: len(first), : len(first)], cut)
    joined = [k for k, _ in join_similarity(s, labels, cut, int(labels.max()) + 1)]
    return clustering_ari([domains[i] for i in order], [*labels, *joined]) > 1 - 1e-9


def rows(g: np.ndarray, domains: list[str], fed: FederationConfig) -> list[tuple]:
    """(rule, ARI, K, last within, first across, lone, partial) of the three rules on the Gram `g`:
    lone = of the n federations without one client (its style partner left alone), how many are
    exact; partial = of the C(n, n/2) halves clustered first with the others joining, how many."""
    n = len(domains)
    out = []
    for name, (similarity, cut) in similarities(g, fed).items():
        labels = cluster_similarity(similarity, cut)
        lone = 0
        for left_out in range(n):
            keep = [i for i in range(n) if i != left_out]
            sub = similarities(g[np.ix_(keep + [n + i for i in keep], keep + [n + i for i in keep])], fed)[name][0]
            lone += exact(sub, cut, [domains[i] for i in keep], list(range(n - 1)))
        halves = [list(c) for c in combinations(range(n), n // 2)]
        partial = sum(exact(similarity, cut, domains, half) for half in halves)
        ari = clustering_ari(domains, list(labels))
        out.append((name, ari, len(set(labels)), *merge_margin(similarity, domains), f"{lone}/{n}", f"{partial}/{len(halves)}"))
    return out


def replay(cfg: Config, n: int) -> tuple[np.ndarray, list[str]]:
    """Per-layer Gram matrices (layers, 2n, 2n) of round 1's profiling passes and repeats of `n`
    clients, and their domains."""
    fed = cfg.federation
    firsts, repeats, domains = [], [], []
    for cid in range(n):
        client = build_client(cfg, cid, n)
        generator = torch.Generator().manual_seed(derived_seed(fed.seed, 1, cid))
        upload = client.train_round(
            None, None, 0, generator, profile_steps=fed.profile_steps, profile_bias=cfg.client.timestep_bias
        )
        firsts.append(agg.change(upload.profile, None))
        repeats.append(agg.change(upload.profile_repeat, None))
        domains.append(client.domain)
    return agg.layer_grams(firsts + repeats).numpy(), domains


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--styles", default="default", help="data.styles of the generated set (default: default)")
    ap.add_argument("--seeds", default=None, help="federation seeds, comma-separated (default: 0,1,2,3,4; with --load all saved)")
    ap.add_argument("--clients", type=int, default=None, help="clients (default: the preset's 8; 7 leaves one style one client)")
    ap.add_argument("--save", type=Path, default=None, help="write each seed's Gram matrix to DIR/<styles>_seed<N>.npz")
    ap.add_argument("--load", type=Path, default=None, help="evaluate the Gram matrices saved in DIR instead of training")
    ap.add_argument("--centred", action="store_true", help="remove the mean pass from every pass first (diagnostic)")
    ap.add_argument("--candidates", action="store_true", help="also the ARI and K of `noise_twin_candidates`")
    args = ap.parse_args(argv)
    base = preset("demo")
    base.data.styles = args.styles
    fed = base.federation
    if args.load is not None:
        files = {int(f.stem.rsplit("seed", 1)[1]): f for f in args.load.glob(f"{args.styles}_seed*.npz")}
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else sorted(files)
        if not seeds or any(s not in files for s in seeds):
            ap.error(f"--load: no {args.styles}_seed<N>.npz in {args.load} for seeds {args.seeds or 'any'}")
        print(f"{args.styles} styles, Gram matrices from {args.load}{' centred' if args.centred else ''}")
    else:
        seeds = [int(s) for s in (args.seeds or "0,1,2,3,4").split(",")]
        n = args.clients or fed.num_clients
        print(
            f"{args.styles} styles, {n} clients, profiling pass {fed.profile_steps} steps at timestep bias "
            f"{base.client.timestep_bias} and its repeat"
        )
    print(
        f"raw: first passes at merge_similarity {fed.merge_similarity}; rho: both at merge_agreement {fed.merge_agreement}; "
        "sep: 1 - separation of both at 0 (separation below the noise; a candidate, not the server's rule)"
    )
    print(
        f"{'seed':>4s} {'rule':>4s} {'ARI':>5s} {'K':>2s} {'last within':>11s} {'first across':>12s} {'seconds':>7s} "
        f"{'lone':>5s} {'partial':>7s}"
    )
    for seed in seeds:
        if args.load is not None:
            saved = np.load(files[seed])
            g, domains, seconds = saved["gram"], [str(d) for d in saved["domains"]], float(saved["seconds"])
        else:
            t0 = time.perf_counter()
            seed_cfg = dataclasses.replace(base, federation=dataclasses.replace(fed, seed=seed, num_clients=n))
            per_layer, domains = replay(seed_cfg, n)
            g, seconds = per_layer.sum(0), time.perf_counter() - t0
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                saved = {"gram": g, "layer_grams": per_layer, "domains": np.array(domains), "n": n, "seconds": seconds}
                np.savez(args.save / f"{args.styles}_seed{seed}.npz", **saved)
        for name, ari, k, within, across, lone, partial in rows(centre(g) if args.centred else g, domains, fed):
            print(
                f"{seed:4d} {name:>4s} {ari:5.2f} {k:2d} {within:11.3f} {across:12.3f} {seconds:7.0f} {lone:>5s} {partial:>7s}",
                flush=True,
            )
        if args.candidates:
            for name, labels in noise_twin_candidates(g).items():
                print(f"{seed:4d} {name}: ARI {clustering_ari(domains, list(labels)):.2f}, K {len(set(labels))}")


if __name__ == "__main__":
    main()
