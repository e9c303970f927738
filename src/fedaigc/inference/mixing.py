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
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from fedaigc.errors import UserError
from fedaigc.model.base import DiffusionModel
from fedaigc.server import aggregation as agg

GLOBAL = "global"
MIN_WEIGHT = 1e-3  # a cluster below 0.1 % of a request's mixture changes no pixel but costs a whole adapter


class ClusterMixer:
    """The service's UNet with every cluster's LoRA (and the global stack) loaded side by side."""

    def __init__(self, model: DiffusionModel, adapters_dir: Path):
        adapters_dir = Path(adapters_dir)
        info_file = adapters_dir / "clusters.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {"clusters": {}}
        self.clusters = sorted(int(k) for k in info["clusters"])
        self.tau = float(info.get("tau", 0.1))
        self.shares = {k: float(info["clusters"][str(k)]["share"]) for k in self.clusters}
        self.embeddings = {
            k: torch.tensor(e) for k in self.clusters if (e := info["clusters"][str(k)].get("embedding")) is not None
        }
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
            try:
                with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    unet.load_lora_adapter(str(adapters_dir), weight_name=path.name, prefix="unet", adapter_name=name)
            except (ValueError, RuntimeError, OSError, KeyError) as e:
                raise UserError(f"cannot load {path} into the model: {e}") from None
        self.unet = unet
        self._active: list[str] = []
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
        some sample uses are active, so a one-cluster batch costs one adapter, not all of them."""
        used = [name for i, name in enumerate(self.names) if bool((weights[:, i] > 0).any())]
        if used != self._active:
            self.unet.set_adapters(used or self.names[:1], [1.0] * max(1, len(used)))
            self._active = used
        self._weights = weights
        try:
            yield
        finally:
            self._weights = None

    # how a request's weights are chosen -------------------------------------------------------
    def global_weights(self) -> torch.Tensor:
        """The global stack as the training server built it (DED and SNT coefficients included)."""
        w = torch.zeros(len(self.names))
        if GLOBAL in self.names:
            w[self.names.index(GLOBAL)] = 1.0
        else:  # a single cluster (fedavg-like runs): its own adapter
            w[0] = 1.0
        return w

    def cluster_weights(self, per_cluster: list[float]) -> torch.Tensor:
        """Explicit weights, one per cluster in id order."""
        if len(per_cluster) != len(self.clusters):
            raise ValueError(f"weights: expected {len(self.clusters)} values (one per cluster), got {len(per_cluster)}")
        return torch.tensor([*per_cluster, *([0.0] if GLOBAL in self.names else [])], dtype=torch.float32)

    def request_weights(self, task_embedding: torch.Tensor) -> torch.Tensor:
        """DED against the request: clusters whose domain embedding is near the request's task
        embedding dominate (see `aggregation.request_coefficients`)."""
        if len(self.embeddings) != len(self.clusters) or not self.clusters:
            return self.global_weights()
        dim = next(iter(self.embeddings.values())).shape[0]
        if task_embedding.shape != (dim,):
            raise ValueError(f"task_embedding: expected shape ({dim},), got {tuple(task_embedding.shape)}")
        c = agg.request_coefficients(task_embedding, self.embeddings, self.shares, self.tau)
        w = torch.tensor([c[k] for k in self.clusters])
        w = torch.where(w < MIN_WEIGHT, 0.0, w)
        return self.cluster_weights((w / w.sum()).tolist())
