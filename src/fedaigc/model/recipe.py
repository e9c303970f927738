"""What a model folder brings to the config: the training and sampling recipe of its family.

The embedded model keeps the presets' recipe, tuned for it (v-prediction and zero terminal SNR come
from its own scheduler config, the timestep bias and guidance from the presets). A model fedaigc did
not pretrain (a Stable Diffusion folder) gets the defaults of diffusers' LoRA training scripts and
pipelines instead. Kept free of torch: the Flower apps read configs before any model loads.
"""

from __future__ import annotations

from pathlib import Path

# diffusers' LoRA training scripts: uniform timesteps, lr 1e-4; its pipelines: guidance 7.5
# (docs/method.md, "Recipes"). Gradient checkpointing stays off, as in those scripts: it costs time
# on every step, and a batch of 16 at 512 px is estimated at ~12 GiB of activations in bfloat16
# (half the 1.55 GiB per image measured in float32 on an H100), which one GPU holds.
EXTERNAL_RECIPE = {
    "client": {"timestep_bias": 1.0, "lr": 1e-4},
    "sample": {"guidance": 7.5},
}


def is_external(path: Path | str | None) -> bool:
    """A model folder fedaigc did not write (no `fedaigc.json`): Stable Diffusion and its kin."""
    return path is not None and not (Path(path) / "fedaigc.json").is_file()


def recipe(path: Path | str | None) -> dict:
    """Config values the model folder at `path` brings (between the preset and the user's file)."""
    return EXTERNAL_RECIPE if is_external(path) else {}
