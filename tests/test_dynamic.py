"""Clients that join a running federation: placement into the planted nearest cluster or a new
one, the common start and the global warm start, the existing clients left untouched,
re-clustering by the profiles of every client seen, a split cluster's adapter, the server's
learning rate, join rounds in the schedule, and a tiny `fedaigc experiment dynamic`."""

import copy
import csv
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from fedaigc.cli import main
from fedaigc.config import preset
from fedaigc.errors import UserError
from fedaigc.eval.metrics import clustering_ari
from fedaigc.experiments.dynamic import newcomers
from fedaigc.protocol.round import Upload
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster, join, normalize, place
from fedaigc.server.participation import participants, schedule
from fedaigc.server.strategies import ClusterAware

SHAPES = {"unet.attn.to_q": (6, 5), "text.attn.v_proj": (4, 6)}
RANK, SCALE = 2, 2.0
DIM = 8


def lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (out_dim, in_dim) in SHAPES.items():
        out[name + agg.A_SUFFIX] = torch.randn(RANK, in_dim, generator=g)
        out[name + agg.B_SUFFIX] = torch.randn(out_dim, RANK, generator=g)
    return out


def embedding(direction: int, seed: int) -> torch.Tensor:
    """A private-token-like slot: a large part every client shares, one planted direction, noise."""
    e = torch.zeros(DIM)
    e[0] = 10.0
    e[direction] += 1.0
    return e + 0.05 * torch.randn(DIM, generator=torch.Generator().manual_seed(seed))


def upload(cid: int, direction: int, round_: int) -> Upload:
    slot = embedding(direction, 100 * round_ + cid)
    return Upload(lora(100 * round_ + cid), slot, 10 + cid, slot, 0.1)


def style_upload(cid: int, style: int, round_: int) -> Upload:
    """A client whose update shares its style's direction (noise about half its size); its task
    embedding carries nothing (the same for everyone). Wider layers than `lora`'s, so that random
    styles are near orthogonal."""
    g, noise = torch.Generator().manual_seed(style), torch.Generator().manual_seed(1000 * round_ + cid)
    out = {}
    for name, (out_dim, in_dim) in {"unet.attn.to_q": (48, 40), "text.attn.v_proj": (4, 6)}.items():
        a, b = torch.randn(RANK, in_dim, generator=g), torch.randn(out_dim, RANK, generator=g)
        out[name + agg.A_SUFFIX] = a + 0.5 * torch.randn(RANK, in_dim, generator=noise)
        out[name + agg.B_SUFFIX] = b + 0.5 * torch.randn(out_dim, RANK, generator=noise)
    return Upload(out, torch.ones(DIM), 10, torch.ones(DIM), 0.1)


def aggregator(**fed) -> ClusterAware:
    """A cluster server that clusters by the planted task embeddings (random LoRAs carry no style);
    by updates, by the uploads' own (no profiling pass: these uploads carry none)."""
    cfg = copy.deepcopy(preset("tiny").federation)
    cfg.strategy, cfg.k, cfg.cluster_by, cfg.profile_steps = "cluster", 2, "embedding", 0
    for key, value in fed.items():
        setattr(cfg, key, value)
    return ClusterAware(cfg, SCALE)


EXISTING = {0: 1, 1: 1, 2: 2, 3: 2}  # client -> planted direction: two clusters


def test_newcomers_go_to_the_planted_nearest_cluster_or_a_new_one():
    centres = {0: np.eye(DIM)[1] + 10 * np.eye(DIM)[0], 1: np.eye(DIM)[2] + 10 * np.eye(DIM)[0]}
    near, far, like_far = (embedding(d, s).numpy() for d, s in ((1, 7), (3, 8), (3, 9)))
    placed = place([near, far, like_far], centres, {0: 0.5, 1: 0.5}, threshold=0.3, fresh=5)
    assert placed[0][0] == 0 and placed[0][1] > 0.9  # raw cosines are all > 0.99: only the centred one separates
    assert placed[1][0] == 5 and placed[1][1] < 0.3  # far from both: a new cluster ...
    assert placed[2][0] == 5  # ... which the next newcomer like it joins
    assert [k for k, _ in place([far], centres, {0: 0.5, 1: 0.5}, threshold=-1.0, fresh=5)] != [5]  # no threshold: nearest
    assert place([near], {0: centres[0]}, {0: 1.0}, threshold=0.3, fresh=1)[0][0] == 1  # one cluster: no direction to compare


