"""LoRA adapters in a model: attach them with peft, read them out as flat tensor dicts (the
protocol's `Adapter`, fedaigc/protocol/lora.py) and put them back, load an adapter file
(fedaigc/protocol/adapter_files.py) into a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from fedaigc.errors import UserError
from fedaigc.model.base import DiffusionModel
from fedaigc.protocol.adapter_files import read_adapter_file
from fedaigc.protocol.lora import TEXT_ATTENTION, UNET_ATTENTION, UNET_CONVS, Adapter, LoraSpec


def unet_lora_config(spec: LoraSpec) -> LoraConfig:
    targets = UNET_ATTENTION + (UNET_CONVS if spec.convs else [])
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets, init_lora_weights="gaussian")


def text_lora_config(spec: LoraSpec, model_type: str) -> LoraConfig:
    family = "clip" if "clip" in model_type else "bert"
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=TEXT_ATTENTION[family], init_lora_weights="gaussian")


def attach_lora(model: DiffusionModel, spec: LoraSpec) -> DiffusionModel:
    """Add a fresh LoRA (B = 0, so the model is unchanged) to the UNet and, if asked, the text
    encoder. The LoRA weights are float32 whatever the frozen weights' dtype (peft casts each
    layer's input to them and the output back), as diffusers' `cast_training_params` does."""
    model.unet.add_adapter(unet_lora_config(spec))
    if spec.text_encoder:
        # peft itself, not transformers' `add_adapter`: that wrapper refuses any peft older than the
        # one its release was tested with (transformers 5.24 asks for peft >= 0.22, not yet released)
        inject_adapter_in_model(text_lora_config(spec, model.text_encoder.config.model_type), model.text_encoder)
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
    fresh process (a resumed run). None restores W0. All or nothing, like `set_adapter`.
    Not diffusers' `fuse_lora`/`unfuse_lora`: they call peft's `merge`/`unmerge`, which add and
    subtract the delta in place (W0 + BA - BA drifts from W0 round after round), and they would
    need a peft adapter of the stack's rank, which changes every round."""
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


def load_adapter_file(model: DiffusionModel, path: Path) -> None:
    set_adapter(model, read_adapter_file(path), source=str(path))
