"""The `flora` and `central` baselines: FLoRA's cumulative stack on the server, its frozen merge
on the client, and both run end to end through `fedaigc federate`."""

import json
import math

import torch
from safetensors.torch import load_file

from fedaigc.cli import main
from fedaigc.client.adapter import attach_lora, get_adapter, set_adapter, set_base_delta
from fedaigc.config import FederationConfig
from fedaigc.model.base import load_model
from fedaigc.protocol.lora import LoraSpec
from fedaigc.protocol.round import Upload
from fedaigc.server import aggregation as agg
from fedaigc.server.strategies import FLoRA

SHAPES = {"unet.x.to_q": (12, 10), "unet.y.conv1": (6, 4, 3, 3)}


def random_upload(seed: int, num_examples: int, rank: int = 3) -> Upload:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (out_dim, in_dim, *k) in SHAPES.items():
        lora[name + agg.A_SUFFIX] = torch.randn(rank, in_dim, *k, generator=g)
        lora[name + agg.B_SUFFIX] = torch.randn(out_dim, rank, *([1] * len(k)), generator=g)
    return Upload(lora, torch.randn(5, generator=g), num_examples, torch.randn(5, generator=g), 0.1)


def test_flora_stacks_every_round_exactly_and_restores():
    scale = 0.5
    server = FLoRA(FederationConfig(strategy="flora"), scale)
    assert server.base_delta() is None
    rounds = [{c: random_upload(10 * r + c, n) for c, n in enumerate([10, 30, 60])} for r in range(2)]
    want = dict.fromkeys(agg.layers(rounds[0][0].lora), 0.0)
    for r, uploads in enumerate(rounds, start=1):
        server.aggregate(r, uploads)
        for layer in want:
            want[layer] = want[layer] + sum(u.num_examples / 100 * agg.delta(u.lora, scale, layer) for u in uploads.values())
            assert torch.allclose(agg.delta(server.base_delta(), 1.0, layer), want[layer], atol=1e-5, rtol=1e-5)
            assert server.base_delta()[layer + agg.A_SUFFIX].shape[0] == 9 * r  # clients x rank x rounds
        adapter, slot = server.model_for(1)
        assert adapter is None  # each round starts a fresh LoRA on the merged base
        assert torch.allclose(slot, sum(u.num_examples / 100 * u.slot for u in uploads.values()))
    restored = FLoRA(FederationConfig(strategy="flora"), scale)
    restored.restore(*server.state())
    assert all(torch.equal(restored.base_delta()[k], v) for k, v in server.base_delta().items())
    assert torch.equal(restored.model_for(2)[1], server.model_for(2)[1])


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 12, 384, generator=g)
    with torch.no_grad():
        return model.unet(x, 500, encoder_hidden_states=ctx).sample, model.encode_prompts(["a picture of a star"])


def test_merged_delta_acts_as_the_stacked_adapter_and_is_never_accumulated(tiny_model_dir):
    spec = LoraSpec(rank=4, alpha=4.0, text_encoder=True, convs=True)
    client = attach_lora(load_model(tiny_model_dir), spec)
    plain = _outputs(client)
    g = torch.Generator().manual_seed(1)
    trained = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in get_adapter(client).items()} for _ in range(3)]
    stacked = agg.stack(trained, [1.0] * 3, [0.2, 0.3, 0.5])
    reference = attach_lora(load_model(tiny_model_dir), LoraSpec(rank=12, alpha=12.0, text_encoder=True, convs=True))
    set_adapter(reference, stacked)
    want = _outputs(reference)
    for _ in range(2):  # the same delta twice: recomputed from the loaded weights, not added again
        set_base_delta(client, stacked)
        got = _outputs(client)
        for a, b, p in zip(got, want, plain, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and not torch.allclose(a, p, atol=1e-3)
    set_base_delta(client, None)
    assert all(torch.equal(a, p) for a, p in zip(_outputs(client), plain, strict=True))


def _federate(out, data, model, strategy, *extra):
    args = ["federate", "--preset", "tiny", "--data", str(data), "--model", str(model), "--out", str(out)]
    assert main([*args, "--strategy", strategy, *extra]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == strategy and [r["round"] for r in m["rounds"]] == [1, 2]
    for r in m["rounds"]:
        assert r["seconds"] > 0 and math.isfinite(r["train_loss"])
    for cid, per in m["final"]["per_client"].items():
        for key in ("style_acc", "class_acc", "fid", "kid", "alignment"):
            assert math.isfinite(per[key]), (cid, key)
    return m


def test_federate_flora_sends_the_growing_stack(tmp_path, tiny_data, tiny_model_dir):
    m = _federate(tmp_path / "run", tiny_data, tiny_model_dir, "flora", "--num-clients", "2", "--steps", "1")
    assert m["rounds"][0]["bytes_down"] == 0 < m["rounds"][1]["bytes_down"]  # round 1: nothing merged yet
    assert set(m["final"]["per_client"]) == {"0", "1"}
    stack = load_file(str(tmp_path / "run" / "adapters" / "global.safetensors"))
    assert next(v.shape[0] for k, v in stack.items() if k.endswith("lora_A.weight")) == 2 * 4 * 2  # clients x rank x rounds


def test_federate_central_pools_each_domain(tmp_path, tiny_data, tiny_model_dir):
    m = _federate(tmp_path / "run", tiny_data, tiny_model_dir, "central", "--num-clients", "5")
    clusters = m["rounds"][-1]["clusters"]
    assert len(set(clusters.values())) == 4 and clusters["0"] == clusters["4"]  # clients 0 and 4: the same domain
    assert all(r["bytes_up"] == 0 == r["bytes_down"] for r in m["rounds"])
    assert m["clustering"]["ari"] == 1.0
    a, b = (load_file(str(tmp_path / "run" / "adapters" / f"client_{c}.safetensors")) for c in (0, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one adapter, two clients: each draws its own noises, so the domain is scored on twice the images
    made = [sorted((tmp_path / "run" / "samples" / f"client_{c}").glob("*.png")) for c in (0, 4)]
    assert made[0] and all(x.read_bytes() != y.read_bytes() for x, y in zip(*made, strict=True))
