"""Server aggregation at scale: clustering + streaming intra-cluster aggregation + stacking, against
FedAvg (a streaming average) on the same synthetic uploads, for 100 to 10 000 clients.

Uploads have the shapes of two real LoRAs: the demo preset's (rank 4 on the embedded UNet and
text encoder, 107 776 parameters) and a rank-8 LoRA on the attention projections of
Stable Diffusion 1.5's UNet (1 594 368 parameters, 6.1 MiB in float32; shapes only, no weights).
Each client's tensors are a window at a seeded offset into one fixed bank of Gaussian numbers:
every upload differs, nothing is precomputed per client, and making one costs no arithmetic, so
the timed part is the server's work alone (only the calls that consume an upload are timed).
Task embeddings are 384-d with planted clusters around a common component (what every client's
token slot shares). Uploads are consumed one at a time and dropped (`RunningAverage`): 10 000
SD-shaped uploads would be 59 GiB at once.

Times are CPU seconds of the one thread doing the work (time.process_time), not wall time: the
2-core machine is shared, and a busy neighbour stretches wall time but not the work. Peak
memory: every (shapes, clients, method) runs in its own process, forked from a clean forkserver
(imports only, so it inherits no free heap from the parent's model loading), which resets its
kernel high-water mark (/proc/self/clear_refs, Linux) once its inputs exist and the free heap
they left is given back (glibc's malloc_trim), so reusing it cannot hide anything; the figure is
that process's peak resident memory above where it started (VmHWM - VmRSS), less the library
code it pages in meanwhile (growth of RssFile, about 10 MiB: shared and already in the page
cache), so it counts torch's allocations, which tracemalloc does not see.

Each process first aggregates a small federation of the same shapes untimed: a server does this
every round, so one-off first-call costs (lazy library set-up) are not part of the per-round
figure.

Not counted: receiving and deserialising uploads (the same for both methods), and the
fedit-vs-exact error diagnostic the `cluster` strategy also reports (it needs every member's
factors at once, so it does not stream).

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/server_scale.py [--sizes 100 1000 10000] [--shapes demo sd15]
    python benchmarks/server_scale.py --quick        # under a minute: 100 and 600 clients, no plot
"""

from __future__ import annotations

import argparse
import ctypes
import math
import multiprocessing
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from fedaigc.client.adapter import attach_lora, expected_shapes  # noqa: E402
from fedaigc.config import FederationConfig, preset  # noqa: E402
from fedaigc.eval.metrics import clustering_ari  # noqa: E402
from fedaigc.eval.report import markdown_table  # noqa: E402
from fedaigc.model.base import load_model  # noqa: E402
from fedaigc.protocol.lora import Adapter, LoraSpec
from fedaigc.server import aggregation as agg  # noqa: E402
from fedaigc.server.clustering import MAX_EXACT, centroids, cluster  # noqa: E402

EMBEDDING_DIM = 384
BANK_SLACK = 1 << 20  # window offsets: 1 M distinct starting points in the bank
TARGET_RATIO = 3.0
SD_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")  # the LoRA targets


def demo_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the demo preset's client LoRA on the embedded model (UNet + text encoder)."""
    c = preset("demo").client
    return expected_shapes(attach_lora(load_model(), LoraSpec(c.rank, c.alpha, c.text_encoder_lora, c.convs)))


