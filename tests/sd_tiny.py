"""Tiny, randomly initialised Stable-Diffusion-layout model folders (VAE + CLIP text encoder + UNet +
scheduler), written by `StableDiffusionPipeline.save_pretrained` as distributed copies are, built
offline in a second: they test that SD-family folders go through fedaigc's code paths."""

import json

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Stable Diffusion 1.5's own scheduler config (PNDM, epsilon), and 2.x's (DDIM, v-prediction)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
)
SD2_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="v_prediction",
)


def _tokenizer(folder):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(vocab)


def write_tiny_sd(root, dtype=torch.float32, variant=None, family="sd15"):
    """A 16-px SD-layout folder at `root`: weights stored in `dtype` (optionally only as a
    `variant`, e.g. "fp16" files), the scheduler of `family` ("sd15": PNDM/epsilon, "sd2": DDIM/v)."""
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _tokenizer(root / "_tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = PNDMScheduler(**SD15_SCHEDULER) if family == "sd15" else DDIMScheduler(**SD2_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    pipe.save_pretrained(root, variant=variant)
    for f in (root / "_tokenizer").iterdir():
        f.unlink()
    (root / "_tokenizer").rmdir()
    return root
