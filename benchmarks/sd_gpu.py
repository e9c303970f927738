"""A Stable-Diffusion-1.5-shaped model at 512 px on one GPU, through fedaigc's own commands' code.

The model is SD-1.5's architecture with random weights (UNet, CLIP ViT-L/14 text encoder, VAE,
from their published configs; nothing is downloaded), written as a diffusers folder and loaded by
`load_model`, so what runs is what a user with SD weights runs. Three measurements, each against a
reference on the same work:

1. A client's training step (`LocalClient.fine_tune`: UNet and text-encoder LoRA, private token,
   frozen weights in `--dtype`, LoRA in float32) against diffusers' bare LoRA training step on the
   same LoRA'd UNet and batch (latents and text states precomputed); the peak GPU memory against
   what the client must hold (model, adapters with grads and AdamW moments, saved activations, data).
2. One federated round of 2 clients on Flower's simulation engine (`federate.simulate`), against
   the training steps it contains (2 clients x steps x the step time of 1.).
3. Hybrid inference: `fedaigc serve` on the same folder and the round's adapters; images/s of the
   service's first ceil(s*T) steps for 16 images, from 1 user (one request) and from 16 concurrent
   users (one image each).

    python benchmarks/sd_gpu.py                 # CUDA, bfloat16, batch 4; a few minutes
    python benchmarks/sd_gpu.py --tiny          # the tests' 16-px SD layout on the CPU: checks the script

Prints `name: value (note)` lines.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from client_cost import activation_bytes, model_bytes, tensor_bytes  # benchmarks/ is on the path as a script
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from hybrid_inference import start_service
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fedaigc import config
from fedaigc.client.adapter import lora_parameters
from fedaigc.client.client_app import build_client
from fedaigc.data.dataset import ensure_dataset
from fedaigc.data.render import CLASSES, STYLE_WORDS
from fedaigc.inference.auth import write_new_tokens
from fedaigc.inference.device import InferenceServer, personal_model
from fedaigc.model.recipe import recipe
from fedaigc.simulation.federate import simulate

MIB = 2**20
# SD-1.5's text encoder, VAE and UNet (its defaults are SD-1.x's), or the tests' 16-px shapes
SHAPES = {
    "sd15": dict(
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        unet=dict(sample_size=64, cross_attention_dim=768),
        max_length=77,
    ),
    "tiny": dict(
        text=dict(vocab_size=200, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        vae=dict(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16),
        unet=dict(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        max_length=16,
    ),
}


def write_sd(root: Path, shape: str) -> Path:
    """An SD-1.5-layout folder with random weights. The tokenizer knows letters and the prompts'
    words only (CLIP's real vocabulary is a download); prompts cost the same number of tokens."""
    torch.manual_seed(0)
    s = SHAPES[shape]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [*"abcdefghijklmnopqrstuvwxyz", "a", "of", "picture", *CLASSES, *STYLE_WORDS.values()]:
        vocab.setdefault(piece, len(vocab))
        vocab.setdefault(piece + "</w>", len(vocab))
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=s["max_length"]).save_pretrained(tok)
    text = dict(s["text"], max_position_embeddings=s["max_length"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(root / "text_encoder")
    blocks = len(s["vae"]["block_out_channels"])
    vae = dict(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks, **s["vae"])
    AutoencoderKL(**vae).save_pretrained(root / "vae")
    UNet2DConditionModel(**s["unet"]).save_pretrained(root / "unet")
    sd15_schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **sd15_schedule).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_step(run_steps, steps: int) -> float:
    """`run_steps(n)` runs n training steps; one warm-up step first (kernels chosen, memory pools filled)."""
    run_steps(1)
    sync()
    t0 = time.perf_counter()
    run_steps(steps)
    sync()
    return (time.perf_counter() - t0) / steps


def bare_step(client, batch: int):
    """The reference: diffusers' LoRA training step (train_text_to_image_lora.py) on the UNet alone,
    frozen weights in the model's dtype, LoRA in float32, latents and text states precomputed."""
    model = client.model
    latents = client.latents()[0][:batch]
    with torch.no_grad():
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
            noisy = sched.add_noise(latents, noise, t).to(model.dtype)
            pred = model.unet(noisy, t, encoder_hidden_states=context).sample
            loss = F.mse_loss(pred.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run_steps, params


def measure_client(cfg: config.Config, sd: Path, data: Path, steps: int) -> float:
    """Part 1; returns our seconds per step."""
    name, batch = "sd_gpu_client", cfg.client.batch_size
    client = build_client(cfg, 0, cfg.federation.num_clients, data, sd)
    model = client.model
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    activations = activation_bytes(client)
    ours = seconds_per_step(lambda n: client.fine_tune(n, torch.Generator().manual_seed(1)), steps)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    slot = [client.token.get_slot()] if client.token is not None else []
    training = 4 * (tensor_bytes(lora_parameters(model)) + tensor_bytes(slot))  # weights, grads, AdamW moments
    data_bytes = tensor_bytes([client.images]) + 2 * len(client.images) * math.prod(model.latent_shape) * 4
    need = model_bytes(client) + training + activations + data_bytes
    step, params = bare_step(client, batch)
    reference = seconds_per_step(step, steps)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    checkpointing = "on" if cfg.client.gradient_checkpointing else "off"
    setting = f"batch {batch}, {model.dtype}, {model.image_size} px, gradient checkpointing {checkpointing}"
    print(f"{name}_device: {torch.cuda.get_device_name() if cuda else 'cpu'} (torch {torch.__version__})")
    print(f"{name}_s_per_step: {ours:.3f} ({setting}; LoRA on UNet + text encoder, private token)")
    print(f"{name}_bare_s_per_step: {reference:.3f} (diffusers' UNet-only LoRA step on the same batch, no checkpointing)")
    print(f"{name}_step_ratio: {ours / reference:.2f} (ours / bare; target <= 1.2)")
    if cuda:
        print(f"{name}_peak_mib: {peak / MIB:.0f} (max_memory_allocated during our steps)")
        print(
            f"{name}_need_mib: {need / MIB:.0f} (model {model_bytes(client) / MIB:.0f} + adapters {training / MIB:.1f} "
            f"+ activations {activations / MIB:.0f} + data {data_bytes / MIB:.0f})"
        )
        print(f"{name}_memory_ratio: {peak / need:.2f} (peak / what the client must hold; target <= 1.1)")
    return ours


def measure_hybrid(cfg: config.Config, sd: Path, run: Path, tmp: Path) -> None:
    """Part 3: the service's images/s for 16 images, from 1 user and from 16 concurrent users."""
    tokens_file = tmp / "tokens.txt"
    token = next(iter(write_new_tokens(tokens_file, 1).values()))
    proc, url = start_service(tokens_file, sd, run / "adapters")
    try:
        device = personal_model(sd, run / "adapters" / "client_0.safetensors", None, cfg.model.dtype)
        cond, uncond = device.encode([f"a picture of a {CLASSES[i % len(CLASSES)]}" for i in range(16)])
        steps, guidance, split = cfg.sample.steps, cfg.sample.guidance, cfg.sample.split
        server = InferenceServer(url, token)
        server.first_steps(cond[:1], uncond, 0, steps, split, guidance, mix="global")  # warm-up
        t0 = time.perf_counter()
        state = server.first_steps(cond, uncond, 0, steps, split, guidance, mix="global")
        one = time.perf_counter() - t0
        users = [InferenceServer(url, token) for _ in range(16)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: users[i].first_steps(cond[i : i + 1], uncond, i, steps, split, guidance, mix="global"), range(16)
                )
            )
        many = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    setting = f"{state.step} of {steps} steps at s = {split}, guidance {guidance}"
    print(f"sd_gpu_hybrid_1_user_images_per_s: {16 / one:.2f} (16 images in one request; {setting})")
    print(f"sd_gpu_hybrid_16_users_images_per_s: {16 / many:.2f} (16 concurrent one-image requests, batched by the service)")
    print(f"sd_gpu_hybrid_prompt_bytes: {server.bytes_sent} (the 16-image request's bodies; sent by the device)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' 16-px SD layout, on the CPU (checks the script)")
    ap.add_argument("--batch", type=int, default=4, help="client batch size (default: 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps, and local steps of the federated round (default: 10)")
    ap.add_argument("--dtype", default="auto", help="model.dtype (default: auto, bfloat16 on a GPU)")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("sd_gpu.py needs a CUDA GPU (or --tiny)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        sd = write_sd(tmp / "sd", "tiny" if args.tiny else "sd15")
        print(f"sd_gpu_write_s: {time.perf_counter() - t0:.1f} (random SD-1.5-shaped weights written)")
        overrides = {
            "data": {"per_class": 8},
            "model": {"dtype": args.dtype},
            "client": {"batch_size": args.batch, "steps": args.steps},
            "federation": {"num_clients": 2, "rounds": 1, "per_client": 16, "profile_steps": 0},
            "sample": {"steps": 50},
        }
        cfg = config.load("paper", overrides=overrides, recipe=recipe(sd))
        data = ensure_dataset(None, cfg)
        ours = measure_client(cfg, sd, data, args.steps)
        t0 = time.perf_counter()
        run, *_ = simulate(cfg, tmp / "run", data, sd)
        round_s = time.perf_counter() - t0
        work = 2 * args.steps * ours
        print(f"sd_gpu_round_s: {round_s:.1f} (1 round, 2 clients x {args.steps} steps, Ray start and model loads included)")
        print(f"sd_gpu_round_ratio: {round_s / work:.2f} (round / its training steps, {work:.1f} s)")
        measure_hybrid(cfg, sd, run.root, tmp)


if __name__ == "__main__":
    main()
