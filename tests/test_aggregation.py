"""Property tests of the aggregation math on small random LoRAs (no Flower, no model)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedaigc.eval.metrics import clustering_ari
from fedaigc.protocol.lora import flatten
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster, match_ids

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHAPES = {"x.attn.to_q": (12, 10), "x.attn.to_out.0": (10, 12), "y.conv1": (6, 4, 3, 3)}


def random_lora(rank=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        out_dim, in_dim, *k = shape
        out[name + ".lora_A.weight"] = torch.randn(rank, in_dim, *k, generator=g)
        out[name + ".lora_B.weight"] = torch.randn(out_dim, rank, *([1] * len(k)), generator=g) * scale
    return out


def full(adapter, scale, layer):
    return agg.delta(adapter, scale, layer)


def test_stacking_is_exact():
    ads = [random_lora(seed=s) for s in range(3)]
    scales, coeffs = [0.5, 1.0, 2.0], [0.2, {lay: 0.3 + i for i, lay in enumerate(agg.layers(ads[0]))}, 0.7]
    g = agg.stack(ads, scales, coeffs)
    for layer in agg.layers(ads[0]):
        terms = zip(ads, scales, coeffs, strict=True)
        want = sum((c[layer] if isinstance(c, dict) else c) * full(a, s, layer) for a, s, c in terms)
        assert torch.allclose(full(g, 1.0, layer), want, atol=1e-5, rtol=1e-5)
        assert g[layer + agg.A_SUFFIX].shape[0] == 9  # rank = Σ r_k
    assert g["y.conv1.lora_A.weight"].shape == (9, 4, 3, 3) and g["y.conv1.lora_B.weight"].shape == (6, 9, 1, 1)


def test_stack_truncation_keeps_the_best_low_rank_approximation():
    ads = [random_lora(seed=s) for s in range(3)]
    g = agg.stack(ads, [1, 1, 1], [1, 1, 1], max_rank=4)
    layer = "x.attn.to_q"
    target = sum(full(a, 1, layer) for a in ads)
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert g[layer + agg.A_SUFFIX].shape[0] == 4
    assert torch.allclose(full(g, 1, layer), best, atol=1e-5)


def test_exact_average_is_exact_when_the_rank_allows_and_fedit_error_is_reported():
    ads = [random_lora(rank=2, seed=s) for s in range(2)]
    w = [3, 1]
    ex = agg.exact_average(ads, w, rank=4)
    for layer in agg.layers(ads[0]):
        want = 0.75 * full(ads[0], 1, layer) + 0.25 * full(ads[1], 1, layer)
        assert torch.allclose(full(ex, 1, layer), want, atol=1e-5)
    assert agg.fedit_error(ads, w) > 0.1  # averaging A and B separately is not averaging B·A
    same = [ads[0], ads[0]]
    assert agg.fedit_error(same, w) < 1e-9
    assert all(torch.allclose(agg.average(same, w)[k], ads[0][k]) for k in ads[0])


def test_nuclear_norm_from_the_core_matches_the_full_svd():
    ad = random_lora(seed=4)
    for layer in agg.layers(ad):
        b, a = agg.factors(ad, layer)
        assert abs(agg.nuclear_norm(b, a) - torch.linalg.svdvals(b @ a).sum().item()) < 1e-6
    pairs = [agg.factors(random_lora(seed=s), agg.layers(ad)[0]) for s in range(5)]
    batched = agg.nuclear_norms(pairs)  # one batched call for the clusters of a layer
    assert batched == pytest.approx([torch.linalg.svdvals(b @ a).sum().item() for b, a in pairs], rel=1e-9)
    mixed = [pairs[0], agg.factors(ad, agg.layers(ad)[-1])]  # shapes differ: one by one
    assert agg.nuclear_norms(mixed) == pytest.approx([agg.nuclear_norm(b, a) for b, a in mixed], rel=1e-12)


def test_snt_and_ded_and_coefficients():
    small, big = random_lora(seed=1, scale=0.1), random_lora(seed=1, scale=1.0)
    s = agg.snt({0: small, 1: big}, {0: 1.0, 1: 1.0})
    for layer in agg.layers(small):
        assert s[0][layer] == pytest.approx(2 * 0.1 / 1.1) and s[1][layer] == pytest.approx(2 * 1.0 / 1.1)
    e = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0]), 2: torch.tensor([1.0, 0.1])}
    d = agg.ded(e, {0: 0.5, 1: 0.1, 2: 0.4})
    assert d[1] > d[0] and d[1] > d[2] and min(d.values()) >= 0
    c = agg.stacking_coefficients({0: 0.5, 1: 0.5}, None, s)
    # dividing by SNT gives each cluster the same energy whatever its raw magnitude
    layer = agg.layers(small)[0]
    e0 = c[0][layer] * agg.nuclear_norm(*agg.factors(small, layer))
    e1 = c[1][layer] * agg.nuclear_norm(*agg.factors(big, layer))
    assert e0 == pytest.approx(e1)
    p = agg.stacking_coefficients({0: 0.5, 1: 0.5}, {0: 0.0, 1: 0.5}, None, tau=0.1)
    assert p[0] > 0.99 and abs(sum(p.values()) - 1) < 1e-9


def test_geometric_median_resists_one_huge_outlier():
    ads = [random_lora(seed=0, scale=1.0) for _ in range(4)]
    ads = [{k: v + 0.01 * torch.randn_like(v) for k, v in a.items()} for a in ads]
    attacker = {k: v * 1000 for k, v in ads[0].items()}
    med = agg.geomed(ads + [attacker], [1] * 5)
    mean = agg.average(ads + [attacker], [1] * 5)
    honest = agg.average(ads, [1] * 4)
    dist = lambda x: torch.linalg.vector_norm(flatten(x) - flatten(honest)).item()  # noqa: E731
    assert dist(med) < 0.05 * dist(mean)
    assert dist(med) < 1.0


def test_screen_rejects_nan_wrong_shape_and_huge_norm():
    ref = random_lora(seed=0)
    ok = {f"c{i}": {k: v + 0.01 * torch.randn_like(v) for k, v in ref.items()} for i in range(4)}
    nan = {k: v.clone() for k, v in ref.items()}
    nan["x.attn.to_q.lora_A.weight"][0, 0] = float("nan")
    shape = dict(ref)
    shape["x.attn.to_q.lora_A.weight"] = torch.zeros(2, 2)
    huge = {k: v + 5.0 * torch.ones_like(v) for k, v in ref.items()}
    accepted, rejected = agg.screen({**ok, "nan": nan, "shape": shape, "huge": huge, "missing": {}}, ref)
    assert sorted(accepted) == sorted(ok)
    assert "NaN" in rejected["nan"] and "wrong shape" in rejected["shape"] and "median" in rejected["huge"]
    assert "names" in rejected["missing"]


def test_member_weights_follow_examples_and_similarity():
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    w = agg.member_weights([10, 10, 10], emb, torch.tensor([1.0, 0.0]))
    assert w[0] > w[1] > w[2] == 0


def test_clustering_recovers_planted_clusters_and_ids_stay_stable():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32))
    truth = np.repeat(np.arange(4), 5)
    x = centers[truth] + 0.1 * rng.normal(size=(20, 32))
    labels = cluster(x)
    assert clustering_ari(truth, labels) == 1.0
    assert clustering_ari(truth, cluster(x, k=4)) == 1.0
    assert clustering_ari(truth, cluster(x, distance_threshold=0.5)) == 1.0
    perm = np.array([2, 0, 3, 1])[labels]  # same clusters, shuffled labels, as a next re-clustering gives
    mapping, parents = match_ids(dict(enumerate(labels.tolist())), dict(enumerate(perm.tolist())))
    assert all(mapping[perm[i]] == labels[i] for i in range(len(x))) and parents == {}
    one = cluster(rng.normal(size=(1, 8)))
    assert list(one) == [0]


def test_cluster_ids_follow_the_members_not_the_centroids():
    """Before: art + photo merged in cluster 0, cartoon in 1. After: art, photo, cartoon apart, and a
    newcomer alone. Cartoon keeps id 1 and art id 0; photo splits off with a fresh id whose parent
    is 0 (it starts from the merged adapter); the newcomer's cluster has no parent."""
    before = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1}
    after = {0: 5, 1: 5, 2: 7, 3: 6, 4: 6, 5: 8}
    mapping, parents = match_ids(before, after)
    assert mapping[5] == 0 and mapping[6] == 1 and {mapping[7], mapping[8]} == {2, 3}
    assert parents == {mapping[7]: 0}
    assert match_ids({}, {0: 1, 1: 0}) == ({0: 0, 1: 1}, {})  # the first clustering: fresh ids
    mapping, parents = match_ids({0: 3, 1: 3}, {0: 0, 1: 0})
    assert mapping == {0: 3} and parents == {}  # a cluster's members, under another label: same id


