"""Privacy against a curious server: the client-side guard (keyed rotation, Gaussian mechanism),
the attribute-inference attacks, and a tiny `fedaigc experiment privacy`."""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from experiment_checks import check_numbers, check_report, experiment, read_results
from safetensors.torch import load_file
from scipy.integrate import quad
from scipy.stats import norm

from fedaigc.client.client_app import build_client
from fedaigc.client.privacy import EmbeddingGuard, analytic_gaussian_sigma, composed_epsilon, rotation
from fedaigc.eval.attacks import accuracy, chance, invert, match_geometry, probe, vocabulary_rank
from fedaigc.experiments.privacy import Rows
from fedaigc.protocol.lora import flatten
from fedaigc.server import aggregation as agg
from fedaigc.server.clustering import cluster
from fedaigc.server.strategies import make_strategy


def hockey_stick_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """δ(ε) of the Gaussian mechanism from its privacy-loss distribution L ~ N(μ, 2μ), μ = Δ²/2σ²:
    E[(1 − e^(ε−L))+], integrated numerically (independent of the closed form used for calibration)."""
    mu = sensitivity**2 / (2 * sigma**2)
    density = norm(mu, math.sqrt(2 * mu)).pdf
    return quad(lambda loss: (1 - math.exp(epsilon - loss)) * density(loss), epsilon, mu + 40 * math.sqrt(2 * mu))[0]


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 8.0])
def test_gaussian_mechanism_is_calibrated_and_clips(epsilon):
    sigma = analytic_gaussian_sigma(epsilon, 1e-3, 1.0)
    assert hockey_stick_delta(epsilon, sigma, 1.0) == pytest.approx(1e-3, rel=1e-3)  # exactly δ: no slack
    if epsilon < 1:  # the classic formula is valid (and looser) only there
        assert sigma < math.sqrt(2 * math.log(1.25 / 1e-3)) / epsilon
    eps_run, delta_run = composed_epsilon(epsilon, 1e-3, sigma, 1.0, releases=3)
    assert delta_run == pytest.approx(3e-3) and epsilon < eps_run <= 3 * epsilon
    guard = EmbeddingGuard(None, sigma=0.25, clip_norm=0.5)
    start, far = torch.zeros(384, dtype=torch.float64), torch.full((384,), 10.0, dtype=torch.float64)
    draws = torch.stack([guard.privatize(far, start, torch.Generator().manual_seed(i)) for i in range(200)])
    along = draws.mean(0) @ far / far.norm()  # the change was clipped to 0.5 before the noise
    assert along == pytest.approx(0.5, abs=0.06)
    assert draws.std(0).mean() == pytest.approx(0.25, rel=0.05)


def test_rotation_keeps_the_geometry_and_the_clustering():
    r = rotation(7, 384)
    assert torch.allclose(r @ r.T, torch.eye(384, dtype=r.dtype), atol=1e-10) and torch.equal(r, rotation(7, 384))
    assert not torch.allclose(r, rotation(8, 384))
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(4, 384)), 3, axis=0) + 0.3 * rng.normal(size=(12, 384))
    rx = x @ r.numpy().T
    unit = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, rx)]
    np.testing.assert_allclose(unit[1] @ unit[1].T, unit[0] @ unit[0].T, atol=1e-12)  # every cosine
    assert (cluster(rx) == cluster(x)).all() and len(set(cluster(x).tolist())) == 4
    guard = EmbeddingGuard(r)
    v = torch.from_numpy(x[0]).float()
    assert torch.allclose(guard.receive(guard.send(v, None, torch.Generator())), v, atol=1e-5)


