"""`fedaigc serve` and the files `serve` and `generate` read, tried as an attacker would: crafted
bodies and files, slow, greedy and vanishing clients, stolen token files, an HTTP fuzz test."""

import json
import os
import shutil
import socket
import stat
import time
from dataclasses import asdict

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_tensors
from sd_tiny import write_tiny_sd
from test_inference import SPEC, cluster_run  # noqa: F401 (a fixture)

from fedaigc.cli import main
from fedaigc.client.adapter import attach_lora, expected_shapes
from fedaigc.errors import UserError
from fedaigc.inference import auth
from fedaigc.inference.auth import Client, TokenStore, read_tokens, token_digest, write_new_tokens
from fedaigc.inference.device import InferenceServer
from fedaigc.inference.mixing import ClusterMixer
from fedaigc.inference.sampler import first_steps
from fedaigc.inference.service import Limits, create_app, serving
from fedaigc.model.base import load_model
from fedaigc.protocol.adapter_files import save_adapter

FULL, SCOPED, OTHER = "full-token-" + "a" * 20, "scoped-token-" + "b" * 20, "other-token-" + "c" * 20


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _store() -> TokenStore:
    return TokenStore(
        [
            Client("full", token_digest(FULL)),
            Client("scoped", token_digest(SCOPED), frozenset({1})),
            Client("other", token_digest(OTHER)),
        ]
    )


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, cluster_run):  # noqa: F811
    """A service with the two-cluster run's adapters and small request limits (the fuzz test's)."""
    model = load_model(tiny_model_dir)
    limits = Limits(max_steps=8, max_images=4, max_body_bytes=256 << 10, rate_per_token=1e4, burst_per_token=10_000)
    with serving(create_app(model, ClusterMixer(model, cluster_run), _store(), limits)) as url:
        yield url, model


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture
def plain(base_model):
    """Start a base-model service with the given limits: plain(limits) -> url."""
    with_limits = []

    def start(limits: Limits) -> str:
        ctx = serving(create_app(base_model, None, _store(), limits), limits=limits)
        with_limits.append(ctx)
        return ctx.__enter__()

    yield start
    for ctx in with_limits:
        ctx.__exit__(None, None, None)


def _prompt(model, n: int = 1):
    cond = model.encode_prompts(["a picture of a star"] * n)
    return {"cond": cond, "uncond": model.encode_prompts([""])}


def _post(url, token=FULL, body=b"", timeout=60, **params):
    return httpx.post(f"{url}/v1/denoise", headers=_auth(token), content=body, params={"steps": 4, **params}, timeout=timeout)


# bodies -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, name",
    [
        (torch.float8_e4m3fn, "F8_E4M3"),
        (torch.float8_e4m3fnuz, "F8_E4M3FNUZ"),
        (torch.float8_e5m2, "F8_E5M2"),
        (torch.float8_e5m2fnuz, "F8_E5M2FNUZ"),
        (torch.int64, "I64"),
        (torch.bool, "BOOL"),
    ],
)
def test_a_body_tensor_of_another_dtype_is_a_422_naming_it(mixed, dtype, name):
    url, model = mixed
    body = save_tensors({k: v.to(dtype) for k, v in _prompt(model).items()})
    r = _post(url, body=body)
    assert r.status_code == 422 and name in r.json()["detail"], r.text


def test_an_unknown_dtype_string_is_a_4xx(mixed):
    header = json.dumps({"cond": {"dtype": "F4", "shape": [1, 2, 4], "data_offsets": [0, 4]}}).encode()
    r = _post(mixed[0], body=len(header).to_bytes(8, "little") + header + bytes(4))
    assert 400 <= r.status_code < 500, r.text


def test_huge_finite_states_never_give_a_non_finite_latent(mixed, plain):
    url, model = mixed
    huge = {k: torch.full_like(v, 3e38) for k, v in _prompt(model).items()}
    r = _post(url, body=save_tensors(huge))
    assert r.status_code == 422 and "magnitude" in r.json()["detail"]
    # a server that accepts any finite entry still answers no non-finite latent
    lax = plain(Limits(max_abs_value=float("inf")))
    r = _post(lax, body=save_tensors(huge))
    assert r.status_code == 422 and "non-finite" in r.json()["detail"], r.text


