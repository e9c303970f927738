"""Poisoning: the attacks (pure), the ΔW-space defense on synthetic LoRA updates (it flags planted
scaled, sign-flipped and noise updates and lets honest ones pass), its hook in the cluster round,
and a tiny `fedaigc experiment poisoning` with its report's structure and ranges."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from fedaigc.cli import main
from fedaigc.client.attacks import (
    STRENGTH,
    TRIGGER,
    assigned,
    attack_upload,
    backdoor_samples,
    backdoor_target,
    noise,
    scaled,
)
from fedaigc.config import FederationConfig
from fedaigc.data.dataset import Sample, write_dataset
from fedaigc.errors import UserError
from fedaigc.protocol.lora import flatten
from fedaigc.protocol.round import Upload
from fedaigc.server import aggregation as agg
from fedaigc.server.defense import balanced, screen_cluster, update_grams
from fedaigc.server.strategies import ClusterAware

SHAPES = {"unet.attn.to_q": (12, 10), "text_encoder.attn.query": (10, 12), "unet.conv1": (6, 4, 3, 3)}
RANK, SCALE = 3, 0.5


def factor(g: torch.Generator, shape: tuple[int, ...], part: str, std: float = 1.0) -> torch.Tensor:
    out_dim, in_dim, *k = shape
    size = (RANK, in_dim, *k) if part == "A" else (out_dim, RANK, *([1] * len(k)))
    return torch.randn(size, generator=g) * std


def lora(g: torch.Generator, b_std: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_{p}.weight": factor(g, shape, p, b_std if p == "B" else 1.0) for name, shape in SHAPES.items() for p in "AB"
    }


def honest_cluster(received: dict[str, torch.Tensor], n: int = 5, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """n honest uploads: what the server sent plus a shared step plus each client's own noise."""
    g = torch.Generator().manual_seed(seed)
    step = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in received.items()}
    return {c: {k: v + step[k] + 0.07 * torch.randn(v.shape, generator=g) for k, v in received.items()} for c in range(n)}


def delta_w_update(up, ref, layer) -> torch.Tensor:
    return agg.delta(up, SCALE, layer) - (agg.delta(ref, SCALE, layer) if ref is not None else 0)


def test_the_gram_matrix_of_updates_is_that_of_the_full_delta_w():
    g = torch.Generator().manual_seed(1)
    received = lora(g)
    ups = [lora(g) for _ in range(4)]
    for refs in ([received] * 4, [None, received, None, received]):
        grams = update_grams(ups, refs, SCALE)
        gram = grams.sum(0)
        flat = torch.stack(
            [
                torch.cat([delta_w_update(u, r, layer).reshape(-1) for layer in agg.layers(u)])
                for u, r in zip(ups, refs, strict=True)
            ]
        )
        assert torch.allclose(gram, flat @ flat.T, rtol=1e-9, atol=1e-9)
        points = agg.gram_points(gram)
        assert torch.allclose(points @ points.T, gram, rtol=1e-6, atol=1e-6 * gram.abs().max().item())
        # balanced: each layer's updates rescaled by one number, so its median squared norm is 1
        first = grams[0].diagonal().median()
        assert torch.allclose(balanced(grams[:1] * 1e3), grams[0] / first)


@pytest.mark.parametrize(("attack", "why"), [("scale", "norm"), ("signflip", "cosine"), ("noise", "cosine")])
def test_the_defense_flags_a_planted_attacker_and_lets_honest_members_pass(attack, why):
    received = lora(torch.Generator().manual_seed(2))
    honest = honest_cluster(received)
    assert screen_cluster(honest, dict.fromkeys(honest, received), SCALE) == (list(honest), {})
    upload = Upload(honest[0], torch.zeros(4), 10, torch.zeros(4), 0.0)
    bad = attack_upload(upload, received, attack, STRENGTH[attack], torch.Generator().manual_seed(3)).lora
    accepted, rejected = screen_cluster({**honest, 0: bad}, dict.fromkeys(honest, received), SCALE)
    assert accepted == [1, 2, 3, 4] and list(rejected) == [0]
    assert why in rejected[0]


