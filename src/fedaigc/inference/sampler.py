"""The split sampler: denoising steps [0, k) run on the inference edge server, [k, T) on the device.

DDIM with eta = 0 is deterministic, so everything the second half needs is the latent after step
k, k itself and the schedule length T; the initial noise comes from the seed (`initial_noise`), not
from the batch, so a batched server run reproduces a single local one. `SplitState` is that state,
serialised as safetensors bytes (what travels back to the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedaigc.model.base import DiffusionModel
from fedaigc.model.sampling import denoise, initial_noise


def split_step(num_steps: int, split: float) -> int:
    """k = ⌈s·T⌉: the number of steps the server runs (rounded so that 0.3 · 10 is 3, not 4)."""
    return min(num_steps, math.ceil(round(split * num_steps, 6)))


@dataclass
class SplitState:
    latents: torch.Tensor  # (B, C, H, W): the latent after `step` of `num_steps` DDIM steps
    step: int
    num_steps: int

    def to_bytes(self, extra: dict[str, torch.Tensor] | None = None) -> bytes:
        tensors = {
            "latents": self.latents.detach().float().contiguous().cpu(),
            "step": torch.tensor(self.step),
            "num_steps": torch.tensor(self.num_steps),
        }
        return save_tensors({**tensors, **(extra or {})})

    @classmethod
    def from_bytes(cls, data: bytes) -> SplitState:
        """Parse a server reply, refusing anything that is not a finite latent at a valid position."""
        try:
            tensors = load_tensors(data)
            latents, step, num_steps = tensors["latents"], int(tensors["step"]), int(tensors["num_steps"])
        except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"not a split-sampler state: {e}") from None
        if latents.dim() != 4 or not torch.isfinite(latents).all() or not 0 <= step <= num_steps:
            raise ValueError(f"bad split-sampler state: latents {tuple(latents.shape)}, step {step} of {num_steps}")
        return cls(latents.float(), step, num_steps)


def first_steps(
    model: DiffusionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    seeds: list[int],
    num_steps: int,
    split: float,
    guidance: float | torch.Tensor = 3.0,
    guidance_rescale: float = 0.0,
) -> SplitState:
    """Steps [0, ⌈s·T⌉) from the seeds' noise: the server's half."""
    k = split_step(num_steps, split)
    latents = initial_noise(model, seeds)
    latents = denoise(model, latents, cond, uncond, num_steps, 0, k, guidance, guidance_rescale)
    return SplitState(latents, k, num_steps)


def finish(
    model: DiffusionModel,
    state: SplitState,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float = 3.0,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Steps [k, T) and decoding: the device's half. Images in [0, 1], on the CPU."""
    latents = denoise(
        model, state.latents.to(model.device), cond, uncond, state.num_steps, state.step, None, guidance, guidance_rescale
    )
    return model.to_image(latents).cpu()