def test_float16_prompt_states_travel_and_give_the_float32_result(mixed):
    url, model = mixed
    prompt = _prompt(model, 2)
    exact = InferenceServer(url, FULL).first_steps(prompt["cond"], prompt["uncond"], 3, 6, 0.5, 3.0, mix="global")
    half = InferenceServer(url, FULL, prompt_dtype=torch.float16).first_steps(
        prompt["cond"], prompt["uncond"], 3, 6, 0.5, 3.0, mix="global"
    )
    assert half.latents.shape == exact.latents.shape and (half.latents - exact.latents).abs().max() < 5e-2


# limits -------------------------------------------------------------------------------------------
def test_the_server_never_runs_the_whole_schedule_and_limits_absolute_steps(mixed):
    url, model = mixed
    body = save_tensors(_prompt(model))
    r = _post(url, body=body, steps=1, split=0.01)
    assert r.status_code == 422 and "at most 0" in r.json()["detail"]
    r = _post(url, body=body, steps=3, split=0.5, mix="global")
    assert r.status_code == 200 and int(load_tensors(r.content)["step"]) == 2
    assert Limits(max_server_steps=5).server_steps(100) == 5 and Limits(max_split=1.0).server_steps(4) == 4
    limits = httpx.get(f"{url}/v1/limits", headers=_auth(FULL)).json()
    assert (
        limits["max_images"] == 4
        and limits["max_server_steps"] == 50
        and limits["hidden_size"] == model.unet.config.cross_attention_dim
    )
    assert limits["adapters"] == ["cluster_0", "cluster_1", "global"]


def test_the_default_limits_fit_16_sd15_images_and_the_device_splits_to_the_advertised_ones(plain, base_model):
    sd15 = {"cond": torch.zeros(16, 77, 768), "uncond": torch.zeros(16, 77, 768)}
    assert len(save_tensors(sd15)) <= Limits().max_body_bytes
    device = InferenceServer("http://unused", FULL)
    device._limits = asdict(Limits())
    assert device.images_per_request(sd15["cond"], sd15["uncond"]) == 16
    # a service with a small body limit: the device sends 2 images a request and gets the same latents
    prompt = _prompt(base_model, 5)
    per_image = prompt["cond"][0].numel() * 4
    url = plain(Limits(max_body_bytes=InferenceServer.HEADER_BYTES + 3 * per_image))
    remote = InferenceServer(url, FULL)
    assert remote.images_per_request(prompt["cond"], prompt["uncond"]) == 2
    got = remote.first_steps(prompt["cond"], prompt["uncond"], 11, 6, 0.5, 3.0)
    local = first_steps(base_model, prompt["cond"], prompt["uncond"], list(range(11, 16)), 6, 0.5)
    assert got.latents.shape[0] == 5 and (got.latents - local.latents).abs().max() < 1e-4


def test_queued_images_are_bounded_429_with_retry_after(plain, base_model):
    url = plain(Limits(max_queued_images=4, max_images=4, max_batch=4, max_steps=100))
    port = int(url.rsplit(":", 1)[1])
    body = save_tensors(_prompt(base_model, 4))
    head = f"POST /v1/denoise?steps=100&split=0.5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FULL}\r\n"
    long = socket.create_connection(("127.0.0.1", port))
    long.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        metrics = {}
        for _ in range(100):
            metrics = httpx.get(f"{url}/metrics", headers=_auth(FULL)).json()
            if metrics["queued_images"] == 4:
                break
            time.sleep(0.05)
        assert metrics["queued_images"] == 4
        r = _post(url, body=save_tensors(_prompt(base_model)))
        assert r.status_code == 429 and r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
    finally:
        long.close()  # and the abandoned work is dropped (next test)


