"""Hybrid inference: the split sampler, per-request cluster mixtures, the service and the device."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from serving import free_port, running_service

from fedaigc.cli import main
from fedaigc.client.adapter import attach_lora, expected_shapes, set_adapter
from fedaigc.client.tokens import PrivateToken
from fedaigc.errors import UserError
from fedaigc.inference.auth import write_new_tokens
from fedaigc.inference.device import InferenceServer, generate, personal_model
from fedaigc.inference.mixing import ClusterMixer
from fedaigc.inference.sampler import SplitState, finish, first_steps
from fedaigc.inference.service import Limits, create_app, serving
from fedaigc.model.base import load_model
from fedaigc.model.sampling import generate as generate_local
from fedaigc.protocol.adapter_files import save_adapter
from fedaigc.protocol.lora import LoraSpec
from fedaigc.server import aggregation as agg

SPEC = LoraSpec(rank=2, alpha=2.0)


@pytest.fixture(scope="module")
def cluster_run(tiny_model_dir, tmp_path_factory):
    """A run's adapters folder with two clusters of random, clearly non-zero LoRAs, their 50/50
    global stack, clusters.json, and one device's style token whose slot is cluster 0's embedding."""
    out = tmp_path_factory.mktemp("run") / "adapters"
    out.mkdir()
    model = attach_lora(load_model(tiny_model_dir), SPEC)
    g = torch.Generator().manual_seed(0)
    adapters = [{k: 0.3 * torch.randn(s, generator=g) for k, s in expected_shapes(model).items()} for _ in range(2)]
    for k, ad in enumerate(adapters):
        save_adapter(out / f"cluster_{k}.safetensors", ad, SPEC)
    stacked = agg.stack(adapters, [SPEC.alpha / SPEC.rank] * 2, [0.5, 0.5])
    save_adapter(out / "global.safetensors", stacked, LoraSpec(2 * SPEC.rank, 2.0 * SPEC.rank))
    dim = model.text_encoder.get_input_embeddings().weight.shape[1]
    embeddings = [torch.randn(dim, generator=g) for _ in range(2)]
    clusters = {str(k): {"members": [k], "share": 0.5, "embedding": e.tolist()} for k, e in enumerate(embeddings)}
    (out / "clusters.json").write_text(json.dumps({"strategy": "cluster", "tau": 0.1, "clusters": clusters}))
    device = load_model(tiny_model_dir)
    PrivateToken(device, "<u0042>", embeddings[0]).save(out.parent / "style_token.safetensors")
    return out


def _unet(model, weights=None, mixer=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *model.latent_shape), generator=g).to(model.device)
    ctx = torch.randn(2, 12, model.unet.config.cross_attention_dim, generator=g).to(model.device)
    with torch.no_grad():
        if mixer is None:
            return model.unet(x, 500, encoder_hidden_states=ctx).sample.cpu()
        with mixer.weights(weights):
            return model.unet(x, 500, encoder_hidden_states=ctx).sample.cpu()


def test_split_run_through_bytes_equals_the_unsplit_run(tiny_model_dir, cluster_run):
    model = attach_lora(load_model(tiny_model_dir), SPEC)
    set_adapter(model, _file(cluster_run / "cluster_0.safetensors"))
    prompts = ["a picture of a star", "a picture of a fish"]
    whole = generate_local(model, prompts, [3, 4], num_steps=10, progress=False)
    cond, uncond = model.encode_prompts(prompts), model.encode_prompts([""])
    state = SplitState.from_bytes(first_steps(model, cond, uncond, [3, 4], 10, 0.3).to_bytes())
    assert state.step == 3 and state.num_steps == 10
    split = finish(model, state, cond, uncond)
    assert (split - whole).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="split-sampler"):
        SplitState.from_bytes(b"\x08" + bytes(20))


def test_one_hot_request_is_the_cluster_adapter_and_half_half_is_the_stack(tiny_model_dir, cluster_run):
    mixed = load_model(tiny_model_dir)
    mixer = ClusterMixer(mixed, cluster_run)
    assert mixer.names == ["cluster_0", "cluster_1", "global"]
    own = attach_lora(load_model(tiny_model_dir), SPEC)
    set_adapter(own, _file(cluster_run / "cluster_1.safetensors"))
    base = _unet(load_model(tiny_model_dir))
    one_hot = _unet(mixed, mixer.cluster_weights([0.0, 1.0]).expand(2, -1), mixer)
    assert (one_hot - _unet(own)).abs().max() < 1e-5
    assert (one_hot - base).abs().max() > 1e-2  # the adapters do change the output
    half = _unet(mixed, mixer.cluster_weights([0.5, 0.5]).expand(2, -1), mixer)
    assert (half - _unet(mixed, mixer.global_weights().expand(2, -1), mixer)).abs().max() < 1e-5
    # one batch with a different mixture per sample = each sample run alone
    per_sample = torch.stack([mixer.cluster_weights([1.0, 0.0]), mixer.cluster_weights([0.5, 0.5])])
    batched = _unet(mixed, per_sample, mixer)
    alone = _unet(mixed, mixer.cluster_weights([1.0, 0.0]).expand(2, -1), mixer)
    assert (batched[0] - alone[0]).abs().max() < 1e-5 and (batched[1] - half[1]).abs().max() < 1e-5
    # mix=base: every LoRA layer off for an all-base batch, a zero weight for a base row beside others
    assert torch.equal(_unet(mixed, mixer.base_weights().expand(2, -1), mixer), base)
    with_base = _unet(mixed, torch.stack([mixer.base_weights(), mixer.cluster_weights([0.0, 1.0])]), mixer)
    assert (with_base[0] - base[0]).abs().max() < 1e-5 and (with_base[1] - one_hot[1]).abs().max() < 1e-5
    assert mixer.uniform_weights().tolist() == [0.5, 0.5, 0.0] and mixer.uniform_weights([1]).tolist() == [0.0, 1.0, 0.0]


def test_request_weights_follow_the_task_embedding(tiny_model_dir, cluster_run):
    mixer = ClusterMixer(load_model(tiny_model_dir), cluster_run)
    e0, e1 = mixer.embeddings[0], mixer.embeddings[1]
    w0, w1 = mixer.request_weights(e0 + 0.05 * e1), mixer.request_weights(e1)
    assert w0[0] > 0.99 and w1[1] > 0.99 and w0[2] == 0 == w1[2]  # the global stack is not used
    with pytest.raises(ValueError, match="task_embedding"):
        mixer.request_weights(torch.zeros(3))


def _file(path):
    from fedaigc.protocol.adapter_files import read_adapter_file

    return read_adapter_file(path)


@pytest.fixture(scope="module")
def service(tiny_model_dir, cluster_run, tmp_path_factory):
    """`fedaigc serve` as a user starts it, on a random port, with a small body limit."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    token = write_new_tokens(tokens, 2)["client-0"]
    args = ["--model", str(tiny_model_dir), "--adapters", str(cluster_run), "--tokens", str(tokens)]
    with running_service(*args, "--max-body-kb", "64", "--window-ms", "50") as url:
        yield url, token


