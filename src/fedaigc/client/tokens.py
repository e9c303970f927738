"""Private style tokens (textual inversion with a private name).

The client rewrites "a sketch of a dog" to "a <u7f3a> of a dog". The token's *name* is random per
client and never leaves the device; its *embedding* is a slot that travels with the LoRA and is
aggregated with it inside a cluster, so every member of a cluster starts each round from the same
slot (merging independently learned tokens destroys the style: see docs/method.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedaigc.errors import UserError
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
        """The slot's embedding: a float32 CPU copy (what the client uploads and saves)."""
        return self._slot.clone()

    def set_slot(self, vector: torch.Tensor) -> None:
        """The slot is kept in float32 and copied into the embedding matrix in the text encoder's
        dtype: a float16 model must not round the slot it trains and aggregates every round."""
        self._slot = vector.detach().to("cpu", torch.float32, copy=True)
        with torch.no_grad():
            weight = self.embeddings.weight
            weight[self.id] = self._slot.to(weight.device, weight.dtype)

    @contextmanager
    def learnable(self) -> Iterator[torch.nn.Parameter]:
        """The slot as its own small trainable parameter while training runs. A forward hook puts
        it into the embedding layer's output, so the 30k-row embedding matrix gets no gradient and
        no optimizer state (training that matrix with a row mask cost ~20 % of every step)."""
        slot = torch.nn.Parameter(self._slot.to(self.embeddings.weight.device, copy=True))

        def substitute(_module, inputs, output):
            return torch.where((inputs[0] == self.id).unsqueeze(-1), slot.to(output.dtype), output)

        handle = self.embeddings.register_forward_hook(substitute)
        try:
            yield slot
        finally:
            handle.remove()
            self.set_slot(slot.detach())

    def save(self, path: Path) -> Path:
        """diffusers' textual-inversion format ({token: embedding}); stays on the device."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({self.name: self.get_slot().contiguous()}, str(path))
        return Path(path)

    @classmethod
    def load(cls, model: DiffusionModel, path: Path) -> PrivateToken:
        """Add the token saved by `save` (or any one-token textual-inversion file) to `model`."""
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read style token file {path}: {e}") from None
        dim = model.text_encoder.get_input_embeddings().weight.shape[1]
        if len(tensors) != 1 or next(iter(tensors.values())).shape != (dim,):
            raise UserError(f"{path}: expected one token embedding of size {dim} ({{name: vector}})")
        ((name, vector),) = tensors.items()
        if not name.strip() or name != name.strip() or len(name.split()) != 1:
            raise UserError(f"{path}: token name {name!r} is empty or holds spaces (expected one word such as <u1f3a>)")
        if not vector.is_floating_point():
            raise UserError(f"{path}: token embedding is {vector.dtype}, not floating point")
        if not torch.isfinite(vector).all():
            raise UserError(f"{path}: token embedding contains NaN or Inf")
        return cls(model, name, vector)