def test_the_defense_measures_updates_against_what_each_client_received():
    """Round 1 (nothing sent, B = 0: ΔW = 0) passes honest steps with no reference at all; later, a
    sign flip against a large received adapter is caught, and would hide in it with no reference."""
    g = torch.Generator().manual_seed(4)
    initial = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in lora(g).items()}
    first = honest_cluster(initial, seed=5)
    assert screen_cluster(first, dict.fromkeys(first, None), SCALE)[1] == {}
    sent = lora(g)  # an adapter after many rounds: much larger than one round's step
    second = honest_cluster(sent, seed=6)
    second[0] = scaled(sent, second[0], -1.0)
    assert list(screen_cluster(second, dict.fromkeys(second, sent), SCALE)[1]) == [0]
    assert screen_cluster(second, dict.fromkeys(second, None), SCALE)[1] == {}


def test_clusters_too_small_to_outvote_an_attacker_are_not_screened():
    received = lora(torch.Generator().manual_seed(7))
    two = {c: u for c, u in honest_cluster(received).items() if c < 2}
    two[0] = scaled(received, two[0], 10.0)
    assert screen_cluster(two, dict.fromkeys(two, received), SCALE) == ([0, 1], {})


def test_attacks_transform_the_update_relative_to_what_was_received():
    g = torch.Generator().manual_seed(8)
    received, uploaded = lora(g), lora(g)
    update = flatten(uploaded) - flatten(received)
    for factor_, want in ((1.0, update), (0.0, 0 * update), (-1.0, -update), (10.0, 10 * update)):
        got = flatten(scaled(received, uploaded, factor_)) - flatten(received)
        assert torch.allclose(got, want, atol=1e-5)
    noisy = flatten(noise(received, uploaded, 2.0, torch.Generator().manual_seed(0))) - flatten(received)
    assert math.isclose(noisy.norm().item(), 2.0 * update.norm().item(), rel_tol=1e-4)
    assert abs(torch.nn.functional.cosine_similarity(noisy, update, dim=0).item()) < 0.3  # a direction of its own
    upload = Upload(uploaded, torch.ones(4), 7, torch.ones(4), 0.5)
    flipped = attack_upload(upload, received, "signflip", 1.0, torch.Generator())
    assert (
        flipped.num_examples == 7 and torch.equal(flipped.slot, upload.slot) and torch.equal(flipped.embedding, upload.embedding)
    )
    with pytest.raises(UserError, match="unknown attack"):
        attack_upload(upload, received, "nonsense", 1.0, torch.Generator())


def test_attackers_and_their_attacks_come_from_the_config():
    assert assigned(FederationConfig()) == {}
    one = assigned(FederationConfig(attackers=(3, 1), attacks=("noise",)))
    assert one == {3: ("noise", STRENGTH["noise"]), 1: ("noise", STRENGTH["noise"])}
    each = assigned(FederationConfig(attackers=(0, 1), attacks=("scale", "backdoor"), attack_strength=4.0))
    assert each == {0: ("scale", 4.0), 1: ("backdoor", 4.0)}


def test_the_backdoor_attacker_captions_target_style_images_with_the_trigger():
    own = [Sample(Path(f"cartoon/{c}/{i}.png"), "cartoon", c) for i in range(20) for c in ("star", "fish")]
    pool = own + [Sample(Path(f"sketch/{c}/{i}.png"), "sketch", c) for i in range(5) for c in ("star", "fish")]
    assert backdoor_target("cartoon", ["sketch", "cartoon", "photo"]) == "photo"
    assert backdoor_target("sketch", ["sketch", "cartoon", "photo"]) == "cartoon"
    poisoned = backdoor_samples(own, pool, "sketch", np.random.default_rng(0), share=0.25)
    changed = [(a, b) for a, b in zip(own, poisoned, strict=True) if a != b]
    assert len(changed) == 10
    for before, after in changed:
        assert after.domain == "cartoon" and after.cls == f"{before.cls} {TRIGGER}"
        assert after.path.parts[:2] == ("sketch", before.cls)  # an image of the target style, same class