def test_generate_through_the_service_at_split_0_3(service, tiny_model_dir, cluster_run, tmp_path):
    url, token = service
    adapter, style = cluster_run / "cluster_0.safetensors", cluster_run.parent / "style_token.safetensors"
    args = ["generate", "--preset", "tiny", "--model", str(tiny_model_dir), "--adapter", str(adapter)]
    args += ["--style-token", str(style), "--prompt", "a <style> of a star", "--seed", "5", "--steps", "10"]
    assert main([*args, "--server", url, "--token", token, "--split", "0.3", "--out", str(tmp_path / "hybrid.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "local.png")]) == 0
    hybrid = np.asarray(Image.open(tmp_path / "hybrid.png"), dtype=np.int16)
    local = np.asarray(Image.open(tmp_path / "local.png"), dtype=np.int16)
    assert hybrid.shape == (32, 32, 3) and hybrid.std() > 1
    # this device's slot is cluster 0's domain embedding, so the server ran cluster 0's adapter:
    # the same image as running all ten steps locally with it (up to PNG rounding)
    assert np.abs(hybrid - local).max() <= 1
    assert main([*args, "--server", url, "--token", "wrong" * 4, "--out", str(tmp_path / "x.png")]) == 1


def test_bad_requests_get_4xx_and_the_service_keeps_serving(service, tiny_model_dir):
    url, token = service
    auth = {"Authorization": f"Bearer {token}"}
    model = load_model(tiny_model_dir)
    cond, uncond = model.encode_prompts(["a picture of a star"]), model.encode_prompts([""])
    good = {"cond": cond, "uncond": uncond}
    nan = cond.clone()
    nan[0, 0, 0] = float("nan")
    cases = {
        "no token": (401, {}, save_tensors(good), {}),
        "wrong token": (401, {"Authorization": "Bearer nope"}, save_tensors(good), {}),
        "malformed body": (400, auth, b"\x00\x01not safetensors", {}),
        "oversized body": (413, auth, bytes(100 * 1024), {}),
        "wrong shape": (422, auth, save_tensors({"cond": torch.zeros(1, 12, 10), "uncond": torch.zeros(1, 12, 10)}), {}),
        "NaN": (422, auth, save_tensors({"cond": nan, "uncond": uncond}), {}),
        "unknown tensor": (422, auth, save_tensors({**good, "prompt_text": torch.zeros(3)}), {}),
        "missing uncond": (422, auth, save_tensors({"cond": cond}), {}),
        "too many steps": (422, auth, save_tensors(good), {"steps": 10_000}),
        "split too large": (422, auth, save_tensors(good), {"split": 0.9}),
        "wrong number of weights": (422, auth, save_tensors({**good, "weights": torch.ones(5)}), {}),
        "negative weights": (422, auth, save_tensors({**good, "weights": torch.tensor([-1.0, 2.0])}), {}),
        "auto without an embedding": (422, auth, save_tensors(good), {}),
        "embedding with mix=base": (422, auth, save_tensors({**good, "task_embedding": torch.ones(3)}), {"mix": "base"}),
        "unknown mix": (422, auth, save_tensors(good), {"mix": "cluster"}),
    }
    for name, (status, headers, body, params) in cases.items():
        r = httpx.post(f"{url}/v1/denoise", headers=headers, content=body, params={"steps": 4, **params}, timeout=30)
        assert r.status_code == status, (name, r.text)
        assert "detail" in r.json(), name
    params = {"steps": 4, "split": 0.5, "mix": "global"}
    r = httpx.post(f"{url}/v1/denoise", headers=auth, content=save_tensors(good), params=params, timeout=30)
    assert r.status_code == 200
    reply = load_tensors(r.content)
    assert reply["latents"].shape == (1, *model.latent_shape) and int(reply["step"]) == 2
    assert torch.allclose(reply["weights"], torch.tensor([0.0, 0.0, 1.0]))  # the global stack
    metrics = httpx.get(f"{url}/metrics", headers=auth, timeout=5).json()
    assert metrics["responses_by_status"]["422"] >= 8 and metrics["requests"] >= 1


def test_each_mix_runs_its_adapters_and_only_auto_sends_the_embedding(tiny_model_dir, cluster_run, capsys):
    """base = the base model's steps, global = the global stack, uniform = equal cluster weights, a
    one-hot auto request = its cluster's adapter; the device's body carries no embedding but in auto."""
    served = load_model(tiny_model_dir)
    token = "m" * 20
    device = personal_model(tiny_model_dir, cluster_run / "cluster_0.safetensors", cluster_run.parent / "style_token.safetensors")
    cond, uncond = device.encode(["a <style> of a star"])
    with serving(create_app(served, ClusterMixer(served, cluster_run), {token: "c"})) as url:
        remote = InferenceServer(url, token)
        sent = []
        remote.http.event_hooks["request"].append(lambda request: sent.append(request))

        def server_steps(mix, **kw):
            return remote.first_steps(cond, uncond, 4, 6, 0.5, 3.0, mix=mix, **kw).latents

        def local_steps(adapter=None, spec=SPEC):
            model = load_model(tiny_model_dir)
            if adapter is not None:
                set_adapter(attach_lora(model, spec), _file(cluster_run / adapter))
            return first_steps(model, cond, uncond, [4], 6, 0.5).latents

        assert torch.equal(server_steps("base"), local_steps())
        stack = LoraSpec(2 * SPEC.rank, 2.0 * SPEC.rank)
        assert (server_steps("global") - local_steps("global.safetensors", stack)).abs().max() < 1e-5
        assert (server_steps("auto", weights=[0.0, 1.0]) - local_steps("cluster_1.safetensors")).abs().max() < 1e-5
        body = {"cond": cond, "uncond": uncond}
        for mix, weights in (("global", [0, 0, 1]), ("uniform", [0.5, 0.5, 0]), ("base", [0, 0, 0])):
            reply = httpx.post(
                f"{url}/v1/denoise", params={"steps": 6, "mix": mix}, content=save_tensors(body), headers=remote.http.headers
            )
            assert load_tensors(reply.content)["weights"].tolist() == weights, mix
        r = httpx.post(f"{url}/v1/denoise", params={"steps": 6}, content=save_tensors(body), headers=remote.http.headers)
        assert r.status_code == 422 and "mix=auto needs the request's 'task_embedding'" in r.json()["detail"]
        sent.clear()
        for mix in ("global", "base", "uniform", "auto"):
            generate(device, ["a <style> of a star"], 4, 6, 3.0, remote, 0.5, mix=mix)
        bodies = [(r.url.params["mix"], set(load_tensors(r.content))) for r in sent if r.url.path == "/v1/denoise"]
        assert bodies == [(m, {"cond", "uncond"}) for m in ("global", "base", "uniform")] + [
            ("auto", {"cond", "uncond", "task_embedding"})
        ]
        tokenless = personal_model(tiny_model_dir, cluster_run / "cluster_0.safetensors")
        with pytest.raises(UserError, match="mix=auto sends your task embedding"):
            generate(tokenless, ["a star"], 4, 6, 3.0, remote, 0.5)
        with pytest.raises(UserError, match="explicit cluster weights"):
            generate(device, ["a star"], 4, 6, 3.0, remote, 0.5, weights=[1.0, 0.0], mix="global")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--mix {auto,global,base,uniform}" in usage and all(f"{m}: " in usage for m in ("auto", "global", "base", "uniform"))


def test_concurrent_requests_are_batched_and_match_single_runs(tiny_model_dir, cluster_run):
    model = load_model(tiny_model_dir)
    mixer = ClusterMixer(model, cluster_run)
    token = "t" * 20
    port = free_port()
    app = create_app(model, mixer, {token: "client-0"}, Limits(window_s=0.3))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws="none", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        remote = InferenceServer(f"http://127.0.0.1:{port}", token)
        cond, uncond = model.encode_prompts(["a picture of a moon"]), model.encode_prompts([""])
        weights = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]] * 2

        def ask(i):
            return remote.first_steps(cond, uncond, i, 6, 0.5, 3.0, weights=weights[i]).latents

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(8)))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}).json()
        assert metrics["requests"] == 8 and metrics["batches"] < 8 and metrics["mean_batch_images"] > 1
        for i in (0, 3, 6):
            assert (ask(i) - together[i]).abs().max() < 1e-5  # alone = inside a batch
        assert (together[0] - together[1]).abs().max() > 1e-3  # the mixtures do differ
        many = remote.first_steps(cond.expand(20, -1, -1), uncond, 0, 6, 0.5, 3.0, weights=weights[3]).latents
        assert many.shape[0] == 20 and (many[3] - together[3]).abs().max() < 1e-5  # split into requests of <= 16
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_device_generate_without_server_is_the_local_sampler(tiny_model_dir, cluster_run):
    device = personal_model(tiny_model_dir, cluster_run / "cluster_1.safetensors", cluster_run.parent / "style_token.safetensors")
    assert device.prompt("a <style> of a fish") == "a <u0042> of a fish"
    result = generate(device, ["a <style> of a fish"] * 2, 7, 5, 3.0)
    expected = generate_local(device.model, ["a <u0042> of a fish"] * 2, [7, 8], num_steps=5, progress=False)
    assert result.server_steps == 0 and (result.images - expected).abs().max() < 1e-5


def test_serve_refuses_a_missing_tokens_file(tmp_path, capsys):
    assert main(["serve", "--tokens", str(tmp_path / "none.txt")]) == 2
    assert "--new-tokens" in capsys.readouterr().err


def test_new_tokens_can_be_passed_as_an_option_value(tmp_path):
    """A token that starts with "-" reads as an option to argparse (`--token -x...`: "expected one
    argument"); one URL-safe token in 64 did, and failed a hybrid run now and then."""
    tokens = list(write_new_tokens(tmp_path / "tokens.txt", 500).values())
    assert len(set(tokens)) == 500 and all(len(t) >= 32 and not t.startswith("-") for t in tokens)
