"""Simulated networks and participation: online draws and schedules that replay exactly, the
participation-rate estimate and inverse-propensity weights, network sampling that favours the
rarely seen, simulated round times, and a tiny `fedaigc experiment network`."""

import copy
import csv
import json

import pytest
import torch

from fedaigc.cli import main
from fedaigc.config import preset, validate
from fedaigc.errors import UserError
from fedaigc.protocol.round import Upload
from fedaigc.server import aggregation as agg
from fedaigc.server.participation import (
    Link,
    join_round,
    link,
    online,
    participants,
    rate,
    round_seconds,
    schedule,
    weights,
)
from fedaigc.server.strategies import FedAvg


def network_cfg(sampling="uniform", weighting="plain", fraction=1.0, participation=(1.0, 0.25)):
    cfg = copy.deepcopy(preset("tiny"))
    cfg.federation.sampling, cfg.federation.weighting, cfg.federation.fraction = sampling, weighting, fraction
    cfg.network.participation = participation
    return cfg


def test_online_draws_and_schedules_replay_exactly():
    cfg, cids = network_cfg(sampling="network", fraction=0.5), list(range(8))
    history = schedule(cfg, cids, 30)
    assert history == schedule(cfg, cids, 30) and history[:12] == schedule(cfg, cids, 12)  # what a resumed server replays
    assert all(participants(cfg, cids, r) == history[r - 1] for r in (1, 7, 30))
    for r, chosen in enumerate(history, 1):
        assert set(chosen) <= set(online(cfg, cids, r)) and len(chosen) == -(-len(online(cfg, cids, r)) // 2)
    # the online draws do not depend on the sampling or weighting, so two settings see the same network
    assert all(online(cfg, cids, r) == online(network_cfg(), cids, r) for r in range(1, 31))
    rare = [c for c in cids if c % 2]
    share = sum(c in online(cfg, cids, r) for r in range(1, 201) for c in rare) / (200 * len(rare))
    assert 0.2 < share < 0.3  # participation 0.25


def test_participation_estimate_and_inverse_propensity_weights():
    assert rate([], 3, 1) == 0.5  # no evidence yet
    assert rate([[0, 1], [1], [0, 1], [1]], 0, 1) == (2 + 1) / (4 + 2)
    assert rate([[0, 1], [1], [0, 1], [1]], 0, 3) == (1 + 1) / (2 + 2)  # only the rounds since it joined
    cfg, cids = network_cfg(), [0, 1]
    assert weights(cfg, cids, 5) == {0: 1.0, 1: 1.0}  # plain
    cfg.federation.weighting = "network"
    history = schedule(cfg, cids, 399)
    w = weights(cfg, cids, 400)
    assert w == {c: 1 / rate(history, c, 1) for c in cids}
    assert w[0] == pytest.approx(401 / 400) and 1 / w[1] == pytest.approx(0.25, abs=0.05)  # -> the true rates
    cfg.federation.join_rounds = (1, 300)
    assert weights(cfg, cids, 300)[1] == 2.0  # a newcomer: the prior 1/2


def test_network_sampling_favours_the_rarely_seen():
    cids = list(range(8))
    counts = {}
    for sampling in ("uniform", "network"):
        cfg = network_cfg(sampling=sampling, fraction=0.5)
        history = schedule(cfg, cids, 200)
        counts[sampling] = [sum(c in r for r in history) for c in cids]
    rare = [c for c in cids if c % 2]
    assert sum(counts["network"][c] for c in rare) > 1.3 * sum(counts["uniform"][c] for c in rare)
    assert sum(counts["network"]) == sum(counts["uniform"])  # the same number of clients train, other ones


def test_inverse_propensity_weights_reach_the_aggregation():
    g = torch.Generator().manual_seed(0)
    ups = {
        c: Upload(
            {"l.lora_A.weight": torch.randn(2, 3, generator=g), "l.lora_B.weight": torch.randn(4, 2, generator=g)},
            torch.randn(5, generator=g),
            10,
            torch.randn(5, generator=g),
            0.1,
        )
        for c in (0, 1)
    }
    fed = copy.deepcopy(preset("tiny").federation)
    fed.strategy = "fedavg"
    plain, boosted = FedAvg(fed, 1.0), FedAvg(fed, 1.0)
    plain.aggregate(1, ups)
    boosted.aggregate(1, ups, {0: 1.0, 1: 3.0})
    want = agg.average([ups[0].lora, ups[1].lora], [1, 3])
    assert all(torch.allclose(boosted.clusters[0].adapter[k], want[k]) for k in want)
    assert not torch.allclose(plain.clusters[0].adapter["l.lora_A.weight"], want["l.lora_A.weight"])


def test_profile_round_time_and_checks():
    cfg = network_cfg()
    cfg.network.bandwidth, cfg.network.latency, cfg.network.step_seconds = (8.0, 1.0), (0.1,), (0.5, 2.0)
    assert link(cfg.network, 3) == Link(0.25, 1.0, 0.1, 2.0)  # lists cycle over the client ids
    assert link(cfg.network, 3).seconds(10**6, 10**6, 4) == pytest.approx(0.2 + 16.0 + 8.0)
    assert round_seconds(cfg.network, 4, {0: 10**6, 3: 10**6}, {0: 10**6, 3: 10**6}) == pytest.approx(24.2)  # the slowest
    assert round_seconds(cfg.network, 4, {}, {}) == 0.0
    assert join_round(cfg, 5) == 1
    for section, key, value in (
        ("federation", "sampling", "fastest"),
        ("federation", "weighting", "ipw"),
        ("federation", "join_rounds", (0,)),
        ("network", "participation", (0.0,)),
        ("network", "bandwidth", (0.0,)),
        ("network", "latency", (-1.0,)),
    ):
        bad = copy.deepcopy(cfg)
        setattr(getattr(bad, section), key, value)
        with pytest.raises(UserError, match=key):
            validate(bad)


def test_tiny_network_experiment(tmp_path, tiny_data, tiny_model_dir):
    out = tmp_path / "net"
    args = ["experiment", "network", "--preset", "tiny", "--data", str(tiny_data), "--model", str(tiny_model_dir)]
    assert main([*args, "--out", str(out), "--num-clients", "2", "--rounds", "1"]) == 0
    report = (out / "report.md").read_text()
    for section in ("## Setup", "## Quality per client", "## Time and bytes to a target quality"):
        assert f"\n{section}\n" in report
    plots = ["style_per_client", "rounds_per_client", "quality_vs_time", "quality_vs_bytes"]
    for png in [f"plots/{p}.png" for p in plots] + ["samples_grid.png"]:
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    with (out / "results.csv").open() as f:
        rows = {row["setting"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["plain", "network"]
    for row in rows.values():
        for col in ("style_acc", "worst_style_acc", "rare_style_acc", "style_acc_round_1", "style_acc_round_2"):
            assert 0 <= float(row[col]) <= 1, col
        assert float(row["worst_style_acc"]) <= float(row["style_acc"]) <= 1
        assert 0 < float(row["sim_minutes_round_1"]) <= float(row["sim_minutes_round_2"])
        assert 0 < float(row["mib_to_target"]) <= float(row["mib_round_2"])
        assert float(row["c0_rounds"]) + float(row["c1_rounds"]) == 2  # one of the one or two online clients trains
    for name in rows:
        run = json.loads((out / f"{name}_seed0" / "metrics.json").read_text())
        assert len(run["rounds"]) == 2 and {"final", "round_1"} <= set(run)
        assert all(r["sim_seconds"] > 0 for r in run["rounds"])
