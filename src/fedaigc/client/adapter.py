"""LoRA adapters: attach them with peft, move them as flat tensor dicts, save and load them as
diffusers-format safetensors (keys `unet.<module>.lora_A.weight`, `text_encoder.<module>...`).

A flat dict in exactly the file's key format is what travels between client and server, so the
same tensors that the aggregation math sees are what `UNet2DConditionModel.load_lora_adapter`
and a pipeline's `load_lora_weights` read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedaigc.errors import UserError
from fedaigc.model.base import DiffusionModel

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONVS = ["conv1", "conv2"]  # resnet convolutions, an option beyond the paper's attention-only LoRA
TEXT_ATTENTION = {"bert": ["query", "key", "value", "attention.output.dense"], "clip": ["q_proj", "k_proj", "v_proj", "out_proj"]}

Adapter = dict[str, torch.Tensor]
CONTENT_HASH_KEY = "fedaigc.sha256"  # safetensors metadata: `content_hash` of the file's tensors
MAX_ADAPTER_VALUE = 1e4  # no trained LoRA entry comes near; beyond it a file is refused


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 4
    alpha: float = 4.0
    text_encoder: bool = True  # LoRA on the text encoder's attention too, as the paper
    convs: bool = False  # also the UNet's resnet convs

    def unet_config(self) -> LoraConfig:
        targets = UNET_ATTENTION + (UNET_CONVS if self.convs else [])
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, init_lora_weights="gaussian")

    def text_config(self, model_type: str) -> LoraConfig:
        family = "clip" if "clip" in model_type else "bert"
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=TEXT_ATTENTION[family], init_lora_weights="gaussian")


def attach_lora(model: DiffusionModel, spec: LoraSpec) -> DiffusionModel:
    """Add a fresh LoRA (B = 0, so the model is unchanged) to the UNet and, if asked, the text
    encoder. The LoRA weights are float32 whatever the frozen weights' dtype (peft casts each
    layer's input to them and the output back), as diffusers' `cast_training_params` does."""
    model.unet.add_adapter(spec.unet_config())
    if spec.text_encoder:
        # peft itself, not transformers' `add_adapter`: that wrapper refuses any peft older than the
        # one its release was tested with (transformers 5.24 asks for peft >= 0.22, not yet released)
        inject_adapter_in_model(spec.text_config(model.text_encoder.config.model_type), model.text_encoder)
    model.lora_spec = spec
    for p in lora_parameters(model):
        p.data = p.data.float()
    return model


def lora_parameters(model: DiffusionModel) -> list[torch.nn.Parameter]:
    parts = [model.unet] + ([model.text_encoder] if model.lora_spec.text_encoder else [])
    return [p for part in parts for n, p in part.named_parameters() if "lora_" in n]


def get_adapter(model: DiffusionModel) -> Adapter:
    """The model's LoRA tensors as one flat dict in diffusers' file format (detached CPU copies)."""
    out = {f"unet.{k}": v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model.unet).items()}
    if model.lora_spec.text_encoder:
        # the private token's row lives in the slot, not in the adapter: never save the embedding matrix
        text = get_peft_model_state_dict(model.text_encoder, save_embedding_layers=False)
        out |= {f"text_encoder.{k}": v.detach().to("cpu", copy=True) for k, v in text.items()}
    return out


def expected_shapes(model: DiffusionModel) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in get_adapter(model).items()}


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


def check_adapter(tensors: Adapter, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse missing, unexpected, mis-shaped or non-finite tensors, naming the first one."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{source}: adapter lacks tensor {missing[0]} ({len(missing)} missing)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]} (not a LoRA of this model)")
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise UserError(f"{source}: tensor {key} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise UserError(f"{source}: tensor {key} contains NaN or Inf")


def set_adapter(model: DiffusionModel, tensors: Adapter, source: str = "adapter") -> None:
    """Load LoRA tensors into the model, all or nothing: everything is checked before anything is set."""
    check_adapter(tensors, expected_shapes(model), source)
    unet = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    set_peft_model_state_dict(model.unet, unet)
    if model.lora_spec.text_encoder:
        text = {k.removeprefix("text_encoder."): v for k, v in tensors.items() if k.startswith("text_encoder.")}
        set_peft_model_state_dict(model.text_encoder, text)


@torch.no_grad()
def set_base_delta(model: DiffusionModel, delta: Adapter | None, source: str = "base delta") -> None:
    """The frozen base delta (FLoRA): base weights W = W0 + B·A for every layer of `delta`, a
    stacked adapter of any rank with scale 1 (`aggregation.stack`); the trainable LoRA stays on
    top, untouched. W is always recomputed from W0, the weights the model was loaded with, never
    added to what is there, so the same delta gives the same model in a cached client and in a
    fresh process (a resumed run). None restores W0. All or nothing, like `set_adapter`."""
    a_suffix, b_suffix = ".lora_A.weight", ".lora_B.weight"
    saved: dict[str, torch.Tensor] = vars(model).setdefault("_base_weights", {})
    delta = delta or {}
    layers = sorted(k[: -len(a_suffix)] for k in delta if k.endswith(a_suffix))
    if set(delta) != {layer + s for layer in layers for s in (a_suffix, b_suffix)}:
        raise UserError(f"{source}: every layer needs exactly a lora_A and a lora_B tensor")
    weights = {layer: _base_weight(model, layer, source) for layer in set(saved) | set(layers)}
    new: dict[str, torch.Tensor] = {}
    for layer in layers:
        w = weights[layer]
        a, b = (delta[layer + s].to(w.device, torch.float64) for s in (a_suffix, b_suffix))
        product = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)  # conv: (out, in·k·k)
        if product.numel() != w.numel() or not torch.isfinite(product).all():
            raise UserError(f"{source}: {layer} does not fit the layer's shape {tuple(w.shape)} or is not finite")
        new[layer] = (saved.get(layer, w).double() + product.reshape(w.shape)).to(w.dtype)
    for layer, w0 in saved.items():
        weights[layer].copy_(w0)
    for layer, value in new.items():
        saved.setdefault(layer, weights[layer].detach().clone())
        weights[layer].copy_(value)


def _base_weight(model: DiffusionModel, layer: str, source: str) -> torch.nn.Parameter:
    """The frozen weight under the LoRA layer `unet.<module>` or `text_encoder.<module>`."""
    part, _, name = layer.partition(".")
    try:
        module = {"unet": model.unet, "text_encoder": model.text_encoder}[part].get_submodule(name)
    except (KeyError, AttributeError):
        module = None
    if not isinstance(module, BaseTunerLayer):
        raise UserError(f"{source}: {layer} is not a LoRA layer of this model")
    return module.get_base_layer().weight


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


def lora_targets(tensors: Adapter) -> list[str]:
    """The module names a LoRA state dict adapts (`...attn1.to_q.lora_A.weight` -> `to_q`), as
    peft's `target_modules` matches them: the known attention and conv names the key ends with."""
    known = UNET_ATTENTION + UNET_CONVS + [name for names in TEXT_ATTENTION.values() for name in names]
    targets = set()
    for key in tensors:
        module = key.rsplit(".lora_", 1)[0]
        targets |= {name for name in known if module == name or module.endswith("." + name)}
    return sorted(targets)


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


def load_adapter_file(model: DiffusionModel, path: Path) -> None:
    set_adapter(model, read_adapter_file(path), source=str(path))
