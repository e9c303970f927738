"""Per-request mixtures of the cluster LoRAs on the inference edge server.

The global LoRA is an exact stack of the cluster LoRAs, ΔW = Σ_k c_k ΔW_k, so the server can hold
each cluster's adapter (and the global one) as a named peft adapter and choose the weights per
request. peft applies one set of adapter weights to a whole batch; to batch users who ask for
different mixtures, a forward hook on every `lora_B[name]` scales that adapter's output per sample.
A one-hot request therefore runs exactly its cluster's own adapter, and a 50/50 request is the
half-half stack of two clusters.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch.nn import Conv2d, Linear

from fedaigc.errors import UserError
from fedaigc.model.base import DiffusionModel
from fedaigc.protocol.adapter_files import read_adapter_file
from fedaigc.protocol.lora import lora_targets
from fedaigc.server import aggregation as agg

GLOBAL = "global"
MIN_WEIGHT = 1e-3  # a cluster below 0.1 % of a request's mixture changes no pixel but costs a whole adapter


@dataclass
class ClusterInfo:
    tau: float
    shares: dict[int, float]
    embeddings: dict[int, torch.Tensor]  # the clusters that have one (all of the same length)


def _number(value, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise UserError(f"{where} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def read_clusters(path: Path) -> ClusterInfo:
    """clusters.json as `rundir.cluster_info` writes it, every field checked (no file: no clusters,
    the global adapter alone)."""
    if not path.is_file():
        return ClusterInfo(0.1, {}, {})
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("clusters"), dict):
        raise UserError(f"{path}: expected an object with a 'clusters' object ({{id: {{share, embedding}}}})")
    tau = _number(info.get("tau", 0.1), f"{path}: tau", positive=True)
    shares, embeddings = {}, {}
    for key, cluster in info["clusters"].items():
        where = f"{path}: cluster {key!r}"
        if not key.isdigit() or not isinstance(cluster, dict) or "share" not in cluster:
            raise UserError(f"{where}: expected an integer id and an object with 'share' (and 'embedding')")
        k = int(key)
        shares[k] = _number(cluster["share"], f"{where} share")
        emb = cluster.get("embedding")
        if emb is None:
            continue
        if not isinstance(emb, list) or not emb or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in emb):
            raise UserError(f"{where}: embedding must be a list of numbers")
        embeddings[k] = torch.tensor(emb, dtype=torch.float32)
        if not torch.isfinite(embeddings[k]).all():
            raise UserError(f"{where}: embedding contains NaN or Inf")
    lengths = {len(e) for e in embeddings.values()}
    if len(lengths) > 1:
        raise UserError(f"{path}: cluster embeddings of different lengths {sorted(lengths)}")
    if shares and sum(shares.values()) <= 0:
        raise UserError(f"{path}: the cluster shares sum to 0")
    return ClusterInfo(tau, shares, embeddings)


def _load_checked(unet, path: Path, name: str) -> None:
    """Load one adapter file as the named peft adapter, refusing a file whose tensors are corrupt or
    not finite (`read_adapter_file`) or whose UNet layers are not exactly the layers of this UNet
    that its module names target (a missing layer would go without its LoRA, a renamed one too)."""
    tensors = read_adapter_file(path)
    keys = {k.removeprefix("unet.") for k in tensors if k.startswith("unet.")}
    if not keys:
        raise UserError(f"{path}: no UNet LoRA tensors (keys unet.*)")
    targets = LoraConfig(target_modules=lora_targets(keys))
    layers = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, LoraLayer | Linear | Conv2d) and check_target_module_exists(targets, n)
    ]
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        what = [f"lacks tensor unet.{k}" for k in missing[:1]] + [
            f"has unet.{k}, not a layer of this model" for k in unexpected[:1]
        ]
        raise UserError(f"{path}: {' and '.join(what)} ({len(missing)} missing, {len(unexpected)} unexpected)")
    try:
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name=name)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as e:
        raise UserError(f"cannot load {path} into the model: {e}") from None


class ClusterMixer:
    """The service's UNet with every cluster's LoRA (and the global stack) loaded side by side."""

    def __init__(self, model: DiffusionModel, adapters_dir: Path):
        adapters_dir = Path(adapters_dir)
        info = read_clusters(adapters_dir / "clusters.json")
        self.clusters = sorted(info.shares)
        self.tau, self.shares, self.embeddings = info.tau, info.shares, info.embeddings
        self.names = [f"cluster_{k}" for k in self.clusters]
        if (adapters_dir / "global.safetensors").is_file():
            self.names.append(GLOBAL)
        if not self.names:
            raise UserError(f"{adapters_dir}: no cluster_<k>.safetensors or global.safetensors to serve")
        unet = model.unet
        for name in self.names:
            path = adapters_dir / f"{name}.safetensors"
            if not path.is_file():
                raise UserError(f"{adapters_dir}: clusters.json names {name} but {path.name} is missing")
            _load_checked(unet, path, name)
        self.unet = unet
        self._active: list[str] | None = None  # the adapters set active, [] = LoRA layers off; None: not set yet
        self._weights: torch.Tensor | None = None  # (batch, len(names)) while a batch runs
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                for i, name in enumerate(self.names):
                    if name in module.lora_B:
                        module.lora_B[name].register_forward_hook(self._scale_hook(i))

    def _scale_hook(self, index: int):
        def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            if self._weights is None:
                raise RuntimeError("ClusterMixer: run the UNet inside `with mixer.weights(...)`")
            w = self._weights[:, index]
            w = w.repeat(output.shape[0] // w.shape[0])  # classifier-free guidance doubles the batch
            return output * w.to(output.device, output.dtype).view(-1, *[1] * (output.dim() - 1))

        return hook

    @contextmanager
    def weights(self, weights: torch.Tensor):
        """Run the UNet with per-sample adapter weights (batch, len(names)). Only adapters that
        some sample uses are active, so a one-cluster batch costs one adapter, not all of them, and
        a batch of all-zero rows (mix=base) runs with every LoRA layer off: the base model itself."""
        used = [name for i, name in enumerate(self.names) if bool((weights[:, i] > 0).any())]
        if used != self._active:
            if used:
                if self._active == []:
                    self.unet.enable_lora()
                self.unet.set_adapters(used, [1.0] * len(used))
            else:
                self.unet.disable_lora()
            self._active = used
        self._weights = weights
        try:
            yield
        finally:
            self._weights = None

    # how a request's weights are chosen -------------------------------------------------------
    def _shares(self, ks: list[int]) -> dict[int, float]:
        """The shares of clusters `ks`, summing to 1 (equal when they are all 0)."""
        total = sum(self.shares[k] for k in ks)
        return {k: self.shares[k] / total if total > 0 else 1 / len(ks) for k in ks}

    def global_weights(self, allowed: list[int] | None = None) -> torch.Tensor:
        """The global stack as the training server built it (DED and SNT coefficients included);
        for a token limited to the `allowed` clusters, those clusters mixed by their shares."""
        if allowed is not None:
            shares = self._shares(allowed)
            return self.cluster_weights([shares.get(k, 0.0) for k in self.clusters])
        w = torch.zeros(len(self.names))
        if GLOBAL in self.names:
            w[self.names.index(GLOBAL)] = 1.0
        else:  # a single cluster (fedavg-like runs): its own adapter
            w[0] = 1.0
        return w

    def uniform_weights(self, allowed: list[int] | None = None) -> torch.Tensor:
        """Equal weights over every cluster (the `allowed` ones for a token limited to them): a
        mixture chosen without anything of the request; with no clusters, the global adapter."""
        ks = self.clusters if allowed is None else allowed
        if not ks:
            return self.global_weights()
        return self.cluster_weights([1 / len(ks) if k in ks else 0.0 for k in self.clusters])

    def base_weights(self) -> torch.Tensor:
        """No adapter: the base model's steps."""
        return torch.zeros(len(self.names))

    def cluster_weights(self, per_cluster: list[float]) -> torch.Tensor:
        """Explicit weights, one per cluster in id order."""
        if len(per_cluster) != len(self.clusters):
            raise ValueError(f"weights: expected {len(self.clusters)} values (one per cluster), got {len(per_cluster)}")
        return torch.tensor([*per_cluster, *([0.0] if GLOBAL in self.names else [])], dtype=torch.float32)

    def request_weights(self, task_embedding: torch.Tensor, allowed: list[int] | None = None) -> torch.Tensor:
        """DED against the request: clusters whose domain embedding is near the request's task
        embedding dominate (see `aggregation.request_coefficients`); only the `allowed` ones for a
        token limited to them."""
        ks = self.clusters if allowed is None else allowed
        if not ks or any(k not in self.embeddings for k in ks):
            return self.global_weights(allowed)
        dim = next(iter(self.embeddings.values())).shape[0]
        if task_embedding.shape != (dim,):
            raise ValueError(f"task_embedding: expected shape ({dim},), got {tuple(task_embedding.shape)}")
        c = agg.request_coefficients(task_embedding, {k: self.embeddings[k] for k in ks}, self._shares(ks), self.tau)
        w = torch.tensor([c.get(k, 0.0) for k in self.clusters])
        w = torch.where(w < MIN_WEIGHT, 0.0, w)
        return self.cluster_weights((w / w.sum()).tolist())