def test_newcomers_join_by_the_clusterings_average_linkage_not_the_centroid():
    a, b = np.sqrt(0.625), np.sqrt(0.375)
    members = np.array([[a, b, 0.0], [a, -b, 0.0]])  # one cluster, its two members at cosine 0.25
    c = 0.146 / a  # a newcomer at cosine 0.146 to each member is at c = 0.185 to their centroid (1, 0, 0)
    lone, like_lone, member_like = [c, 0.0, np.sqrt(1 - c * c)], [c, 0.1, np.sqrt(0.99 - c * c)], [1.0, 0.0, 0.0]
    placed = join(np.array([lone, like_lone, member_like]), members, np.array([3, 3]), threshold=0.18, fresh=4)
    assert placed[0] == (4, pytest.approx(0.146))  # above the threshold to the centroid, below it on average
    assert placed[1][0] == 4 and placed[2] == (3, pytest.approx(a))  # the second lone one joins the first
    labels = cluster(np.array([*members, lone]), distance_threshold=1 - 0.18, center=False)
    assert labels[0] == labels[1] != labels[2]  # what clustering everyone at once would have done


def test_clients_cluster_by_their_first_updates_and_newcomers_join_by_theirs(tmp_path):
    server = aggregator(cluster_by="update", k=0, recluster_every=5)
    styles = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    server.aggregate(1, {c: style_upload(c, s, 1) for c, s in styles.items()})
    assert clustering_ari(list(styles.values()), [server.assignment[c] for c in styles]) == 1.0  # K = 3 found
    changes = server._features(sorted(styles))
    sims = normalize(changes) @ normalize(changes).T
    same = np.array([[styles[a] == styles[b] for b in styles] for a in styles])
    assert sims[same & ~np.eye(6, dtype=bool)].min() > server.cfg.merge_similarity > sims[~same].max()
    # round 2, no re-clustering: a newcomer of style 1 joins its cluster, one of a new style gets a new one
    report = server.aggregate(2, {6: style_upload(6, 1, 2), 7: style_upload(7, 3, 2)})
    assert server.assignment[6] == server.assignment[2]
    assert server.assignment[7] not in {server.assignment[c] for c in styles}
    assert report.placed[6] > server.cfg.merge_similarity > report.placed[7]
    tensors, meta = server.state()  # the changes survive a restart
    restarted = aggregator(cluster_by="update", k=0)
    restarted.restore(tensors, meta)
    assert np.allclose(restarted._features(sorted(server.assignment)), server._features(sorted(server.assignment)))
    by_embedding = aggregator()  # a run clustered by embeddings holds no updates: a clear error on resume
    by_embedding.aggregate(1, {c: upload(c, d, 1) for c, d in EXISTING.items()})
    with pytest.raises(UserError, match='cluster_by = "embedding"'):
        aggregator(cluster_by="update").restore(*by_embedding.state())
    merged = aggregator(cluster_by="update", k=0, merge_similarity=-0.99)  # every update "agrees": one cluster
    merged.aggregate(1, {c: style_upload(c, s, 1) for c, s in styles.items()})
    assert len(set(merged.assignment.values())) == 1


def test_a_newcomer_starts_from_the_common_start_or_the_global_warm_start():
    plain, warm = aggregator(), aggregator(newcomer_start="global")
    for agg_ in (plain, warm):
        agg_.aggregate(1, {c: upload(c, d, 1) for c, d in EXISTING.items()})
    assert plain.model_for(4) == (None, None)  # the initial LoRA and neutral slot, as in round 1
    # the warm start: the best rank-r approximation of the global LoRA, and the clusters' mean slot
    adapter, slot = warm.model_for(4)
    for layer in agg.layers(adapter):
        u, s, vh = torch.linalg.svd(agg.delta(warm.global_adapter, 1.0, layer))
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        assert torch.allclose(agg.delta(adapter, SCALE, layer), best, atol=1e-4)
        assert adapter[layer + agg.A_SUFFIX].shape[0] == RANK
    assert torch.allclose(slot, (warm.clusters[0].slot + warm.clusters[1].slot) / 2, atol=1e-6)


