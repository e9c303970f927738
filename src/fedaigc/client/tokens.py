"""Private style tokens (textual inversion with a private name).

The client rewrites "a sketch of a dog" to "a <u7f3a> of a dog". The token's *name* is random per
client and never leaves the device; its *embedding* is a slot that travels with the LoRA and is
aggregated with it inside a cluster, so every member of a cluster starts each round from the same
slot (merging independently learned tokens destroys the style: see docs/method.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedaigc.model.base import DiffusionModel

# A neutral word to start the slot from: its embedding says nothing about any style.
SLOT_INIT_WORD = "picture"


def private_token_name(rng: np.random.Generator) -> str:
    return f"<u{int(rng.integers(0, 16**4)):04x}>"


def rewrite(prompt: str, style_word: str, token: str) -> str:
    """Replace the style word (whole word, any case) by the private token."""
    return re.sub(rf"\b{re.escape(style_word)}\b", token, prompt, flags=re.IGNORECASE)


def slot_init(model: DiffusionModel) -> torch.Tensor:
    emb = model.text_encoder.get_input_embeddings().weight
    ids = model.tokenizer(SLOT_INIT_WORD, add_special_tokens=False)["input_ids"]
    return emb[ids].mean(0).detach().clone()


class PrivateToken:
    """One client's private token inside its own tokenizer and text encoder."""

    def __init__(self, model: DiffusionModel, name: str, slot: torch.Tensor | None = None):
        self.model, self.name = model, name
        if model.tokenizer.add_tokens([name]) == 0:
            raise ValueError(f"token {name} already in the tokenizer")
        model.text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
        self.id = model.tokenizer.convert_tokens_to_ids(name)
        self.set_slot(slot if slot is not None else slot_init(model))

    @property
    def embeddings(self) -> torch.nn.Embedding:
        return self.model.text_encoder.get_input_embeddings()

    def get_slot(self) -> torch.Tensor:
        return self.embeddings.weight[self.id].detach().clone()

    def set_slot(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            self.embeddings.weight[self.id] = vector.to(self.embeddings.weight.dtype)

    def trainable(self) -> torch.nn.Parameter:
        """Make the embedding matrix trainable with gradients on this token's row only."""
        weight = self.embeddings.weight
        weight.requires_grad_(True)
        if not getattr(weight, "_fedaigc_row_mask", False):
            mask = torch.zeros(weight.shape[0], 1)
            mask[self.id] = 1.0
            weight.register_hook(lambda g: g * mask.to(g.device))
            weight._fedaigc_row_mask = True
        return weight

    def save(self, path: Path) -> Path:
        """diffusers' textual-inversion format ({token: embedding}); stays on the device."""
        save_file({self.name: self.get_slot().contiguous()}, str(path))
        return Path(path)