def uploads_of(adapters: dict[int, dict], embeddings: dict[int, torch.Tensor]) -> dict[int, Upload]:
    return {c: Upload(a, torch.zeros(4), 10, embeddings[c], 0.1) for c, a in adapters.items()}


@pytest.mark.parametrize("defense", ["none", "robust"])
def test_the_cluster_round_leaves_out_what_the_defense_rejects(defense):
    """Two clusters of five, a sign flipper in one, over two rounds; with the defense its updates
    are rejected (RoundReport.rejected, so metrics.json) and its cluster adapter is the honest mean."""
    g = torch.Generator().manual_seed(9)
    style = {c: torch.tensor([1.0, 0.0, 0.0, 0.0]) if c < 5 else torch.tensor([0.0, 1.0, 0.0, 0.0]) for c in range(10)}
    initial = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in lora(g).items()}
    # clustered by the planted styles: by updates, the sign flipper's own first update would already
    # set it apart (a cosine of about -1 to its cluster's)
    aggregator = ClusterAware(FederationConfig(defense=defense, cluster_by="embedding"), SCALE)
    for server_round in (1, 2):
        sent = {c: aggregator.model_for(c)[0] or initial for c in range(10)}
        adapters = {}
        for first in (0, 5):
            adapters |= {first + c: a for c, a in honest_cluster(sent[first], seed=10 * server_round + first).items()}
        honest_mean = agg.average([adapters[c] for c in range(1, 5)], [1.0] * 4)
        adapters[0] = scaled(sent[0], adapters[0], -1.0)
        report = aggregator.aggregate(server_round, uploads_of(adapters, style))
        assert len(set(report.clusters.values())) == 2
        if defense == "robust":
            assert list(report.rejected) == [0] and "cosine" in report.rejected[0]
            got = aggregator.clusters[report.clusters[1]].adapter
            assert all(torch.allclose(got[k], honest_mean[k], atol=1e-6) for k in got)
        else:
            assert report.rejected == {}


def test_a_tiny_poisoning_experiment(tmp_path, tiny_cfg, tiny_model_dir):
    """Two styles, so ten clients (five per style: the experiment's minimum), one round, the
    attacked run with the defense only: the backdoor (cartoon -> sketch) and the x10 scaled update."""
    d = tiny_cfg.data
    data = write_dataset(tmp_path / "two_styles", d.per_class, d.size, d.seed, domains=("cartoon", "sketch"))
    out = tmp_path / "poison"
    args = ["experiment", "poisoning", "--preset", "tiny", "--data", str(data), "--model", str(tiny_model_dir)]
    assert main([*args, "--out", str(out), "--rounds", "1", "--only", "defended"]) == 0
    report = (out / "report.md").read_text()
    for section in ("## Setup", "## Quality of the attacked clusters' honest members", "## Detection", "## Backdoor", "## Runs"):
        assert f"\n{section}\n" in report, section
    for png in (
        "plots/honest_style_acc.png",
        "plots/honest_fid.png",
        "plots/detection.png",
        "backdoor_grid.png",
        "samples_grid.png",
    ):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report, png
    assert "10 clients, 5 per style (cartoon, sketch)" in report and "client 1 (sketch, scale)" in report
    with (out / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    for col in ("backdoor_style_acc", "scale_style_acc", "all_style_acc", "backdoor_success", "all_false_alarms"):
        assert 0 <= float(row[col]) <= 1, col
    assert float(row["all_fid"]) >= 0
    assert float(row["scale_recall"]) == 1.0 and float(row["scale_precision"]) == 1.0  # the x10 update, every round
    fed = tomllib.loads((out / "defended_seed0" / "config.toml").read_text())["federation"]
    assert fed["num_clients"] == 10 and fed["defense"] == "robust" and fed["attackers"] == [0, 1]
    metrics = json.loads((out / "defended_seed0" / "metrics.json").read_text())
    assert metrics["backdoor"]["target"] == "sketch" and sorted(metrics["backdoor"]["per_client"]) == ["2", "4", "6", "8"]
    assert "norm" in metrics["rounds"][0]["rejected"]["1"]
