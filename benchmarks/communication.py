"""Communication per client per round: what a client uploads (its LoRA, private-token slot and
task embedding) and downloads (its cluster's LoRA and slot), against sending the full model,
and the `client.transfer_dtype` option (float16 / bfloat16 on the wire, float32 math).

Bytes come from the real adapter of the demo preset on the embedded model (rank 4, UNet +
text-encoder attention), and from shapes for Stable Diffusion 1.5 (rank 8; its UNet and CLIP text
encoder are built on PyTorch's meta device: real parameter counts, no weights). The round-trip
error is measured on the trained adapters of a finished run.

    python benchmarks/communication.py --quick                 # seconds: the latest adapters of --run only
    python benchmarks/communication.py [--run runs/demo/cluster]   # every round's adapters of --run
    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/communication.py --quality runs/demo/cluster
        # + one demo federation with transfer_dtype = "float16", compared with that run scored the
        # same way (a hybrid-scored run is re-scored in a copy, OUT_fp32): about an hour on 2 busy cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
import torch
from diffusers import UNet2DConditionModel
from server_scale import demo_shapes, sd15_shapes  # benchmarks/ is on the path when run as a script
from transformers import CLIPTextConfig, CLIPTextModel

from fedaigc import config
from fedaigc.eval.evaluate import evaluate_run
from fedaigc.model.base import load_model
from fedaigc.protocol.adapter_files import read_adapter_file
from fedaigc.protocol.lora import TEXT_ATTENTION, Adapter
from fedaigc.protocol.wire import bytes_of, from_wire, to_wire, wire_dtype
from fedaigc.server import aggregation as agg
from fedaigc.server.rundir import RunDir

TARGET = 0.02  # the expectation: the upload is < 2 % of the full UNet


@dataclasses.dataclass
class Sizes:
    """Parameters of one setting: the LoRA (on the UNet, on the text encoder), the token-slot width
    and the frozen parts it adapts."""

    unet_lora: int
    text_lora: int
    slot: int  # width of the private token's embedding (the task embedding has the same)
    unet: int
    text_encoder: int

    @property
    def lora(self) -> int:
        return self.unet_lora + self.text_lora

    def bytes_up(self) -> int:
        return 4 * (self.lora + 2 * self.slot)  # float32 LoRA + slot + task embedding

    def bytes_down(self) -> int:
        return 4 * (self.lora + self.slot)  # float32: the cluster's LoRA + its slot


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def demo_sizes() -> Sizes:
    """The demo preset's LoRA on the embedded model, shapes from peft's own adapter."""
    model = load_model()
    shapes = demo_shapes()
    unet_lora = sum(math.prod(s) for k, s in shapes.items() if k.startswith("unet."))
    text_lora = sum(math.prod(s) for k, s in shapes.items() if k.startswith("text_encoder."))
    return Sizes(
        unet_lora,
        text_lora,
        model.text_encoder.get_input_embeddings().embedding_dim,
        count(model.unet),
        count(model.text_encoder),
    )


def sd15_sizes(rank: int = 8) -> Sizes:
    """Rank-`rank` LoRA on the attention projections of SD-1.5's UNet and CLIP ViT-L/14 text
    encoder; both models built on the meta device from their published configs."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        )
    text_lora = sum(
        rank * (m.in_features + m.out_features)
        for name, m in text.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_ATTENTION["clip"]
    )
    unet_lora = sum(math.prod(s) for s in sd15_shapes(rank).values())
    return Sizes(unet_lora, text_lora, text.config.hidden_size, count(unet), count(text))


def relative_errors(adapters: list[Adapter], name: str) -> tuple[float, float]:
    """Relative Frobenius error after a trip to the wire and back: of the tensors (A and B) and of
    the weight updates B·A they make, over all adapters' layers together."""
    dtype = wire_dtype(name)
    t_err = t_norm = w_err = w_norm = 0.0
    for adapter in adapters:
        back = from_wire(to_wire(adapter, dtype))
        t_err += sum((back[k].double() - v.double()).square().sum().item() for k, v in adapter.items())
        t_norm += sum(v.double().square().sum().item() for v in adapter.values())
        for layer in agg.layers(adapter):
            b, a = agg.factors(adapter, layer)
            b2, a2 = agg.factors(back, layer)
            w_err += (b2 @ a2 - b @ a).square().sum().item()
            w_norm += (b @ a).square().sum().item()
    return math.sqrt(t_err / t_norm), math.sqrt(w_err / w_norm)


def settings(toml: str) -> dict:
    """A config's TOML text as flat `section.key` values (read as text: an older or newer run may
    hold keys this checkout does not know)."""
    values = tomllib.loads(toml)
    return {f"{s}.{k}": v for s, table in values.items() if isinstance(table, dict) for k, v in table.items()}


def scored(run: Path) -> dict:
    """The final scores of `run`, if it has them."""
    metrics = run / "metrics.json"
    return json.loads(metrics.read_text()).get("final", {}) if metrics.is_file() else {}


def rescored_on_device(run: Path, dest: Path) -> Path:
    """A copy of `run` at `dest`, its last round scored as `fedaigc federate` scores (every
    sampling step on the device): `fedaigc demo` scores with hybrid inference, whose images differ."""
    if scored(dest).get("inference", {}).get("hybrid", True):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run, dest, ignore=shutil.ignore_patterns("samples", "devices"))
        evaluate_run(config.from_run_config({"config": (run / "config.toml").read_text()}), RunDir(dest), None, None)
    return dest