def test_the_join_round_places_newcomers_and_leaves_the_existing_clients_untouched():
    both, alone = aggregator(recluster_every=5), aggregator(recluster_every=5)  # clusters formed once, in round 1
    for agg_ in (both, alone):
        agg_.aggregate(1, {c: upload(c, d, 1) for c, d in EXISTING.items()})
    first = dict(both.assignment)
    assert alone.model_for(0)[0] is alone.clusters[first[0]].adapter  # clients already placed get their cluster's
    # round 2: the existing clients again, client 4 like the first cluster, 5 and 6 like neither
    ups = {c: upload(c, d, 2) for c, d in EXISTING.items()}
    report = both.aggregate(2, ups | {4: upload(4, 1, 2), 5: upload(5, 3, 2), 6: upload(6, 3, 2)})
    alone.aggregate(2, ups)
    assert {c: both.assignment[c] for c in EXISTING} == first == alone.assignment
    assert both.assignment[4] == first[0]
    assert both.assignment[5] == both.assignment[6] not in set(first.values())
    assert min(report.placed[4], report.placed[6]) > 0.3 > report.placed[5]  # 6: similar to 5's new cluster
    for k in set(first.values()):  # the newcomer's first update is not averaged into the cluster it joined
        for name, t in alone.clusters[k].adapter.items():  # (its profile moves the centroid: weights shift a little)
            assert torch.allclose(both.clusters[k].adapter[name], t, atol=1e-3)
    new = both.assignment[5]
    assert set(both.clusters[new].adapter) == set(ups[0].lora) and both.clusters[new].centroid is not None
    assert both.global_adapter[next(iter(agg.layers(ups[0].lora))) + agg.A_SUFFIX].shape[0] == 3 * RANK
    # round 3, no re-clustering: client 4 trained from its cluster's adapter and now counts, weighted
    # by its profile (its first round's embedding) like the others
    ups3 = {c: upload(c, d, 3) for c, d in (EXISTING | {4: 1}).items()}
    both.aggregate(3, ups3)
    k = first[0]
    members = [0, 1, 4]
    profiles = [upload(c, 1, 1 if c < 4 else 2).embedding.double() for c in members]
    centroid = torch.from_numpy(both.clusters[k].centroid)
    w = agg.member_weights([ups3[c].num_examples for c in members], torch.stack(profiles), centroid)
    want = agg.average([ups3[c].lora for c in members], w)
    assert all(torch.allclose(both.clusters[k].adapter[n], want[n]) for n in want)


def test_re_clustering_sees_every_client_seen_so_far_not_only_this_rounds():
    """Partial participation: a round of one client re-clusters everyone the server has seen, by
    their profiles, so the clients absent this round keep their clusters and the new one joins its
    like; state on disk keeps the profiles."""
    server = aggregator(recluster_every=1)
    server.aggregate(1, {c: upload(c, EXISTING[c], 1) for c in (0, 1, 2)})
    before = dict(server.assignment)
    kept = {n: t.clone() for n, t in server.clusters[before[2]].adapter.items()}
    server.aggregate(2, {3: upload(3, EXISTING[3], 2)})
    assert {c: server.assignment[c] for c in before} == before and server.assignment[3] == before[2]
    assert all(torch.equal(server.clusters[before[2]].adapter[n], t) for n, t in kept.items())  # trained from the common start
    restarted = aggregator(recluster_every=1)
    restarted.restore(*server.state())
    assert set(restarted.clients) == {0, 1, 2, 3}
    assert all(np.array_equal(restarted.clients[c].profile, server.clients[c].profile) for c in server.clients)
    ups = {c: upload(c, EXISTING[c], 3) for c in (0, 3)}
    for agg_ in (server, restarted):
        agg_.aggregate(3, {c: copy.deepcopy(u) for c, u in ups.items()})
    assert restarted.assignment == server.assignment
    assert all(torch.equal(restarted.global_adapter[n], t) for n, t in server.global_adapter.items())
    # fewer clusters on a re-clustering (here: k lowered): the cluster left without members goes
    server.cfg.k = 1
    server.aggregate(4, {c: upload(c, EXISTING[c], 4) for c in (0, 2)})
    assert set(server.assignment.values()) == set(server.trained()) == set(server.clusters) and len(server.clusters) == 1


def test_join_rounds_in_the_schedule():
    cfg = preset("tiny")
    cfg.federation.join_rounds = (1, 1, 3)  # cycles: clients 2 and 5 join in round 3
    cids = list(range(6))
    assert participants(cfg, cids, 1) == participants(cfg, cids, 2) == [0, 1, 3, 4]
    assert participants(cfg, cids, 3) == cids
    assert schedule(cfg, cids, 4) == [participants(cfg, cids, r) for r in range(1, 5)]


def test_newcomers_of_the_experiment():
    assert newcomers(8, 4) == [3, 6, 7]  # sketch (unseen), and the second photo client (seen)
    assert newcomers(2, 4) == [1]
    with pytest.raises(Exception, match="two domains"):
        newcomers(1, 4)