def test_attacks_name_separable_styles_and_geometry_survives_rotation():
    rng = np.random.default_rng(1)
    styles = ["a", "b", "c", "d"]
    centres = rng.normal(size=(4, 64)) * np.array([[1.0], [1.5], [2.0], [2.5]])  # distinct norms: a unique geometry
    shadow_styles = [s for s in styles for _ in range(5)]
    shadow = np.repeat(centres, 5, axis=0) + 0.1 * rng.normal(size=(20, 64))
    truth = ["a", "a", "b", "b", "c", "c", "d", "d"]
    victims = np.repeat(centres, 2, axis=0) + 0.1 * rng.normal(size=(8, 64))
    rotated = victims @ rotation(3, 64).numpy().T
    assert accuracy(probe(shadow, shadow_styles, victims), truth) == 1.0
    assert accuracy(invert(victims, dict(zip(styles, centres, strict=True))), truth) == 1.0
    vocabulary = np.concatenate([rng.normal(size=(100, 64)), centres])  # the style words are tokens 100-103
    ranks = vocabulary_rank(victims, vocabulary, [100 + styles.index(t) for t in truth], np.zeros(64))
    assert ranks == [1] * 8 and vocabulary_rank(-victims, vocabulary, [100] * 8, np.zeros(64))[0] > 90
    assert accuracy(match_geometry(victims, shadow, shadow_styles), truth) == 1.0
    assert match_geometry(rotated, shadow, shadow_styles) == match_geometry(victims, shadow, shadow_styles)
    assert accuracy(probe(shadow, shadow_styles, rotated), truth) < 1.0  # the rotation does stop the probe
    assert chance(truth) == 0.25 and chance(["a", "a", "b"]) == pytest.approx(2 / 3)
    assert accuracy(["a", "b"], ["a", "c"]) == 0.5


def test_a_round_with_the_rotation_equals_one_without_it_up_to_the_rotation(tiny_cfg, tiny_data, tiny_model_dir):
    """Two rounds of 4 clients through the server's strategy, with and without the key: the same
    clusters and LoRAs, and slots (uploaded and aggregated) that differ exactly by R."""
    runs = {}
    for key in (0, 5):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.client.embedding_key = key
        cfg.federation.k = 2
        aggregator = make_strategy(cfg)
        uploads = {}
        for rnd in (1, 2):
            uploads = {}
            for cid in range(4):
                client = build_client(cfg, cid, 4, tiny_data, tiny_model_dir)
                plan = aggregator.plan_for(rnd, cid, cfg.client)
                uploads[cid] = client.follow(plan, plan.client_seed(cid))
            assert aggregator.aggregate(rnd, uploads).rejected == {}  # as the ClientApp would: with round 1's profiling pass
        runs[key] = (aggregator, uploads)
    (plain_agg, plain_up), (rot_agg, rot_up) = runs[0], runs[5]
    assert sorted(plain_agg.assignment) == [0, 1, 2, 3]
    r = rotation(5, 384).float()

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # float32 rounding of R and Rᵀ, carried through round 2
        return float((a - b).norm() / b.norm()) < 1e-4

    assert rot_agg.assignment == plain_agg.assignment
    for cid in range(4):
        assert close(rot_up[cid].slot, r @ plain_up[cid].slot)
        assert torch.equal(rot_up[cid].slot, rot_up[cid].embedding)
        assert close(flatten(rot_up[cid].lora), flatten(plain_up[cid].lora))
    slots = {k: s.slot for k, s in plain_agg.clusters.items() if s.slot is not None}
    assert slots
    for k, slot in slots.items():
        assert close(rot_agg.clusters[k].slot, r @ slot)
        assert not torch.allclose(rot_agg.clusters[k].slot, slot, atol=1e-2)  # the server never sees the real slot


@pytest.fixture(scope="module")
def privacy_run(tmp_path_factory, tiny_data, tiny_model_dir):
    """One tiny privacy experiment (three settings) for the tests below: each setting is a Ray start-up."""
    out = tmp_path_factory.mktemp("privacy") / "privacy"
    assert experiment("privacy", out, tiny_data, tiny_model_dir, "--only", "plain,private,noised") == 0
    return out


