"""DDIM sampling with classifier-free guidance, written as an explicit loop over scheduler steps so
the hybrid sampler can run steps [0, k) on one machine and [k, T) on another."""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from tqdm.auto import tqdm

from fedaigc.model.base import DiffusionModel


def initial_noise(model: DiffusionModel, seeds: list[int]) -> torch.Tensor:
    """One noise tensor per seed, independent of batch composition (so a split or batched run
    reproduces an unsplit single one)."""
    shape = model.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(model.device)


@torch.no_grad()
def denoise(
    model: DiffusionModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_steps: int,
    start: int = 0,
    stop: int | None = None,
    guidance: float | torch.Tensor = 3.0,
    guidance_rescale: float = 0.0,
    progress: bool = False,
) -> torch.Tensor:
    """Run DDIM steps [start, stop) of a `num_steps` schedule (eta = 0: deterministic).
    `guidance` is one scale or one per sample (B,) (the inference server batches users)."""
    scheduler = model.sampling_scheduler()
    scheduler.set_timesteps(num_steps, device=latents.device)
    dtype = model.unet.dtype  # the UNet runs in the model's dtype; latents and the scheduler stay float32
    latents = latents.float()
    cond, uncond = cond.to(latents.device, dtype), uncond.to(latents.device, dtype) if uncond is not None else None
    steps = scheduler.timesteps[start:stop]
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(latents.device, latents.dtype).view(-1, *[1] * (latents.dim() - 1))
        use_cfg = uncond is not None
    else:
        use_cfg = uncond is not None and guidance != 1.0
    context = torch.cat([uncond.expand_as(cond), cond]) if use_cfg else cond
    for t in tqdm(steps, desc="denoising", leave=False, disable=not progress):
        inp = torch.cat([latents, latents]) if use_cfg else latents
        out = model.unet(inp.to(dtype), t, encoder_hidden_states=context).sample.float()
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
            if guidance_rescale > 0:
                out = rescale_noise_cfg(out, out_c, guidance_rescale=guidance_rescale)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 25,
    guidance: float = 3.0,
    guidance_rescale: float = 0.0,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) for `prompts`, one seed each."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    images = []
    null = model.encode_prompts([""])
    batches = range(0, len(prompts), batch_size)
    for i in tqdm(batches, desc="sampling", unit="batch", disable=not progress or len(batches) < 2, leave=False):
        cond = model.encode_prompts(prompts[i : i + batch_size])
        latents = initial_noise(model, seeds[i : i + batch_size])
        latents = denoise(model, latents, cond, null, num_steps, guidance=guidance, guidance_rescale=guidance_rescale)
        images.append(model.to_image(latents).cpu())
    return torch.cat(images)