def test_the_work_of_a_client_that_went_away_is_cancelled(plain, base_model):
    url = plain(Limits(max_steps=100, max_images=16, window_s=0.001))
    with pytest.raises(httpx.ReadTimeout):  # 16 images x 50 steps, abandoned after 0.5 s
        _post(url, body=save_tensors(_prompt(base_model, 16)), timeout=0.5, steps=100, split=0.5)
    t0 = time.perf_counter()
    r = _post(url, body=save_tensors(_prompt(base_model)), steps=4, split=0.5)
    waited = time.perf_counter() - t0
    metrics = httpx.get(f"{url}/metrics", headers=_auth(FULL)).json()
    assert r.status_code == 200 and metrics["cancelled_images"] == 16 and metrics["images"] == 1
    assert metrics["queued_images"] == 0
    assert waited < 5.0, waited  # the abandoned batch (50 steps of 16 images) left at its next step


def test_slow_and_silent_connections_are_closed_after_the_read_timeout(plain):
    url = plain(Limits(read_timeout_s=0.5))
    port = int(url.rsplit(":", 1)[1])
    sends = [
        b"",  # nothing at all
        b"POST /v1/denoise HTTP/1.1\r\nHost: x\r\n",  # unfinished headers
        f"POST /v1/denoise HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FULL}\r\nContent-Length: 1000\r\n\r\n".encode()
        + bytes(10),
    ]
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in sends]
    for conn, data in zip(conns, sends, strict=True):
        conn.sendall(data)
        conn.settimeout(5)
    t0 = time.monotonic()
    for _ in range(15):  # drip a byte now and then: it must not keep a connection open
        for conn in conns[1:]:
            try:
                conn.sendall(b"X")
            except OSError:
                pass
        time.sleep(0.1)
    for conn in conns:
        try:
            answer = conn.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", answer  # closed without an answer
        conn.close()
    assert time.monotonic() - t0 < 4
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}


def test_the_bodies_being_read_at_once_are_bounded(plain):
    url = plain(Limits(max_body_bytes=64 << 10, max_reading_bytes=128 << 10, read_timeout_s=5))
    port = int(url.rsplit(":", 1)[1])
    head = f"POST /v1/denoise HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FULL}\r\nContent-Length: {64 << 10}\r\n\r\n"
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        for conn in stalled:
            conn.sendall(head.encode() + bytes(100))
        time.sleep(0.3)
        r = _post(url, body=bytes(1000))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        for conn in stalled:
            conn.close()
    time.sleep(0.2)
    assert _post(url, body=bytes(1000)).status_code == 400  # read again once the stalled bodies are gone


def test_each_token_has_its_own_request_rate(plain):
    url = plain(Limits(rate_per_token=0.5, burst_per_token=2))
    codes = [_post(url, body=b"x").status_code for _ in range(3)]
    assert codes == [400, 400, 429]
    r = _post(url, body=b"x")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert _post(url, OTHER, body=b"x").status_code == 400  # another token is not slowed down


def test_metrics_need_a_token_and_the_docs_are_off_unless_asked(base_model):
    with TestClient(create_app(base_model, None, {FULL: "c"})) as c:
        assert c.get("/metrics").status_code == 401 and c.get("/v1/limits").status_code == 401
        assert c.get("/metrics", headers=_auth(FULL)).status_code == 200
        assert all(c.get(p).status_code == 404 for p in ("/docs", "/redoc", "/openapi.json"))
        assert c.get("/healthz").json() == {"status": "ok"}
    with TestClient(create_app(base_model, None, {FULL: "c"}, docs=True)) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200


