"""The run directory: everything a federated run writes, atomically, so a killed server resumes.

RUN/config.toml                       fully resolved config
RUN/metrics.json                      per-round metrics (+ `final` after evaluation)
RUN/rounds/round_003/state.*          the server's whole state after round 3
RUN/adapters/round_003/*.safetensors  that round's adapters
RUN/adapters/{client_<id>,cluster_<k>,global}.safetensors   the latest round's (diffusers format)
RUN/adapters/clusters.json            members, shares and domain embeddings (for the inference server)
RUN/devices/client_<id>/style_token.safetensors   a simulated device's private token (name + slot):
                                      in a deployment it never leaves the device
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedaigc.client.adapter import LoraSpec, save_adapter
from fedaigc.server.strategies import Aggregator


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@contextmanager
def _replaced_atomically(folder: Path):
    """Yield an empty temporary folder; on success it replaces `folder` in one rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text()) if self.metrics_file.is_file() else {"rounds": []}

    def device_dir(self, cid: int) -> Path:
        return self.root / "devices" / f"client_{cid}"

    def last_round(self) -> int:
        done = [int(p.name.split("_")[1]) for p in (self.root / "rounds").glob("round_*") if (p / "state.json").is_file()]
        return max(done, default=0)

    def save_round(self, aggregator: Aggregator, entry: dict, spec: LoraSpec) -> None:
        """Write one finished round: adapters first, then the state, then metrics (the state's
        presence marks the round as finished)."""
        r = entry["round"]
        adapters = self.root / "adapters" / f"round_{r:03d}"
        with _replaced_atomically(adapters) as tmp:
            self._write_adapters(tmp, aggregator, spec)
        with _replaced_atomically(self.root / "rounds" / f"round_{r:03d}") as tmp:
            tensors, meta = aggregator.state()
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        metrics = self.metrics()
        metrics["rounds"] = [e for e in metrics["rounds"] if e["round"] < r] + [entry]
        write_json(self.metrics_file, metrics)
        for f in adapters.iterdir():  # the latest round's adapters, where users look first
            shutil.copyfile(f, self.root / "adapters" / f.name)

    def _write_adapters(self, folder: Path, aggregator: Aggregator, spec: LoraSpec) -> None:
        for cid in sorted(aggregator.assignment):
            adapter, slot = aggregator.model_for(cid)
            if adapter is not None:
                save_adapter(folder / f"client_{cid}.safetensors", adapter, spec)
        for k, adapter in aggregator.cluster_adapters.items():
            save_adapter(folder / f"cluster_{k}.safetensors", adapter, spec)
            save_file({"slot": aggregator.cluster_slots[k].contiguous()}, str(folder / f"cluster_{k}.slot.safetensors"))
        write_json(folder / "clusters.json", cluster_info(aggregator))
        g = aggregator.global_adapter
        if g is not None:
            rank = next(v.shape[0] for k, v in g.items() if k.endswith(".lora_A.weight"))
            scale = aggregator.global_scale
            save_adapter(folder / "global.safetensors", g, LoraSpec(rank, scale * rank, spec.text_encoder, spec.convs))

    def restore(self, aggregator: Aggregator, r: int) -> None:
        state_dir = self.root / "rounds" / f"round_{r:03d}"
        aggregator.restore(load_file(str(state_dir / "state.safetensors")), json.loads((state_dir / "state.json").read_text()))


def cluster_info(aggregator: Aggregator) -> dict:
    """What the inference server needs to weight clusters per request: members, shares, domain
    embeddings (the clustering centroids) and the DED temperature."""
    ks = sorted(aggregator.cluster_adapters)
    members = {k: sorted(c for c, kk in aggregator.assignment.items() if kk == k) for k in ks}
    total = max(1, sum(len(m) for m in members.values()))
    clusters = {
        str(k): {
            "members": members[k],
            "share": len(members[k]) / total,
            "embedding": aggregator.centroids[k].tolist() if k in aggregator.centroids else None,
        }
        for k in ks
    }
    return {"strategy": aggregator.cfg.strategy, "tau": aggregator.cfg.tau, "clusters": clusters}


def bytes_of(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
