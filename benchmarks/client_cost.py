"""Client cost: one client's peak RSS and seconds per local step, against what it has to hold:
the base model, its adapters (LoRA and token slot, with their gradients and AdamW moments), one
batch of activations (the tensors autograd saves for the backward pass, measured on a real step)
and its own images.

    python benchmarks/client_cost.py [--preset demo] [--steps 20] [--quick]

Run it as a process of its own (run_all does): the peak RSS is this process's. The runtime (the
interpreter with torch, diffusers, transformers and flwr imported, before any model) is measured
first and reported apart. CPU only; Linux (/proc). Prints `name: value (target)` lines.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from many_clients import MIB, proc_memory  # benchmarks/ is on the path when run as a script

from fedaigc.client.adapter import lora_parameters
from fedaigc.client.client_app import build_client
from fedaigc.client.train import LocalClient
from fedaigc.config import preset


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(client: LocalClient) -> int:
    """The base model's weights and buffers, without the LoRA."""
    named = (nt for part in client.model.parts for nt in [*part.named_parameters(), *part.named_buffers()])
    return tensor_bytes(t for n, t in named if "lora_" not in n)


def activation_bytes(client: LocalClient) -> int:
    """What autograd keeps for the backward pass of one training step: each storage once, the
    model's own weights (which layers save too) left out."""
    weights = {
        p.untyped_storage().data_ptr() for part in (client.model.unet, client.model.text_encoder) for p in part.parameters()
    }
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    client.load(None, None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        client.fine_tune(1, torch.Generator().manual_seed(0))
    return sum(storages.values())


def mapped_files() -> dict[str, int]:
    """RSS in bytes of each file this process maps (libraries and weight files), from /proc/self/smaps."""
    rss: dict[str, int] = {}
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if not head[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
            name = head[5] if len(head) > 5 and head[5].startswith("/") else ""
        elif head[0] == "Rss:" and name:
            rss[name] = rss.get(name, 0) + int(head[1]) * 1024
    return rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=20, help="local steps timed (default: 20)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 3 steps: a smoke run")
    args = ap.parse_args()
    cfg = preset("tiny" if args.quick else args.preset)
    steps = 3 if args.quick else args.steps
    start, files_before = proc_memory(os.getpid()), mapped_files()
    runtime = start["VmRSS"]
    client = build_client(cfg, 0, cfg.federation.num_clients)
    slot = [client.token.get_slot()] if client.token is not None else []
    adapters = tensor_bytes(lora_parameters(client.model)) + tensor_bytes(slot)
    training = 4 * adapters  # weights, gradients and AdamW's two moments
    data = 2 * tensor_bytes([client.images])  # the images and their latents (pixel space: the same size)
    activations = activation_bytes(client)
    t0, cpu0 = time.perf_counter(), time.process_time()
    client.train_round(None, None, steps, torch.Generator().manual_seed(1))
    per_step, cpu_per_step = (time.perf_counter() - t0) / steps, (time.process_time() - cpu0) / steps
    end = proc_memory(os.getpid())
    peak = end["VmHWM"]
    need = model_bytes(client) + training + activations + data

    name = "client_cost"
    setting = f"{cfg.preset} preset, batch {cfg.client.batch_size}, {torch.get_num_threads()} threads, CPU"
    print(f"{name}_s_per_step: {per_step:.3f} ({setting}; {steps} steps)")
    print(f"{name}_cpu_s_per_step: {cpu_per_step:.3f} (CPU time: what a busy machine does not inflate)")
    print(f"{name}_peak_rss_mib: {peak / MIB:.0f} (runtime + model + adapters + one batch of activations + data)")
    print(f"{name}_runtime_rss_mib: {runtime / MIB:.0f} (python, torch, diffusers, transformers, flwr imported; no model)")
    print(f"{name}_model_mib: {model_bytes(client) / MIB:.1f} (base weights and buffers)")
    print(f"{name}_adapters_training_mib: {training / MIB:.2f} (LoRA + slot: weights, gradients, AdamW moments)")
    print(f"{name}_activations_mib: {activations / MIB:.1f} (saved for backward, one batch)")
    print(f"{name}_data_mib: {data / MIB:.1f} (the client's images and latents)")
    mapped = (end["RssFile"] - start["RssFile"]) / MIB
    print(f"{name}_mapped_files_growth_mib: {mapped:.0f} (RSS of mapped files that grew after the runtime: see below)")
    grown = {f: b - files_before.get(f, 0) for f, b in mapped_files().items()}
    for path, b in sorted(grown.items(), key=lambda kv: -kv[1])[:4]:
        print(f"{name}_mapped_mib.{Path(path).name}: {b / MIB:.0f} (paged in after the runtime was imported)")
    print(f"{name}_excess_ratio: {(peak - runtime) / need:.2f} (target <= 1.0: peak RSS above the runtime / what it must hold)")


if __name__ == "__main__":
    main()