def quality(base_run: Path, out: Path) -> None:
    """One federation with the base run's resolved config and transfer_dtype = "float16" (unless
    `out` already holds a scored one), then both runs' final mean scores and bytes per round,
    scored the same way (a hybrid-scored base run is re-scored on the device, in a copy)."""
    cfg = config.from_run_config({"config": (base_run / "config.toml").read_text()})
    if not scored(out):
        cfg.client.transfer_dtype = "float16"
        with tempfile.TemporaryDirectory() as tmp:
            toml = Path(tmp) / "config.toml"
            config.save(cfg, toml)
            cmd = [sys.executable, "-m", "fedaigc", "federate", "--preset", cfg.preset, "--strategy", cfg.federation.strategy]
            subprocess.run([*cmd, "--config", str(toml), "--out", str(out)], check=True)
    was, now = (settings((r / "config.toml").read_text()) for r in (base_run, out))
    defaults = settings(config.to_toml(config.preset(cfg.preset)))  # what a key absent from the older run means
    known = [k for k in now if k in was or k in defaults]
    changed = [f"{k} = {now[k]!r}" for k in known if was.get(k, defaults.get(k)) != now[k]]
    unknown = len(now) - len(known)
    print(f"communication_quality_config_diff: {', '.join(changed)} (vs {base_run}; {unknown} keys unknown to this checkout)")
    base, half = (json.loads((r / "metrics.json").read_text()) for r in (base_run, out))
    dtype = now["client.transfer_dtype"]
    hybrid = scored(base_run).get("inference", {}).get("hybrid", False)
    same_way = scored(rescored_on_device(base_run, out.with_name(out.name + "_fp32"))) if hybrid else base["final"]
    for key, label in (("style_acc", "style accuracy"), ("class_acc", "class accuracy"), ("fid", "evaluator-FID")):
        h, b = half["final"]["mean"][key], same_way["mean"][key]
        note = f"; as scored in {base_run}, with hybrid inference: {base['final']['mean'][key]:.4f}" if hybrid else ""
        print(f"communication_{dtype}_{key}: {h:.4f} ({label}; float32 run: {b:.4f}, diff {h - b:+.4f}{note})")
    for key in ("bytes_up", "bytes_down"):
        h, b = half["rounds"][-1][key], base["rounds"][-1][key]
        print(f"communication_{dtype}_run_{key}: {h} (metrics.json, last round; float32 run: {b}, ratio {h / b:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo/cluster"), help="a finished run: its trained adapters")
    ap.add_argument("--quick", action="store_true", help="round-trip error on the latest round's adapters only (seconds)")
    ap.add_argument("--quality", type=Path, metavar="RUN_FP32", help="run one float16 federation and compare with this run")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fp16"), help="the float16 run (default: runs/bench_fp16)")
    args = ap.parse_args()
    if args.quick and args.quality:
        ap.error("--quick measures in seconds; --quality runs a whole federation")

    for name, sizes, note in (
        ("demo", demo_sizes(), "rank 4 on the embedded UNet and MiniLM text encoder"),
        ("sd15", sd15_sizes(), "rank 8 on SD-1.5's UNet and CLIP text-encoder attention, from shapes"),
    ):
        print(f"communication_{name}_lora_params: {sizes.lora} ({note}; UNet part {sizes.unet_lora})")
        print(f"communication_{name}_bytes_up: {sizes.bytes_up()} (float32 per client per round: LoRA + token slot + embedding)")
        print(f"communication_{name}_bytes_down: {sizes.bytes_down()} (float32 per client per round: cluster LoRA + slot)")
        print(f"communication_{name}_unet_params: {sizes.unet} (text encoder: {sizes.text_encoder})")
        ratios = {
            "up_vs_unet": sizes.bytes_up() / (4 * sizes.unet),
            "up_vs_unet_text": sizes.bytes_up() / (4 * (sizes.unet + sizes.text_encoder)),
            "unet_lora_vs_unet": sizes.unet_lora / sizes.unet,
        }
        for what, ratio in ratios.items():
            print(f"communication_{name}_{what}: {ratio:.2%} (< {TARGET:.0%})")
    metrics = args.run / "metrics.json"
    if metrics.is_file():
        last = json.loads(metrics.read_text())["rounds"][-1]
        up, down = last["bytes_up"], last["bytes_down"]
        print(f"communication_demo_metrics_json: up {up}, down {down} (float32, {args.run}; its bytes_down counts the LoRA only)")

    files = sorted((args.run / "adapters").glob("*.safetensors" if args.quick else "round_*/*.safetensors"))
    adapters = [read_adapter_file(f) for f in files if not f.name.endswith(".slot.safetensors")]
    if not adapters:
        sys.exit(f"no trained adapters in {args.run / 'adapters'}: run `fedaigc demo` (or pass --run)")
    for name in ("float16", "bfloat16"):
        ratio = bytes_of(to_wire(adapters[0], wire_dtype(name))) / bytes_of(adapters[0])
        tensor_err, update_err = relative_errors(adapters, name)
        print(f"communication_{name}_bytes_ratio: {ratio:.3f} (of float32)")
        print(
            f"communication_{name}_roundtrip_rel_error: {tensor_err:.2e} (LoRA tensors; weight updates B·A {update_err:.2e}; "
            f"{len(adapters)} trained adapters of {args.run}; unit roundoff {torch.finfo(wire_dtype(name)).eps / 2:.1e})"
        )
    if args.quality:
        quality(args.quality, args.out)


if __name__ == "__main__":
    main()