def test_privacy_experiment_attacks_and_report(privacy_run):
    out = privacy_run
    report = (out / "report.md").read_text()
    for section in [
        "## Privacy and utility",
        "## Every attack",
        "## Noise alone: attacks and clustering against ε",
        "## Utility",
    ]:
        assert f"\n{section}\n" in report, section
    for png in ["attacks", "noise_sweep", "utility", "ari_per_round"]:
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000 and f"](plots/{png}.png)" in report
    rows = read_results(out)
    assert list(rows) == ["plain", "private", "noised"]
    for name in ("plain", "private"):
        check_numbers(rows[name], ["style_acc", "class_acc", "fid", "kid", "alignment", "ari", "ari_round_1"])
    for row in rows.values():
        attacks = [c for c in row if c.startswith("atk_") and not c.endswith("_std")]
        assert len(attacks) == 11
        assert all(0 <= float(row[c]) <= 1 for c in attacks)
    assert rows["private"]["sigma"] == "" and float(rows["noised"]["epsilon_round"]) == 8
    assert all(1 <= float(rows[n][f"vocab_rank_{w}"]) <= 30522 for n in ("private", "noised") for w in ("r1", "final"))
    assert float(rows["noised"]["sigma"]) == pytest.approx(analytic_gaussian_sigma(8.0, 1e-5, 1.0), rel=1e-4)
    sweep = json.loads((out / "noise_sweep.json").read_text())
    assert [s["epsilon"] for s in sweep] == sorted(s["epsilon"] for s in sweep)
    assert all(0 <= s[k] <= 1 for s in sweep for k in ("probe", "invert", "geometry"))
    # the replayed round-1 uploads are what the server aggregated: per cluster, the weighted mean of
    # its members' is the stored slot
    for name in ("private", "noised"):
        view = Rows.load(out / f"{name}_seed0" / "server_view.safetensors")
        state = out / f"{name}_seed0" / "rounds" / "round_001"
        meta = json.loads((state / "state.json").read_text())["meta"]  # the server state beside the round's record
        for k, centroid in meta["centroids"].items():
            members = [int(c) for c, kk in meta["assignment"].items() if str(kk) == k]
            stored = load_file(str(state / "state.safetensors"))[f"slot.{k}"].double()
            emb = torch.from_numpy(view.rows["emb_r1"][members])
            w = torch.tensor(agg.member_weights([16] * len(members), emb, torch.tensor(centroid)), dtype=torch.float64)
            assert torch.allclose((emb * (w / w.sum())[:, None]).sum(0), stored, atol=1e-5)  # a replay: float noise


def test_privacy_modes_then_reuse_and_refuse(privacy_run, tmp_path, tiny_data, tiny_model_dir, capsys):
    check_report(
        privacy_run,
        ["## What the training edge server receives", "## Utility", "## Clustering per round"],
        ["plots/utility.png", "plots/ari_per_round.png"],
    )
    out = tmp_path / "privacy"  # a copy: this test rewrites a run's config
    shutil.copytree(privacy_run, out)

    def again(*extra: str) -> int:
        return experiment("privacy", out, tiny_data, tiny_model_dir, "--only", "private", *extra)

    state = out / "private_seed0" / "rounds" / "round_001" / "state.json"
    before = state.stat().st_mtime_ns
    assert again() == 0  # no training, no sampling
    assert state.stat().st_mtime_ns == before and list(read_results(out)) == ["private"]
    capsys.readouterr()
    assert again("--num-clients", "3") == 2
    assert "another config" in capsys.readouterr().err
    saved = out / "private_seed0" / "config.toml"  # a run of an older fedaigc: no timestep_bias yet (it trained uniform)
    saved.write_text("".join(line for line in saved.read_text().splitlines(True) if not line.startswith("timestep_bias")))
    assert again() == 2  # not taken for a bias-2 run
    assert "older fedaigc" in (err := capsys.readouterr().err) and "client.timestep_bias" in err
    assert state.stat().st_mtime_ns == before
