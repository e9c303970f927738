"""Adapter files: diffusers-format LoRA safetensors (keys `unet.<module>.lora_A.weight`,
`text_encoder.<module>...`, peft's adapter metadata) that `UNet2DConditionModel.load_lora_adapter`
and a pipeline's `load_lora_weights` read unchanged. The server writes them holding no model; a
device and the inference server read them into theirs (client/adapter.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedaigc.errors import UserError
from fedaigc.protocol.lora import UNET_CONVS, Adapter, LoraSpec, lora_targets

CONTENT_HASH_KEY = "fedaigc.sha256"  # safetensors metadata: `content_hash` of the file's tensors
MAX_ADAPTER_VALUE = 1e4  # no trained LoRA entry comes near; beyond it a file is refused


def save_adapter(path: Path, tensors: Adapter, spec: LoraSpec) -> Path:
    """Write a diffusers-format LoRA file with peft's adapter metadata (rank, alpha and the target
    modules), so `pipeline.load_lora_weights` and fedaigc load it back. The targets are read off
    the tensors' own keys: the server that writes a run's files holds no model, and a CLIP text
    encoder's `q_proj` must not be announced as BERT's `query`."""
    path = Path(path)
    unet = {k.removeprefix("unet."): v.contiguous() for k, v in tensors.items() if k.startswith("unet.")}
    text = {k.removeprefix("text_encoder."): v.contiguous() for k, v in tensors.items() if k.startswith("text_encoder.")}
    meta = {"unet": _metadata(spec, unet)} | ({"text_encoder": _metadata(spec, text)} if text else {})
    packed = {f"{part}.{k}": v for part, m in meta.items() for k, v in m.items()}  # diffusers' layout of the metadata

    def save_function(weights: Adapter, filename: str) -> None:  # diffusers' own, plus the content hash
        metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
        save_file(weights, filename, metadata=metadata | {CONTENT_HASH_KEY: content_hash(weights)})

    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=unet,
        text_encoder_lora_layers=text or None,
        weight_name=path.name,
        save_function=save_function,
        unet_lora_adapter_metadata=meta["unet"],
        text_encoder_lora_adapter_metadata=meta.get("text_encoder"),
    )
    return path


def content_hash(tensors: Adapter) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes and bytes, in name order): a file whose data
    was altered or damaged does not match the hash in its metadata."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata(spec: LoraSpec, tensors: Adapter) -> dict:
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=lora_targets(tensors), init_lora_weights="gaussian")
    d = config.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    return json.loads(json.dumps(d, default=str))


def read_adapter_file(path: Path) -> Adapter:
    """Read a safetensors adapter file, refusing with one line a corrupt or truncated file, one that
    does not match its content hash, and tensors that are not floating point, not finite or huge."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, expected_hash = {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get(CONTENT_HASH_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"corrupt or truncated adapter file {path}: {e}") from None
    if expected_hash is not None and content_hash(tensors) != expected_hash:
        raise UserError(f"{path}: its tensors do not match the content hash in its metadata (altered or damaged)")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise UserError(f"{path}: tensor {key} is {t.dtype}, not floating point")
        if not torch.isfinite(t).all():
            raise UserError(f"{path}: tensor {key} contains NaN or Inf")
        if t.numel() and t.abs().max() > MAX_ADAPTER_VALUE:
            raise UserError(f"{path}: tensor {key} holds values beyond {MAX_ADAPTER_VALUE:g} (not a trained LoRA)")
    return tensors


def adapter_spec(path: Path) -> LoraSpec:
    """Rank, alpha and targets of an adapter file, from the peft metadata `save_adapter` writes."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt or unreadable adapter file {path}: {e}") from None
    if not isinstance(meta, dict) or "unet.r" not in meta:
        raise UserError(f"{path}: no LoRA metadata for the UNet (not written by fedaigc or diffusers' save_lora_weights)")
    for part in ("unet", "text_encoder"):
        rank, alpha = meta.get(f"{part}.r"), meta.get(f"{part}.lora_alpha", meta.get(f"{part}.r"))
        if part == "unet" or rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096:
                raise UserError(f"{path}: LoRA metadata {part}.r must be an integer in 1-4096, got {rank!r}")
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"):
                raise UserError(f"{path}: LoRA metadata {part}.lora_alpha must be a positive number, got {alpha!r}")
    targets = meta.get("unet.target_modules", [])
    if not isinstance(targets, list | str):
        raise UserError(f"{path}: LoRA metadata unet.target_modules must be a list of module names, got {targets!r}")
    return LoraSpec(
        rank=meta["unet.r"],
        alpha=float(meta.get("unet.lora_alpha", meta["unet.r"])),
        text_encoder="text_encoder.r" in meta,
        convs=any(t in targets for t in UNET_CONVS),
    )