def test_tiny_dynamic_experiment(tmp_path, tiny_data, tiny_model_dir):
    out = tmp_path / "dyn"
    # the tiny preset's 3-step profiling passes do not separate styles (noise-corrected similarity
    # ~0.56 across them); this test checks the experiment's bookkeeping, which needs the newcomer in a
    # cluster of its own, so the join threshold is set out of reach here
    strict = tmp_path / "strict.toml"
    strict.write_text("[federation]\nmerge_agreement = 0.95\n")
    args = ["experiment", "dynamic", "--preset", "tiny", "--data", str(tiny_data), "--model", str(tiny_model_dir)]
    assert main([*args, "--config", str(strict), "--out", str(out), "--num-clients", "2", "--rounds", "1"]) == 0
    report = (out / "report.md").read_text()
    for section in ("## Placement", "## Newcomers: joining vs from scratch", "## Existing clients: with and without newcomers"):
        assert f"\n{section}\n" in report
    for png in ("plots/newcomers.png", "plots/existing.png", "samples_grid.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    with (out / "results.csv").open() as f:
        rows = {row["setting"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["joined", "warm", "static", "scratch"]
    for name, cols in (("joined", ["new_1_style_acc", "old_style_acc", "ari"]), ("static", ["old_style_acc"])):
        for col in cols:
            assert 0 <= float(rows[name][col]) <= 1 or col == "ari" and -1 <= float(rows[name][col]) <= 1
    assert float(rows["scratch"]["new_1_fid"]) >= 0 and rows["scratch"]["old_style_acc"] == ""
    # one existing client is one cluster: the newcomer gets a new cluster and the existing client's
    # adapter, hence its samples and scores, are exactly those of the run without the newcomer
    for name in ("joined", "warm"):
        assert float(rows[name]["c1_new_cluster"]) == 1 and float(rows[name]["placed_right"]) == 1
        for col in ("old_style_acc", "old_fid", "old_alignment"):
            assert math.isclose(float(rows[name][col]), float(rows["static"][col]), rel_tol=1e-6), (name, col)
    # the newcomer's own first round: from the initial LoRA (as from scratch) or from the warm start
    assert rows["joined"]["new_1_fid"] != rows["warm"]["new_1_fid"]
    joined = json.loads((out / "joined_seed0" / "metrics.json").read_text())
    assert [r["sampled"] for r in joined["rounds"]] == [[0], [0, 1]]
    static = json.loads((out / "static_seed0" / "metrics.json").read_text())
    assert [r["sampled"] for r in static["rounds"]] == [[0], [0]] and set(static["final"]["per_client"]) == {"0"}


def test_a_split_clusters_adapter_goes_with_both_halves():
    """k = 2 merges two of three planted styles; a re-clustering with k = 3 splits them, in a round
    where only one half trains (either half). The half that did not train keeps the merged adapter
    (not another style's, not the common start), the other half gets its own new average, the
    third cluster keeps its id."""
    planted = EXISTING | {4: 3, 5: 3}
    for half in (0, 1):
        server = aggregator(recluster_every=1)
        server.aggregate(1, {c: upload(c, d, 1) for c, d in planted.items()})
        sizes = Counter(server.assignment.values())
        merged, alone = (next(k for k, n in sizes.items() if n == size) for size in (4, 2))
        merged_adapter = {n: t.clone() for n, t in server.clusters[merged].adapter.items()}
        styles = sorted({planted[c] for c, k in server.assignment.items() if k == merged})
        trained, untrained = styles[half], styles[1 - half]
        was_alone = [c for c, k in server.assignment.items() if k == alone]
        ups = {c: upload(c, planted[c], 2) for c in planted if planted[c] == trained or c in was_alone}
        server.cfg.k = 3
        server.aggregate(2, ups)
        assert all(server.assignment[c] == alone for c in was_alone)
        halves = [{server.assignment[c] for c in planted if planted[c] == d} for d in (trained, untrained)]
        assert len(halves[0]) == len(halves[1]) == 1 and halves[0] != halves[1]
        adapter, _ = server.model_for(next(c for c in planted if planted[c] == untrained))
        assert adapter is not None and all(torch.equal(adapter[n], t) for n, t in merged_adapter.items())
        members = [c for c in ups if planted[c] == trained]
        k = server.assignment[members[0]]
        emb = torch.stack([torch.from_numpy(server.clients[c].profile) for c in members])
        w = agg.member_weights([ups[c].num_examples for c in members], emb, torch.from_numpy(server.clusters[k].centroid))
        want = agg.average([ups[c].lora for c in members], w)
        assert all(torch.allclose(server.clusters[k].adapter[n], want[n]) for n in want)


def test_the_server_learning_rate_extends_a_clusters_step_from_where_its_members_started():
    """adapter = start + lr x (average - start), where the members trained from the cluster's
    adapter; a round from the common start (unknown to the server) is a plain average."""
    plain, faster = aggregator(), aggregator(server_lr=2.0)
    for round_ in (1, 2):
        starts = {k: (dict(a), plain.clusters[k].slot) for k, a in plain.trained().items()}
        for server in (plain, faster):
            server.aggregate(round_, {c: upload(c, d, round_) for c, d in EXISTING.items()})
        assert faster.assignment == plain.assignment
        for k, adapter in plain.trained().items():
            start, slot = starts.get(k, (adapter, plain.clusters[k].slot))  # round 1: no start, lr unused
            assert all(torch.allclose(faster.clusters[k].adapter[n], 2 * t - start[n], atol=1e-5) for n, t in adapter.items())
            assert torch.allclose(faster.clusters[k].slot, 2 * plain.clusters[k].slot - slot, atol=1e-5)