def sd15_shapes(rank: int = 8) -> dict[str, tuple[int, ...]]:
    """A rank-`rank` LoRA on to_q/to_k/to_v/to_out.0 of attn1 and attn2 of SD-1.5's UNet, read off
    diffusers' own `UNet2DConditionModel` (SD-1.5's config) built on the meta device: no weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    out: dict[str, tuple[int, ...]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and SD_ATTENTION.search(name):
            layer = f"unet.{name}"
            out[layer + agg.A_SUFFIX], out[layer + agg.B_SUFFIX] = (rank, module.in_features), (module.out_features, rank)
    return out


@dataclass
class Federation:
    """n synthetic clients: task embeddings with planted clusters, example counts, and uploads
    that are made one at a time, on demand."""

    shapes: dict[str, tuple[int, ...]]
    embeddings: np.ndarray
    truth: np.ndarray
    num_examples: np.ndarray
    offsets: np.ndarray
    bank: torch.Tensor

    def uploads(self) -> Iterator[Adapter]:
        sizes = [math.prod(s) for s in self.shapes.values()]
        for o in self.offsets:
            parts = self.bank[o : o + sum(sizes)].split(sizes)
            yield {k: t.view(s) for (k, s), t in zip(self.shapes.items(), parts, strict=True)}


def synthetic(shapes: dict[str, tuple[int, ...]], n: int, clusters: int, seed: int = 0) -> Federation:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, EMBEDDING_DIM))
    truth = rng.integers(0, clusters, n)
    common = 5 * rng.normal(size=EMBEDDING_DIM)
    embeddings = common + centers[truth] + 0.3 * rng.normal(size=(n, EMBEDDING_DIM))
    params = sum(math.prod(s) for s in shapes.values())
    bank = 0.01 * torch.randn(params + BANK_SLACK, generator=torch.Generator().manual_seed(seed))
    return Federation(shapes, embeddings, truth, rng.integers(50, 500, n), rng.integers(0, BANK_SLACK, n), bank)


def timed(uploads: Iterable[Adapter], consume: Callable[[int, Adapter], None]) -> float:
    """CPU seconds spent in `consume(i, upload)` over all uploads; making them is not counted."""
    spent = 0.0
    for i, upload in enumerate(uploads):
        t = time.process_time()
        consume(i, upload)
        spent += time.process_time() - t
    return spent


def cluster_aware(fed: Federation, fc: FederationConfig, scale: float = 1.0) -> dict[str, float]:
    """What `ClusterAware` (server/strategies.py) does with `fedit`, with streaming sums:
    cluster, weight members by examples x similarity, average per cluster, stack with DED/SNT."""
    t0 = time.process_time()
    labels = cluster(fed.embeddings, k=fc.k or None)
    counts = fed.num_examples.astype(float)
    cents = centroids(fed.embeddings, labels, counts)
    weights = np.zeros(len(labels))
    for k, c in cents.items():
        idx = np.flatnonzero(labels == k)
        weights[idx] = agg.member_weights(counts[idx].tolist(), torch.from_numpy(fed.embeddings[idx]), torch.from_numpy(c))
    t1 = time.process_time()
    means = {k: agg.RunningAverage() for k in cents}
    intra = timed(fed.uploads(), lambda i, up: means[labels[i]].add(up, weights[i]))
    t2 = time.process_time()
    adapters = {k: means.pop(k).result() for k in sorted(means)}  # each sum freed once read
    t3 = time.process_time()
    ks = sorted(adapters)
    shares = {k: float(np.mean(labels == k)) for k in ks}
    d = agg.ded({k: torch.from_numpy(cents[k]) for k in ks}, shares) if fc.use_ded else None
    s = agg.snt(adapters, dict.fromkeys(ks, scale)) if fc.use_snt else None
    coeffs = agg.stacking_coefficients(shares, d, s, fc.tau)
    agg.stack([adapters[k] for k in ks], [scale] * len(ks), [coeffs[k] for k in ks], fc.max_rank or None)
    t4 = time.process_time()
    return {
        "clustering": t1 - t0,
        "intra": intra + t3 - t2,
        "stacking": t4 - t3,
        "clusters": len(ks),
        "ari": clustering_ari(fed.truth, labels),
    }


def fedavg(fed: Federation) -> dict[str, float]:
    """FedAvg on the same uploads: one streaming average, weights = example counts."""
    mean = agg.RunningAverage()
    seconds = timed(fed.uploads(), lambda i, up: mean.add(up, float(fed.num_examples[i])))
    t = time.process_time()
    mean.result()
    return {"fedavg": seconds + time.process_time() - t}


def _kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _job(method: str, shapes: dict[str, tuple[int, ...]], n: int, clusters: int) -> dict[str, float]:
    """One measurement, in a fresh forked process: times, and peak memory above the start."""
    torch.set_num_threads(1)
    threadpool_limits(1)  # numpy/scipy/sklearn's BLAS too: process_time counts every thread's spinning
    run = (lambda f: cluster_aware(f, FederationConfig())) if method == "cluster" else fedavg
    run(synthetic(shapes, 3 * clusters, clusters, seed=1))  # warm-up: a server aggregates every round, so
    # the first call's one-off costs (lazy library initialisation, code paged in) are not the per-round cost
    fed = synthetic(shapes, n, clusters)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return the free heap making the inputs left, or reusing it would not show
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
    start, code = _kb("VmRSS"), _kb("RssFile")
    out = run(fed)
    # library code a forked child pages in on first use is resident but not allocated: not counted
    return out | {"peak_mib": (_kb("VmHWM") - start - (_kb("RssFile") - code)) / 1024}


def measure(method: str, shapes: dict[str, tuple[int, ...]], n: int, clusters: int) -> dict[str, float]:
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        return pool.apply(_job, (method, shapes, n, clusters))


def loglog_slope(ns: list[int], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(seconds), 1)[0])


def plot(results: dict[str, dict[int, dict[str, float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for (name, rows), color in zip(results.items(), ("tab:blue", "tab:orange"), strict=False):
        ns = sorted(rows)
        ours = [rows[n]["total"] for n in ns]
        ax.plot(ns, ours, "o-", color=color, label=f"cluster-aware, {name}")
        ax.plot(ns, [rows[n]["fedavg"] for n in ns], "s:", color=color, label=f"FedAvg, {name}")
        ref = [ours[0] * n * math.log(n) / (ns[0] * math.log(ns[0])) for n in ns]
        ax.plot(ns, ref, "--", color=color, alpha=0.45, label=f"n log n through the first {name} point")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients per round")
    ax.set_ylabel("server CPU seconds per round (one thread)")
    ax.set_title("Server aggregation cost vs clients (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="clients per round")
    ap.add_argument("--shapes", nargs="+", choices=["demo", "sd15"], default=["demo", "sd15"])
    ap.add_argument("--clusters", type=int, default=8, help="planted clusters (the silhouette looks at 2..8)")
    ap.add_argument("--plot", type=Path, help="log-log plot (default: docs/img/server_scale.png; none with --quick)")
    ap.add_argument("--quick", action="store_true", help="100 and 600 clients: a smoke test in seconds")
    args = ap.parse_args()
    sizes = [100, 600] if args.quick else sorted(args.sizes)
    plot_path = args.plot or (None if args.quick else Path("docs/img/server_scale.png"))
    torch.set_num_threads(1)
    all_shapes = {"demo": demo_shapes, "sd15": sd15_shapes}
    results: dict[str, dict[int, dict[str, float]]] = {}
    rows = []
    for name in args.shapes:
        shapes = all_shapes[name]()
        params = sum(math.prod(s) for s in shapes.values())
        print(
            f"shapes {name}: {len(shapes)} tensors, {params:,} parameters per client ({params * 4 / 2**20:.2f} MiB float32)",
            flush=True,
        )
        results[name] = {}
        for n in sizes:
            t = time.perf_counter()
            ours, base = measure("cluster", shapes, n, args.clusters), measure("fedavg", shapes, n, args.clusters)
            r = ours | {"total": ours["clustering"] + ours["intra"] + ours["stacking"], "fedavg": base["fedavg"]}
            r |= {"fedavg_peak_mib": base["peak_mib"], "all_mib": n * params * 4 / 2**20}
            results[name][n] = r
            rows.append(
                [name, n, "subsample" if n > MAX_EXACT else "exact", r["clustering"], r["intra"], r["stacking"], r["total"],
                 r["fedavg"], f"{r['total'] / r['fedavg']:.2f}x", f"{r['peak_mib']:.0f} / {r['fedavg_peak_mib']:.0f}",
                 f"{r['all_mib']:.0f}", int(r["clusters"]), f"{r['ari']:.3f}"]
            )  # fmt: skip
            print(f"  n={n}: done in {time.perf_counter() - t:.1f} s wall", flush=True)
    header = ["shapes", "clients", "clustering", "clustering s", "intra-cluster s", "stacking s", "cluster-aware s", "FedAvg s",
              "ratio", "peak MiB ours / FedAvg", "all uploads MiB", "K found", "ARI"]  # fmt: skip
    print(markdown_table(header, rows))
    span = f"{sizes[0]}-{sizes[-1]}"
    nlogn = loglog_slope(sizes, [n * math.log(n) for n in sizes])
    for name, by_n in results.items():
        for n, r in by_n.items():
            print(f"server_scale_ratio_vs_fedavg_n{n}_{name}: {r['total'] / r['fedavg']:.2f}x (<= {TARGET_RATIO:g}x)")
            all_mib = f"all {n} uploads at once: {r['all_mib']:.0f} MiB"
            print(f"server_scale_peak_mem_n{n}_{name}: {r['peak_mib']:.0f} MiB (streaming; {all_mib})")
            print(f"server_scale_clustering_ari_n{n}_{name}: {r['ari']:.3f} (planted {args.clusters} clusters)")
        ns = sorted(by_n)
        if len(ns) > 1:
            slope = loglog_slope(ns, [by_n[n]["total"] for n in ns])
            print(f"server_scale_loglog_slope_{name}: {slope:.2f} (<= {nlogn:.2f}, the slope of n log n over {span} clients)")
            fed_slope = loglog_slope(ns, [by_n[n]["fedavg"] for n in ns])
            print(f"server_scale_loglog_slope_fedavg_{name}: {fed_slope:.2f} (FedAvg, for reference)")
    if plot_path:
        print(f"plot: {plot(results, plot_path)}")


if __name__ == "__main__":
    main()
