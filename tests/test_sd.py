"""Stable-Diffusion-layout folders through fedaigc's real commands: stored fp32, fp16, fp16 variant
files only, SD-2-style v-prediction; the files a run writes opened by diffusers' own pipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from sd_tiny import write_tiny_sd
from serving import running_service

from fedaigc import config
from fedaigc.cli import main
from fedaigc.client.train import LocalClient
from fedaigc.errors import UserError
from fedaigc.inference.auth import write_new_tokens
from fedaigc.inference.device import generate, personal_model
from fedaigc.model.base import load_model
from fedaigc.model.recipe import EXTERNAL_RECIPE
from fedaigc.model.sampling import initial_noise

FOLDERS = {
    "fp32": {},
    "fp16": {"dtype": torch.float16},
    "fp16-variant": {"dtype": torch.float16, "variant": "fp16"},
    "sd2-v": {"family": "sd2"},
}


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {name: write_tiny_sd(root / name, **kw) for name, kw in FOLDERS.items()}


@pytest.mark.parametrize("name", FOLDERS)
def test_every_stored_dtype_and_variant_loads_in_the_asked_dtype_and_trains(sd_folders, name):
    if name == "fp16-variant":
        assert not list((sd_folders[name] / "unet").glob("diffusion_pytorch_model.safetensors"))
    model = load_model(sd_folders[name], "cpu")
    assert model.dtype == model.text_encoder.dtype == model.vae.dtype == torch.float32  # auto on the CPU
    assert model.image_size == 16 and model.latent_shape == (4, 8, 8)  # the model's size, not data.size (32)
    cfg = config.load("tiny", recipe=EXTERNAL_RECIPE).client
    images = torch.rand(4, 3, 16, 16)
    client = LocalClient(model, images, ["sketch"] * 4, ["star"] * 4, cfg, seed=0)
    before = client.model.unet(torch.zeros(1, 4, 8, 8), 500, encoder_hidden_states=torch.zeros(1, 16, 32)).sample
    upload = client.train_round(None, None, 2, torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(upload.train_loss))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in upload.lora.values())
    assert any(v.abs().max() > 0 for k, v in upload.lora.items() if "lora_B" in k)  # it learned something
    after = client.model.unet(torch.zeros(1, 4, 8, 8), 500, encoder_hidden_states=torch.zeros(1, 16, 32)).sample
    assert not torch.equal(before, after)


def test_bfloat16_keeps_lora_and_slot_in_float32_and_trains(sd_folders):
    model = load_model(sd_folders["fp16"], "cpu", dtype="bfloat16")
    assert model.dtype == model.text_encoder.dtype == model.vae.dtype == torch.bfloat16
    cfg = config.load("tiny", recipe=EXTERNAL_RECIPE).client
    client = LocalClient(model, torch.rand(4, 3, 16, 16), ["sketch"] * 4, ["star"] * 4, cfg, seed=0)
    upload = client.train_round(None, None, 2, torch.Generator().manual_seed(0))
    lora = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert upload.slot.dtype == torch.float32 and torch.isfinite(upload.slot).all()
    assert torch.isfinite(torch.tensor(upload.train_loss))


def test_latents_are_encoded_once_from_flipped_pixels(sd_folders, tiny_cfg):
    model = load_model(sd_folders["fp32"], "cpu")
    images = torch.rand(3, 3, 16, 16)
    client = LocalClient(model, images, ["photo"] * 3, ["star"] * 3, tiny_cfg.client, seed=0)
    plain, flipped = client.latents()
    assert client.latents()[0] is plain  # cached
    assert torch.allclose(plain, model.to_latent(images), atol=1e-6)  # the VAE mean: deterministic
    assert torch.allclose(flipped, model.to_latent(images.flip(-1)), atol=1e-6)
    assert not torch.allclose(flipped, plain.flip(-1), atol=1e-3)  # a VAE latent is not mirror-symmetric


def test_micro_batches_and_checkpointing_give_the_whole_batch_update(sd_folders, one_thread):
    def train(**client_cfg):
        model = load_model(sd_folders["fp32"], "cpu")
        torch.manual_seed(0)
        cfg = config.load("tiny", overrides={"client": client_cfg}).client
        images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        client = LocalClient(model, images, ["a"] * 8, ["b"] * 8, cfg, 0)
        return client.train_round(None, None, 2, torch.Generator().manual_seed(0))

    whole = train(batch_size=8)
    checkpointed = train(batch_size=8, gradient_checkpointing=True)
    assert all(torch.equal(whole.lora[k], checkpointed.lora[k]) for k in whole.lora)  # recomputed, not approximated
    parts = train(batch_size=8, micro_batch=3)  # 3 + 3 + 2 images: sums in another order, so float-close
    assert abs(whole.train_loss - parts.train_loss) < 1e-5
    for k in whole.lora:  # a wrong accumulation would be off by ~lr = 3e-3 (AdamW's first step is lr x sign)
        assert torch.allclose(whole.lora[k], parts.lora[k], atol=1e-4), k


def test_a_resolution_that_does_not_fit_the_model_is_refused(sd_folders):
    with pytest.raises(UserError, match="model.resolution 10 does not fit this model: use a multiple of 4"):
        load_model(sd_folders["fp32"], "cpu", resolution=10)
    assert load_model(sd_folders["fp32"], "cpu", resolution=32).latent_shape == (4, 16, 16)  # an explicit override


def test_sdxl_folders_are_refused_before_any_work(tmp_path, capsys):
    root = tmp_path / "sdxl"
    root.mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (root / "model_index.json").write_text(json.dumps(index))
    code = main(["generate", "--preset", "tiny", "--model", str(root), "--prompt", "a star", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "SDXL" in err, err


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_generate_on_an_fp16_folder(sd_folders, tmp_path, dtype):
    out = tmp_path / "x.png"
    args = ["generate", "--preset", "tiny", "--model", str(sd_folders["fp16"]), "--dtype", dtype]
    assert main(args + ["--prompt", "a picture of a star", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (16, 16)  # the model's resolution


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, sd_folders, tiny_data):
    """A real `fedaigc federate` run (cluster, 2 clients, 1 round) on the fp16-stored folder."""
    out = tmp_path_factory.mktemp("sdrun") / "run"
    lr = out.parent / "lr.toml"  # the recipe's lr 1e-4 would move a 3-step adapter too little to see
    lr.write_text("[client]\nlr = 0.03\n")
    args = ["federate", "--preset", "tiny", "--model", str(sd_folders["fp16"]), "--data", str(tiny_data), "--config", str(lr)]
    assert main(args + ["--num-clients", "2", "--rounds", "1", "--out", str(out)]) == 0
    return out


def test_federate_on_an_fp16_folder_trains_at_the_models_resolution_with_its_recipe(sd_run):
    metrics = json.loads((sd_run / "metrics.json").read_text())
    assert metrics["rounds"][0]["rejected"] == {} and len(metrics["rounds"][0]["clusters"]) == 2
    cfg = config.from_saved(sd_run / "config.toml")
    assert cfg.client.timestep_bias == 1.0 and cfg.sample.guidance == 7.5 and cfg.client.lr == 0.03  # recipe, then the file
    with Image.open(sd_run / "samples" / "client_0" / "0000.png") as im:
        assert im.size == (16, 16)  # sampled at the model's 16 px, not the data's 32


@pytest.mark.parametrize("adapter", ["client_0", "cluster_0", "global"])
def test_a_runs_own_files_load_in_the_plain_pipeline_and_make_fedaigcs_image(sd_run, sd_folders, adapter):
    root = sd_folders["fp16"]
    lora = sd_run / "adapters" / f"{adapter}.safetensors"
    token_file = sd_run / "devices" / "client_0" / "style_token.safetensors"
    (name,) = load_file(str(token_file))
    cfg = config.from_saved(sd_run / "config.toml")
    steps, guidance = cfg.sample.steps, cfg.sample.guidance

    ours = personal_model(root, lora, token_file, dtype="float32")
    prompt = f"a {name} of a star"
    mine = generate(ours, ["a <style> of a star"], 7, steps, guidance).images

    pipe = StableDiffusionPipeline.from_pretrained(root, dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora))
    pipe.load_textual_inversion(str(token_file))
    theirs = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=initial_noise(ours.model, [7]),
        output_type="pt",
    ).images
    assert theirs.shape == mine.shape == (1, 3, 16, 16)
    assert (theirs - mine).abs().max() <= 1e-4
    plain = personal_model(root, None, token_file, dtype="float32")  # the adapter changes the image
    assert (generate(plain, ["a <style> of a star"], 7, steps, guidance).images - mine).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_serve_and_hybrid_generate_on_the_sd_run(sd_run, sd_folders, tmp_path, dtype):
    """16 images through `fedaigc serve` on the SD folder: the device splits them to the service's
    limits, and in float32 the hybrid image is the local one (up to PNG rounding)."""
    tokens = tmp_path / "tokens.txt"
    token = write_new_tokens(tokens, 1)["client-0"]
    serve = ["--model", str(sd_folders["fp16"]), "--adapters", str(sd_run / "adapters"), "--tokens", str(tokens)]
    args = ["generate", "--preset", "tiny", "--model", str(sd_folders["fp16"]), "--dtype", "float32"]
    args += ["--adapter", str(sd_run / "adapters" / "client_0.safetensors"), "--prompt", "a picture of a star"]
    with running_service(*serve, "--dtype", dtype) as url:
        hybrid = ["--server", url, "--token", token, "--mix", "global"]
        assert main([*args, "--n", "16", *hybrid, "--out", str(tmp_path / "h16.png")]) == 0
        assert main([*args, "--server", url, "--token", token, "--weights", "1", "--out", str(tmp_path / "h.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "local.png")]) == 0
    hybrid = np.asarray(Image.open(tmp_path / "h.png"), dtype=np.int16)
    local = np.asarray(Image.open(tmp_path / "local.png"), dtype=np.int16)
    assert hybrid.shape == (16, 16, 3)
    if dtype == "float32":  # the one cluster's adapter on the server, the client's (the same) on the device
        assert np.abs(hybrid - local).max() <= 1
    else:  # bfloat16 server steps: close, not equal
        assert np.abs(hybrid - local).mean() < 8


def test_client_actors_on_a_gpu_hold_one_sd_copy_per_gpu(monkeypatch, sd_folders, tiny_model_dir):
    """How many Ray actors (each one model copy) the simulation starts, and their GPU share."""
    from fedaigc.simulation import federate

    cfg = config.load("demo")  # 8 clients
    monkeypatch.setattr(federate.os, "cpu_count", lambda: 16)
    assert federate.client_actors(cfg, sd_folders["fp16"]) == (8, 0.0)  # CPU: one per core, up to the clients
    monkeypatch.setattr(federate, "pick_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(federate.torch.cuda, "device_count", lambda: 2)
    assert federate.client_actors(cfg, sd_folders["fp16"]) == (2, 1.0)  # an SD folder: one actor per GPU
    assert federate.client_actors(cfg, tiny_model_dir) == (8, 0.25)  # the embedded model: one per core, sharing
    cfg.federation.actors = 4
    assert federate.client_actors(cfg, sd_folders["fp16"]) == (4, 0.5)
