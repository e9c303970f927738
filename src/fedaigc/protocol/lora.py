"""LoRA adapters as they travel and are aggregated: a flat dict of tensors in exactly diffusers'
file format (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`), and the spec
(rank, alpha, targets) every client of a federation shares. No model, no peft: the server's math
and the wire need only the tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedaigc.config import ClientConfig

Adapter = dict[str, torch.Tensor]

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONVS = ["conv1", "conv2"]  # resnet convolutions, an option beyond the paper's attention-only LoRA
TEXT_ATTENTION = {"bert": ["query", "key", "value", "attention.output.dense"], "clip": ["q_proj", "k_proj", "v_proj", "out_proj"]}


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 4
    alpha: float = 4.0
    text_encoder: bool = True  # LoRA on the text encoder's attention too, as the paper
    convs: bool = False  # also the UNet's resnet convs

    @classmethod
    def of(cls, client: ClientConfig) -> LoraSpec:
        """The spec of the clients' LoRA under `client` (config section `[client]`)."""
        return cls(client.rank, client.alpha, client.text_encoder_lora, client.convs)

    @property
    def scale(self) -> float:
        """alpha / rank: a layer's update is ΔW = scale · B A."""
        return self.alpha / self.rank


def lora_targets(tensors: Adapter) -> list[str]:
    """The module names a LoRA state dict adapts (`...attn1.to_q.lora_A.weight` -> `to_q`), as
    peft's `target_modules` matches them: the known attention and conv names the key ends with."""
    known = UNET_ATTENTION + UNET_CONVS + [name for names in TEXT_ATTENTION.values() for name in names]
    targets = set()
    for key in tensors:
        module = key.rsplit(".lora_", 1)[0]
        targets |= {name for name in known if module == name or module.endswith("." + name)}
    return sorted(targets)


def flatten(adapter: Adapter) -> torch.Tensor:
    """All tensors as one float64 vector, in key order (`unflatten` reverses it)."""
    return torch.cat([adapter[k].double().reshape(-1) for k in sorted(adapter)])


def unflatten(vector: torch.Tensor, like: Adapter) -> Adapter:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[i : i + n].reshape(like[k].shape).to(like[k].dtype)
        i += n
    return out
