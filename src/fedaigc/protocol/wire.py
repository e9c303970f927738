"""Tensors as they travel between client and server in Flower's arrays (`client.transfer_dtype`);
the server's state and math stay float32 whatever the wire carries."""

from __future__ import annotations

import torch

from fedaigc.errors import UserError
from fedaigc.protocol.lora import Adapter

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of `client.transfer_dtype`, refusing anything else."""
    if name not in WIRE_DTYPES:
        raise UserError(f"unknown client.transfer_dtype {name!r}; choose one of: {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def to_wire(tensors: Adapter, dtype: torch.dtype) -> Adapter:
    """Tensors as they travel between client and server, cast to `dtype`. Flower's arrays are
    numpy arrays, which have no bfloat16: bfloat16 travels as its 16-bit pattern (int16)."""
    cast = {k: v.to(dtype) for k, v in tensors.items()}
    return {k: v.view(torch.int16) if v.dtype == torch.bfloat16 else v for k, v in cast.items()}


def from_wire(tensors: Adapter) -> Adapter:
    """Received tensors back in float32, whatever dtype they travelled in (an int16 tensor is
    bfloat16's bit pattern: `to_wire` sends nothing else as integers)."""
    return {k: (v.view(torch.bfloat16) if v.dtype == torch.int16 else v).float() for k, v in tensors.items()}


def bytes_of(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """The bytes of the tensors' data as they are, or as they travel in `dtype`."""
    return sum(t.numel() * (dtype.itemsize if dtype is not None else t.element_size()) for t in tensors.values())