def test_centering_removes_what_all_clients_share():
    """Clients start from one shared token slot: the clustering must see their differences."""
    rng = np.random.default_rng(1)
    common = 50 * rng.normal(size=32)
    centers = rng.normal(size=(4, 32))
    truth = np.repeat(np.arange(4), 2)
    x = common + centers[truth] + 0.05 * rng.normal(size=(8, 32))
    assert clustering_ari(truth, cluster(x)) == 1.0
    assert clustering_ari(truth, cluster(x + 1e3 * common)) == 1.0


def test_the_gram_of_low_rank_changes_is_that_of_the_full_matrices():
    after = [random_lora(rank=3, seed=s) for s in range(3)]
    start = random_lora(rank=2, seed=9)
    starts = [None, start, None]
    changes = [agg.change(a, s, prefix="x.") for a, s in zip(after, starts, strict=True)]
    assert set(agg.layers(changes[0])) == {"x.attn.to_q", "x.attn.to_out.0"}  # only the layers asked for
    full_changes = [
        {layer: full(after[i], 1.0, layer) - (full(start, 1.0, layer) if i == 1 else 0) for layer in agg.layers(changes[0])}
        for i in range(3)
    ]
    for layer, want in full_changes[1].items():  # from a start: B A − B0 A0, at rank 3 + 2
        assert torch.allclose(full(changes[1], 1.0, layer), want, atol=1e-5)
    want = torch.tensor([[sum(float((x[k] * y[k]).sum()) for k in x) for y in full_changes] for x in full_changes])
    g = agg.gram(changes)
    assert torch.allclose(g, want.double(), rtol=1e-5)
    points = agg.gram_points(g)
    assert torch.allclose(points @ points.T, g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))
    with pytest.raises(ValueError, match="no LoRA layer"):
        agg.change(after[0], None, prefix="unet.")


def test_the_server_math_imports_without_a_model_stack():
    """Aggregation, clustering and defense are pure functions of tensors: they import with diffusers,
    peft, transformers and flwr absent (a server-side or test user needs none of them)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'diffusers', 'peft', 'transformers', 'flwr'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fedaigc.server.aggregation, fedaigc.server.clustering, fedaigc.server.defense, fedaigc.protocol.lora\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr
    leaked = subprocess.run(
        [sys.executable, "-c", code.replace("fedaigc.server.aggregation", "fedaigc.client.train")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert "blocked" in leaked.stderr  # the check bites: the client's training needs the model stack
