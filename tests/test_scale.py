"""Server aggregation at scale: clustering large federations on a subsample, the streaming
average, and a smoke run of benchmarks/server_scale.py."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedaigc.eval.metrics import clustering_ari
from fedaigc.server import aggregation as agg
from fedaigc.server import clustering
from fedaigc.server.clustering import MAX_EXACT, cluster

ROOT = Path(__file__).resolve().parents[1]


def test_large_federations_cluster_a_subsample_and_recover_planted_clusters(monkeypatch):
    rng = np.random.default_rng(0)
    shares = [0.35, 0.25, 0.2, 0.15, 0.05]  # one small cluster: ~25 clients in the subsample
    truth = rng.choice(5, size=2000, p=shares)
    x = 3 * rng.normal(size=32) + rng.normal(size=(5, 32))[truth] + 0.5 * rng.normal(size=(2000, 32))
    fitted = []
    original = clustering.AgglomerativeClustering

    class Recording(original):
        def fit_predict(self, X, y=None):
            fitted.append(len(X))
            return super().fit_predict(X, y)

    monkeypatch.setattr(clustering, "AgglomerativeClustering", Recording)
    labels = cluster(x)
    assert fitted and max(fitted) == MAX_EXACT < len(x)  # the O(n^2) tree never sees all clients
    assert clustering_ari(truth, labels) >= 0.95
    assert sorted(set(labels.tolist())) == list(range(5))
    assert np.array_equal(labels, cluster(x))  # seeded subsample: the same labels every call
    assert clustering_ari(truth, cluster(x, k=5)) >= 0.95
    assert list(cluster(x, k=1)) == [0] * len(x)


def test_running_average_streams_what_average_computes():
    g = torch.Generator().manual_seed(0)
    shapes = {
        "a.lora_A.weight": (4, 10),
        "a.lora_B.weight": (12, 4),
        "c.lora_A.weight": (4, 3, 3, 3),
        "c.lora_B.weight": (6, 4, 1, 1),
    }
    adapters = [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(7)]
    weights = (torch.rand(7, generator=g) + 0.1).tolist()

    def uploads():  # one at a time, as they arrive
        yield from zip(adapters, weights, strict=True)

    mean = agg.RunningAverage()
    for adapter, w in uploads():
        mean.add(adapter, w)
    streamed, batch = mean.result(), agg.average(adapters, weights)
    for k, shape in shapes.items():
        want = sum(w * a[k] for a, w in zip(adapters, weights, strict=True)) / sum(weights)
        assert streamed[k].shape == shape and streamed[k].dtype == torch.float64
        assert torch.allclose(streamed[k], want, atol=1e-10, rtol=0)
        assert torch.allclose(streamed[k], batch[k], atol=1e-10, rtol=0)
    half = agg.RunningAverage()
    for adapter in adapters[:2]:
        half.add({k: v.float() for k, v in adapter.items()}, 1.0)
    assert all(v.dtype == torch.float32 for v in half.result().values())  # the uploads' dtype comes back
    b = "a.lora_B.weight"
    assert torch.allclose(half.result()[b].double(), (adapters[0][b] + adapters[1][b]) / 2)
    with pytest.raises(ValueError):
        agg.RunningAverage().result()


def test_benchmark_quick_mode_prints_finite_figures():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "server_scale.py"), "--quick", "--shapes", "demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    figures = dict(re.findall(r"^(server_scale_\w+): ([-+\d.einf]+)", run.stdout, re.M))
    for n in (100, 600):
        assert {f"server_scale_ratio_vs_fedavg_n{n}_demo", f"server_scale_peak_mem_n{n}_demo"} <= set(figures)
        assert float(figures[f"server_scale_clustering_ari_n{n}_demo"]) >= 0.95
    assert "server_scale_loglog_slope_demo" in figures
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in figures.values())
