"""Client cost of a Stable-Diffusion-1.5-shaped model at 512 px, on a GPU.

The model is SD-1.5's architecture with random weights (UNet, CLIP ViT-L/14 text encoder, VAE,
from their published configs; nothing is downloaded), written as a diffusers folder and loaded
through `fedaigc`'s own `load_model`, so the client below is the one a user with SD weights runs.
One client with 16 images trains its rank-`--rank` LoRA (UNet and text encoder) and private
token with `LocalClient.fine_tune`, one round of `--steps` steps (its 16 images go through the
VAE once per round, as in a federation). Measured against a reference on the same work: the bare
diffusers training step (the same LoRA'd UNet, forward + loss + backward + AdamW on the LoRA,
no text encoder, latents precomputed), and the peak GPU memory against what the client must
hold (model, adapters with gradients and AdamW moments, one batch of saved activations, data).

    python benchmarks/sd15_client.py [--batch 1 4] [--steps 40] [--rank 4]

Needs CUDA (about 40 GiB at batch 4 in float32). Prints `name: value (note)` lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from client_cost import activation_bytes, model_bytes, tensor_bytes  # benchmarks/ is on the path as a script
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fedaigc.client.adapter import lora_parameters
from fedaigc.client.train import LocalClient
from fedaigc.config import ClientConfig
from fedaigc.data.render import CLASSES, DOMAINS, STYLE_WORDS, render
from fedaigc.model.base import load_model

MIB = 2**20


def write_sd15(root: Path) -> Path:
    """SD-1.5's architecture, random weights, in diffusers layout. The tokenizer knows letters
    and common words only (CLIP's real vocabulary is a download); prompts cost the same 77 tokens."""
    torch.manual_seed(0)
    words = ["a", "of", "picture", *CLASSES, *STYLE_WORDS.values()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [*"abcdefghijklmnopqrstuvwxyz", *words]:
        vocab.setdefault(piece, len(vocab))
        vocab.setdefault(piece + "</w>", len(vocab))
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"), model_max_length=77
    ).save_pretrained(root / "tokenizer")
    clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    CLIPTextModel(clip).save_pretrained(root / "text_encoder")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768).save_pretrained(root / "unet")  # the defaults are SD-1.x's
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False).save_pretrained(
        root / "scheduler"
    )
    index = {
        "_class_name": "StableDiffusionPipeline",
        **{
            k: ["diffusers", v]
            for k, v in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("scheduler", "DDPMScheduler"))
        },
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def seconds_per_step(run_steps, steps: int) -> float:
    """`run_steps(n)` runs n training steps; one warm-up step first (kernels chosen, memory pools filled)."""
    run_steps(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_steps(steps)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bare_step(client: LocalClient, batch: int):
    """The reference: diffusers' LoRA training step on the UNet alone, latents and text states precomputed."""
    model = client.model
    with torch.no_grad():
        latents = model.to_latent(client.images[:batch].to(model.device))
        context = model.encode_prompts(client.prompts[:batch])
    params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sched = model.noise_scheduler

    def run_steps(n: int) -> None:
        for _ in range(n):
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=latents.device)
            pred = model.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run_steps, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to measure (default: 1 4)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default: 40, one round's)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4, the presets')")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sd15_client.py needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = load_model(write_sd15(Path(tmp) / "sd15"), "cuda")
        print(f"sd15_load_s: {time.perf_counter() - t0:.1f} (random SD-1.5 weights written and loaded through load_model)")
    name = "sd15_client"
    print(f"{name}_device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    domains, classes = [DOMAINS[i % 4] for i in range(16)], [CLASSES[i % 6] for i in range(16)]
    pictures = [np.asarray(render(d, c, i, 512)) for i, (d, c) in enumerate(zip(domains, classes, strict=True))]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    cfg = ClientConfig(rank=args.rank, alpha=float(args.rank))
    client = LocalClient(model, images, domains, classes, cfg, seed=0)
    for batch in args.batch:
        client.cfg = dataclasses.replace(cfg, batch_size=batch)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        activations = activation_bytes(client)
        ours = seconds_per_step(lambda n: client.fine_tune(n, torch.Generator().manual_seed(1)), args.steps)
        peak = torch.cuda.max_memory_allocated()
        slot = [client.token.get_slot()] if client.token is not None else []
        training = 4 * (tensor_bytes(lora_parameters(model)) + tensor_bytes(slot))  # weights, grads, AdamW moments
        latents = len(client.images) * math.prod(model.latent_shape) * 4  # float32, 4 x 64 x 64 each
        data = tensor_bytes([client.images]) + latents
        need = model_bytes(client) + training + activations + data
        step, params = bare_step(client, batch)
        reference = seconds_per_step(step, args.steps)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        setting = f"batch {batch}, rank {args.rank}, float32, 512 px"
        print(f"{name}_s_per_step.b{batch}: {ours:.3f} ({setting}; LoRA on UNet + text encoder, private token)")
        print(f"{name}_bare_s_per_step.b{batch}: {reference:.3f} (diffusers' UNet-only LoRA step on the same batch)")
        print(f"{name}_step_ratio.b{batch}: {ours / reference:.2f} (ours / bare; the text encoder and token are the extra)")
        print(f"{name}_peak_mib.b{batch}: {peak / MIB:.0f} (max_memory_allocated during our steps; {base / MIB:.0f} before)")
        print(
            f"{name}_need_mib.b{batch}: {need / MIB:.0f} (model {model_bytes(client) / MIB:.0f} + adapters {training / MIB:.1f} "
            f"+ activations {activations / MIB:.0f} + data {data / MIB:.0f})"
        )
        print(f"{name}_memory_ratio.b{batch}: {peak / need:.2f} (peak / what the client must hold)")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