# tokens -------------------------------------------------------------------------------------------
def test_the_tokens_file_holds_hashes_created_0600_compared_in_constant_time(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        tokens = write_new_tokens(tmp_path / "tokens.txt", 3)
    finally:
        os.umask(old)
    path = tmp_path / "tokens.txt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert all(t not in text for t in tokens.values()) and text.count("sha256:") == 3
    store = TokenStore(read_tokens(path))
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert store.find(tokens["client-0"]).name == "client-0" and len(calls) == 3  # every digest compared, no early exit
    assert store.find("client-0") is None and store.find(token_digest(tokens["client-1"])) is None
    path.chmod(0o640)
    with pytest.raises(UserError, match="readable by group or others"):
        read_tokens(path)
    plaintext = tmp_path / "old.txt"
    plaintext.write_text("client-0 " + "x" * 48 + "\n")
    plaintext.chmod(0o600)
    with pytest.raises(UserError, match="hashes of the tokens"):
        read_tokens(plaintext)


def test_serve_new_tokens_prints_them_once_and_refuses_bad_counts_and_ports(tmp_path, capsys):
    path = tmp_path / "tokens.txt"
    assert main(["serve", "--tokens", str(path), "--new-tokens", "2", "--clusters", "1"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    clients = read_tokens(path)
    assert set(printed) == {"client-0", "client-1"} and all(c.clusters == frozenset({1}) for c in clients)
    assert TokenStore(clients).find(printed["client-1"]).name == "client-1"
    for args, message in [
        (["--new-tokens", "2"], "exists"),
        (["--new-tokens", "0"], "--new-tokens must be between 1"),
        (["--new-tokens", "-1"], "--new-tokens must be between 1"),
        (["--new-tokens", "1", "--clusters", "a"], "--clusters"),
        (["--port", "99999"], "--port must be in 1-65535"),
        (["--rate", "nan"], "--rate"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ]:
        target = path if message == "exists" else tmp_path / "new.txt"
        assert main(["serve", "--tokens", str(target), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "new.txt").exists()


def test_a_token_may_use_only_its_clusters(mixed, cluster_run):  # noqa: F811
    url, model = mixed
    prompt = _prompt(model)
    mixer_embedding = torch.tensor(json.loads((cluster_run / "clusters.json").read_text())["clusters"]["0"]["embedding"])
    r = _post(url, SCOPED, body=save_tensors({**prompt, "weights": torch.tensor([1.0, 0.0])}))
    assert r.status_code == 403
    r = _post(url, SCOPED, body=save_tensors({**prompt, "weights": torch.tensor([0.0, 1.0])}))
    assert r.status_code == 200 and load_tensors(r.content)["weights"].tolist() == [0.0, 1.0, 0.0]
    for body, mix in ((prompt, "global"), (prompt, "uniform"), ({**prompt, "task_embedding": mixer_embedding}, "auto")):
        r = _post(url, SCOPED, body=save_tensors(body), mix=mix)  # auto: even when its embedding points to cluster 0
        assert r.status_code == 200 and load_tensors(r.content)["weights"].tolist() == [0.0, 1.0, 0.0], mix
    r = _post(url, FULL, body=save_tensors({**prompt, "task_embedding": mixer_embedding}))
    assert load_tensors(r.content)["weights"][0] > 0.99
    assert httpx.get(f"{url}/v1/limits", headers=_auth(SCOPED)).json()["adapters"] == ["cluster_1"]


# files read at serve start ------------------------------------------------------------------------
CLUSTERS = {
    "empty": ("", "not valid JSON"),
    "garbage": ("{not json", "not valid JSON"),
    "list": ("[1, 2]", "expected an object"),
    "missing share": ('{"clusters": {"0": {"embedding": [1.0]}}}', "expected an integer id and an object with 'share'"),
    "missing clusters": ('{"tau": 0.1}', "expected an object"),
    "string embedding": ('{"clusters": {"0": {"share": 1.0, "embedding": "abc"}}}', "embedding must be a list of numbers"),
    "tau abc": ('{"tau": "abc", "clusters": {"0": {"share": 1.0}}}', "tau must be a finite number"),
    "tau 0": ('{"tau": 0, "clusters": {"0": {"share": 1.0}}}', "tau must be > 0"),
    "wrong length": (
        '{"clusters": {"0": {"share": 0.5, "embedding": [1.0, 2.0]}, "1": {"share": 0.5, "embedding": [1.0]}}}',
        "embeddings of different lengths",
    ),
    "nan share": ('{"clusters": {"0": {"share": NaN}}}', "share must be a finite number"),
}


@pytest.mark.parametrize("case", CLUSTERS)
def test_a_garbage_clusters_json_is_refused_at_start(case, base_model, tmp_path):
    text, message = CLUSTERS[case]
    (tmp_path / "clusters.json").write_text(text)
    with pytest.raises(UserError, match=message):
        ClusterMixer(base_model, tmp_path)  # refused before any adapter is loaded: the model is untouched


def test_serve_with_a_garbage_clusters_json_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "clusters.json").write_text("[]")
    write_new_tokens(tmp_path / "tokens.txt", 1)
    args = ["serve", "--model", str(tiny_model_dir), "--adapters", str(tmp_path), "--tokens", str(tmp_path / "tokens.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "clusters.json" in err and len(err.splitlines()) == 1


def _crafted(tensors: dict, case: str) -> dict:
    """An adapter's tensors damaged as `case` says."""
    key = sorted(k for k in tensors if k.startswith("unet.") and k.endswith("to_q.lora_A.weight"))[0]
    module = key.removesuffix(".lora_A.weight")
    if case == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    if case == "int64":
        return {k: v.to(torch.int64) for k, v in tensors.items()}
    if case == "1e30":
        return {k: torch.full_like(v, 1e30) for k, v in tensors.items()}
    if case == "missing layer":
        return {k: v for k, v in tensors.items() if not k.startswith(module + ".")}
    if case == "renamed layer":
        return {(k.replace(module, module + "x") if k.startswith(module + ".") else k): v for k, v in tensors.items()}
    raise ValueError(case)


def _flip_data_bytes(path, n: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(len(data) - 8000, len(data)), n, replace=False):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["nan", "int64", "1e30", "missing layer", "renamed layer", "flipped bytes"])
def test_a_bad_cluster_adapter_is_refused_at_serve_start(case, tiny_model_dir, cluster_run, tmp_path):  # noqa: F811
    source = cluster_run / "cluster_0.safetensors"
    target = tmp_path / "cluster_0.safetensors"
    if case == "flipped bytes":
        shutil.copy(source, target)
        _flip_data_bytes(target)
    else:
        save_adapter(target, _crafted(load_file(str(source)), case), SPEC)
    (tmp_path / "clusters.json").write_text('{"tau": 0.1, "clusters": {"0": {"share": 1.0}}}')
    message = {
        "nan": "NaN",
        "int64": "not floating point",
        "1e30": "beyond",
        "missing layer": "lacks tensor",
        "renamed layer": "not a layer of this model",
        "flipped bytes": "content hash",
    }[case]
    with pytest.raises(UserError, match=message):
        ClusterMixer(load_model(tiny_model_dir), tmp_path)


def _with_metadata(source, target, **changes) -> None:
    with safe_open(str(source), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    lora = json.loads(meta["lora_adapter_metadata"]) | changes
    save_file(tensors, str(target), metadata=meta | {"lora_adapter_metadata": json.dumps(lora)})


@pytest.mark.parametrize(
    "case, message",
    [
        ("rank x", "unet.r must be an integer"),
        ("rank -1", "unet.r must be an integer"),
        ("rank 0", "unet.r must be an integer"),
        ("alpha nan", "lora_alpha must be a positive number"),
        ("int64 adapter", "not floating point"),
        ("1e30 adapter", "beyond"),
        ("flipped bytes", "content hash"),
        ("empty token name", "token name '' is empty"),
        ("int token", "not floating point"),
    ],
)
def test_generate_refuses_crafted_files_with_one_line(case, message, tiny_model_dir, cluster_run, tmp_path, capsys):  # noqa: F811
    adapter, style = cluster_run / "cluster_0.safetensors", cluster_run.parent / "style_token.safetensors"
    bad = tmp_path / "bad.safetensors"
    ((name, slot),) = load_file(str(style)).items()
    if case.startswith(("rank", "alpha")):
        value = {"rank x": "x", "rank -1": -1, "rank 0": 0}.get(case)
        _with_metadata(adapter, bad, **({"unet.r": value} if value is not None else {"unet.lora_alpha": float("nan")}))
        adapter = bad
    elif case.endswith("adapter"):
        save_adapter(bad, _crafted(load_file(str(adapter)), case.split()[0]), SPEC)
        adapter = bad
    elif case == "flipped bytes":
        shutil.copy(adapter, bad)
        _flip_data_bytes(bad)
        adapter = bad
    else:
        token = {"empty token name": {"": slot}, "int token": {name: slot.to(torch.int64)}}
        save_file(token[case], str(bad))
        style = bad
    out = tmp_path / "x.png"
    args = [
        "generate",
        "--preset",
        "tiny",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter),
        "--style-token",
        str(style),
    ]
    assert main([*args, "--prompt", "a <style> of a star", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists(), err


# fuzz ---------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float8_e4m3fn]
VALUES = st.one_of(st.just(None), st.sampled_from([0.0, 1.0, -3.0, 1e4, 3e38, float("nan"), float("inf")]))


@st.composite
def tensors(draw, dim: int):
    names = draw(st.lists(st.sampled_from(["cond", "uncond", "task_embedding", "weights", "prompt"]), max_size=4, unique=True))
    out = {}
    for name in names:
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, dim, 80]), min_size=0, max_size=3))
        value = draw(VALUES)
        t = torch.randn(shape) if value is None else torch.full(shape, value)
        out[name] = t.to(draw(st.sampled_from(DTYPES)))
    return save_tensors(out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_the_service_no_5xx_no_bad_latent_healthy_after(mixed, data):
    url, model = mixed
    dim = model.unet.config.cross_attention_dim
    valid = _prompt(model, 2)
    body = data.draw(
        st.one_of(
            st.binary(max_size=64),
            tensors(dim),
            st.builds(
                lambda n, emb: save_tensors({"cond": valid["cond"][:n], "uncond": valid["uncond"], **emb}),
                st.integers(1, 2),
                st.sampled_from([{}, {"task_embedding": torch.randn(dim)}, {"weights": torch.rand(2)}]),
            ),
        )
    )
    number = st.one_of(st.integers(-3, 2**64), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
    keys = ["seed", "steps", "split", "guidance", "guidance_rescale", "mix"]
    params = data.draw(st.dictionaries(st.sampled_from(keys), st.one_of(number, st.sampled_from(["auto", "global", "1", "0.3"]))))
    token = data.draw(st.sampled_from([FULL, SCOPED, "nope"]))
    r = httpx.post(f"{url}/v1/denoise", headers=_auth(token), params=params, content=body, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text, params)
    if r.status_code == 200:
        reply = load_tensors(r.content)
        rows = load_tensors(body)["cond"].shape[0]
        assert reply["latents"].shape == (rows, *model.latent_shape) and torch.isfinite(reply["latents"]).all()
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


# a Stable-Diffusion-layout folder ------------------------------------------------------------------
def test_hybrid_generate_on_an_sd_layout_folder(tmp_path):
    root = write_tiny_sd(tmp_path / "sd")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    model = attach_lora(load_model(root, dtype="float32"), SPEC)
    g = torch.Generator().manual_seed(1)
    save_adapter(
        adapters / "cluster_0.safetensors",
        {k: 0.3 * torch.randn(s, generator=g) for k, s in expected_shapes(model).items()},
        SPEC,
    )
    (adapters / "clusters.json").write_text('{"tau": 0.1, "clusters": {"0": {"share": 1.0, "embedding": null}}}')
    served = load_model(root, dtype="float32")
    with serving(create_app(served, ClusterMixer(served, adapters), {FULL: "sd"})) as url:
        args = ["generate", "--preset", "tiny", "--model", str(root), "--adapter", str(adapters / "cluster_0.safetensors")]
        args += ["--prompt", "a star", "--seed", "3", "--steps", "6", "--n", "2"]
        hybrid_args = ["--server", url, "--token", FULL, "--split", "0.5", "--send-dtype", "float16", "--mix", "global"]
        assert main([*args, *hybrid_args, "--out", str(tmp_path / "hybrid.png")]) == 0
        metrics = httpx.get(f"{url}/metrics", headers=_auth(FULL)).json()
    assert main([*args, "--out", str(tmp_path / "local.png")]) == 0
    hybrid = np.asarray(Image.open(tmp_path / "hybrid.png"), dtype=np.int16)
    local = np.asarray(Image.open(tmp_path / "local.png"), dtype=np.int16)
    assert metrics["images"] == 2 and hybrid.shape == local.shape and np.abs(hybrid - local).max() <= 1
