import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from sd_tiny import write_tiny_sd
from transformers import AutoTokenizer, BertModel

from fedaigc.errors import UserError
from fedaigc.model.base import DEFAULT_MODEL, DEVICE_ENV, load_model, pick_device
from fedaigc.model.pretrain import diffusion_loss, pretrain, sample_timesteps
from fedaigc.model.sampling import generate


def test_model_dir_parts_load_outside_fedaigc(tiny_model_dir):
    for name in ("model_index.json", "unet", "scheduler", "text_encoder", "tokenizer"):
        assert (tiny_model_dir / name).exists()
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert unet.config.cross_attention_dim == 384
    assert DDPMScheduler.from_pretrained(tiny_model_dir / "scheduler").config.prediction_type == "v_prediction"
    BertModel.from_pretrained(tiny_model_dir / "text_encoder")
    AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")


def test_generation_is_deterministic_per_seed_and_batch_independent(tiny_model_dir):
    model = load_model(tiny_model_dir)
    a = generate(model, ["a picture of a star", "a picture of a fish"], [1, 2], num_steps=3, progress=False)
    b = generate(model, ["a picture of a fish"], [2], num_steps=3, progress=False)
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a[1], b[0], atol=1e-5)


def test_pretraining_resumes_from_its_checkpoint(tmp_path, tiny_cfg, tiny_data):
    cfg = tiny_cfg.__class__(**{**tiny_cfg.__dict__})
    cfg.pretrain = tiny_cfg.pretrain.__class__(**{**tiny_cfg.pretrain.__dict__, "steps": 4, "checkpoint_every": 2})
    straight = load_model(pretrain(cfg, tiny_data, tmp_path / "straight", progress=False))
    cfg.pretrain.steps = 2
    pretrain(cfg, tiny_data, tmp_path / "resumed", progress=False)
    cfg.pretrain.steps = 4
    resumed = load_model(pretrain(cfg, tiny_data, tmp_path / "resumed", progress=False))
    for (n, p), (_, q) in zip(straight.unet.named_parameters(), resumed.unet.named_parameters(), strict=False):
        assert torch.allclose(p, q, atol=1e-3), n
    info = json.loads((tmp_path / "resumed" / "pretrain.json").read_text())
    assert info["steps"] == 4


def test_stable_diffusion_shaped_folder_loads_through_the_same_path(tmp_path):
    model = load_model(write_tiny_sd(tmp_path / "sd"))
    assert model.vae is not None and model.latent_shape == (4, 8, 8) and model.image_size == 16
    images = generate(model, ["a picture of a star"], [0], num_steps=2, progress=False)
    assert images.shape == (1, 3, 16, 16)
    latents = model.to_latent(torch.rand(2, 3, 16, 16))
    assert latents.shape == (2, 4, 8, 8)
    loss = diffusion_loss(model, latents, model.encode_prompts(["a b", "c d"]))
    assert torch.isfinite(loss)


def test_timestep_bias_favours_high_noise_and_one_is_uniform():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(1000, 20_000, g).float()
    biased = sample_timesteps(1000, 20_000, g, bias=2.0).float()
    assert 0 <= biased.min() and biased.max() <= 999
    assert abs(uniform.mean() - 499.5) < 10  # E[T(1 - u)] = T / 2
    assert abs(biased.mean() - 1000 * 2 / 3) < 10  # E[T(1 - u^2)] = 2T / 3
    assert (biased >= 900).float().mean() > 2.5 * (uniform >= 900).float().mean()  # the top tenth: P(u^2 <= 0.1) = 0.32 vs 0.1
    with pytest.raises(ValueError, match="> 0"):
        sample_timesteps(1000, 4, g, bias=0.0)


def test_device_choice_flag_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert pick_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == torch.device("cpu") and load_model().device == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "meta"):
        with pytest.raises(UserError, match="unknown device"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="sees no CUDA GPU"):
            pick_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA GPU"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_not_a_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        load_model(tmp_path)


def test_embedded_default_ships_small_and_loads_offline():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    model = load_model()
    assert model.text_encoder.config.hidden_size == 384
