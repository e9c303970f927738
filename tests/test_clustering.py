"""The clustering by updates calibrated on each client's own noise: `reference_similarity` on a
Gram matrix of two profiling passes per client, as a pure function (planted styles with a
singleton, a one-style null, noise levels a raw-cosine threshold cannot follow) and inside the
`ClusterAware` (profiles and repeats from the uploads, newcomers, restart)."""

import copy

import numpy as np
import torch

from fedaigc.config import preset
from fedaigc.eval.metrics import clustering_ari
from fedaigc.protocol.round import Upload
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster_similarity, normalize, reference_similarity
from fedaigc.server.strategies import ClusterAware

STYLES = [0, 0, 0, 1, 1, 2, 2, 3]  # style 3 has one client


def passes(styles: list[int], noise: float, shared: float = 0.5, seed: int = 0, dim: int = 2000) -> np.ndarray:
    """Two noisy passes per client of signal = a component every client shares + its style's
    direction + a little of its own; returns the Gram matrix of [first passes; second passes]."""
    rng = np.random.default_rng(seed)
    common, style = rng.normal(size=dim), rng.normal(size=(max(styles) + 1, dim))
    signal = np.stack([shared * common + style[s] + 0.3 * rng.normal(size=dim) for s in styles])
    x = np.concatenate([signal + noise * rng.normal(size=signal.shape) for _ in range(2)])
    return x @ x.T


def raw_cosines(gram: np.ndarray) -> np.ndarray:
    n = len(gram) // 2
    d = np.sqrt(np.diag(gram)[:n])
    return gram[:n, :n] / np.outer(d, d)


def test_the_noise_corrected_cosine_finds_the_styles_at_noise_levels_no_one_raw_threshold_fits():
    same = np.equal.outer(STYLES, STYLES) & ~np.eye(len(STYLES), dtype=bool)
    across = ~np.equal.outer(STYLES, STYLES)
    raw = {}
    for noise in (0.5, 1.5, 3.0):  # raw cosines between clients of one style fall from about 0.8 to 0.1
        gram = passes(STYLES, noise)
        labels = cluster_similarity(reference_similarity(gram), 0.5)
        assert clustering_ari(STYLES, list(labels)) == 1.0 and sum(labels == labels[-1]) == 1  # the singleton style alone
        raw[noise] = raw_cosines(gram)
    assert raw[3.0][same].min() < raw[0.5][across].max()  # a raw threshold that fits one noise level fails the other


def test_one_style_is_one_cluster_and_a_client_without_a_reproducible_direction_is_alone():
    rho = reference_similarity(passes([0] * 6, noise=3.0))
    assert len(set(cluster_similarity(rho, 0.5))) == 1
    gram = passes([0] * 4, noise=1.0)
    gram[3, 7] = gram[7, 3] = -1.0  # client 3's two passes disagree
    rho = reference_similarity(gram)
    assert (rho[3, :3] == -1).all() and rho[3, 3] == 1.0 and np.abs(rho).max() <= 1.0
    labels = cluster_similarity(rho, 0.5)
    assert len(set(labels[:3])) == 1 and labels[3] != labels[0]
    assert len(set(cluster_similarity(rho, 0.5, k=2))) == 2


SHAPES = {"unet.attn.to_q": (48, 40), "unet.attn.to_k": (40, 40)}


def profile(style: int, seed: int, noise: float) -> dict[str, torch.Tensor]:
    """A UNet LoRA whose B A is its style's plus noise (in A only: noise in both factors would make
    the passes' noise products share a factor)."""
    g, n = torch.Generator().manual_seed(style), torch.Generator().manual_seed(seed)
    out = {}
    for name, (out_dim, in_dim) in SHAPES.items():
        out[name + agg.A_SUFFIX] = torch.randn(2, in_dim, generator=g) + noise * torch.randn(2, in_dim, generator=n)
        out[name + agg.B_SUFFIX] = torch.randn(out_dim, 2, generator=g)
    return out


def style_upload(cid: int, style: int, noise: float) -> Upload:
    first, repeat = profile(style, 2 * cid, noise), profile(style, 2 * cid + 1, noise)
    return Upload(profile(style, 999, 0.0), torch.ones(4), 10, torch.ones(4), 0.1, first, repeat)


def test_the_server_clusters_by_its_clients_own_reference_newcomers_join_by_it_and_it_survives_a_restart():
    cfg = copy.deepcopy(preset("tiny").federation)
    cfg.strategy, cfg.k, cfg.recluster_every = "cluster", 0, 5
    assert cfg.profile_steps > 0 and cfg.cluster_by == "update"
    server = ClusterAware(cfg, 1.0)
    styles = dict(enumerate(STYLES))
    noise = 2.0  # some raw cosines within a style below `merge_similarity`, which would split their style
    first = {c: style_upload(c, s, noise) for c, s in styles.items()}
    raw = normalize(agg.gram_points(agg.gram([agg.change(u.profile, None) for u in first.values()])).numpy())
    assert (raw @ raw.T)[np.equal.outer(STYLES, STYLES)].min() < cfg.merge_similarity
    report = server.aggregate(1, first)
    assert report.rejected == {} and clustering_ari(STYLES, [server.assignment[c] for c in styles]) == 1.0
    # round 2, a few clients only: a newcomer of style 1 joins its cluster, one of a new style gets its own
    report = server.aggregate(2, {8: style_upload(8, 1, noise), 9: style_upload(9, 7, noise), 0: style_upload(0, 0, noise)})
    assert server.assignment[8] == server.assignment[3] and report.placed[8] >= cfg.merge_agreement > report.placed[9]
    assert server.assignment[9] not in {server.assignment[c] for c in styles}
    restarted = ClusterAware(cfg, 1.0)
    restarted.restore(*server.state())
    known = sorted(server.assignment)
    assert np.allclose(restarted._similarity(known), server._similarity(known))
    # an upload without the repeat the server asked for is rejected, not clustered by raw cosines
    lacking = style_upload(10, 0, noise)
    lacking.profile_repeat = None
    assert "repeat" in ClusterAware(cfg, 1.0).aggregate(1, {**first, 10: lacking}).rejected[10]
