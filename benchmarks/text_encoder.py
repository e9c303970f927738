"""Text encoder of the base: the frozen all-MiniLM-L6-v2 (the default) vs a small CLIP text model
trained jointly with the UNet. Both pretrain with the same budget (steps, batch, seed, data: the
demo preset's set); then class accuracy and style shares of base samples, seconds per step,
parameter counts, and the style accuracy one sketch client reaches after a short fine-tune.

    python benchmarks/text_encoder.py [--steps 1000] [--per-class 16] [--finetune-steps 100] [--out DIR]

Pretraining resumes from `OUT/<encoder>/checkpoint.pt`, so an interrupted run can be restarted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from client_finetune import train_one_client  # benchmarks/ is on the path when run as a script

from fedaigc.config import Config, preset
from fedaigc.data.dataset import ImageFolder, ensure_dataset, split
from fedaigc.eval.base_model import class_samples
from fedaigc.eval.evaluator import Evaluator, evaluator_for
from fedaigc.eval.report import save_grid
from fedaigc.eval.scoring import score
from fedaigc.model.base import TEXT_ENCODERS, load_model
from fedaigc.model.pretrain import pretrain
from fedaigc.model.sampling import generate


def fine_tune(
    cfg: Config, model_dir: Path, data: ImageFolder, train, test, evaluator: Evaluator, domain: str, steps: int, out: Path
) -> dict:
    """One client (200 images, 90 % `domain`) trains its LoRA + private token for `steps` steps,
    as benchmarks/client_finetune.py does; scores 32 samples of its private-token prompts."""
    c = cfg.client
    client, upload, seconds = train_one_client(cfg, model_dir, data, train, domain, steps)
    classes = [data.classes[i % len(data.classes)] for i in range(c.samples)]
    prompts = [client.prompt_for(domain, k) for k in classes]
    images = generate(
        client.model, prompts, list(range(1000, 1000 + c.samples)), cfg.sample.steps, cfg.sample.guidance, progress=False
    )
    real = data.stack([s for s in test if s.domain == domain])
    save_grid([real[:16], images[:16]], out / f"client_{domain}_grid.png", labels=["real", "client"])
    result = score(evaluator, images, real, domain, classes, cfg.evaluator.confidence)
    return {**result, "steps": steps, "seconds": round(seconds, 1), "final_loss": upload.train_loss}


def measure(kind: str, args, data: ImageFolder, train, test, evaluator: Evaluator) -> dict:
    """Pretrain the base with text encoder `kind`, then score it (and a client fine-tuned on it)."""
    cfg = preset("demo")
    cfg.model = dataclasses.replace(cfg.model, text_encoder=kind)
    cfg.pretrain = dataclasses.replace(cfg.pretrain, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    out = args.out / kind
    model_dir = pretrain(cfg, data.root, out, progress=False)
    info = json.loads((model_dir / "pretrain.json").read_text())
    model = load_model(model_dir)
    classes = list(evaluator.classes)
    t0 = time.perf_counter()
    images = class_samples(model, cfg, classes, args.per_class, progress=False)
    sample_seconds = time.perf_counter() - t0
    save_grid(list(images.split(args.per_class)), out / "base_grid.png", labels=classes)
    asked = [c for c in classes for _ in range(args.per_class)]
    base = score(evaluator, images, data.stack(test), None, asked, cfg.evaluator.confidence)
    result = {
        "text_encoder": kind,
        "steps": info["steps"],
        "pretrain_seconds": info["seconds"],
        "seconds_per_step": info["seconds"] / info["steps"],
        "unet_params": info["params"],
        "text_params": info["text_encoder"]["params"],
        "text_params_trained": info["text_encoder"]["params"] if info["text_encoder"]["trained"] else 0,
        "base": {**base, "samples": len(images), "sample_seconds": round(sample_seconds, 1)},
    }
    if args.finetune_steps:
        result["client"] = fine_tune(cfg, model_dir, data, train, test, evaluator, args.domain, args.finetune_steps, out)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(results: dict[str, dict], domains: list[str]) -> str:
    """Markdown table, one column per encoder and the ratio of the second to the first."""
    a, b = list(results)
    rows = [
        ("pretraining s/step", lambda r: r["seconds_per_step"], "{:.3f}"),
        ("pretraining total s", lambda r: r["pretrain_seconds"], "{:.0f}"),
        ("UNet params", lambda r: r["unet_params"], "{:,}"),
        ("text encoder params", lambda r: r["text_params"], "{:,}"),
        ("text encoder params trained", lambda r: r["text_params_trained"], "{:,}"),
        ("base class acc, confident", lambda r: r["base"]["class_acc"], "{:.1%}"),
        ("base class acc, top guess", lambda r: r["base"]["class_top"], "{:.1%}"),
        ("base evaluator-FID", lambda r: r["base"]["fid"], "{:.1f}"),
        *[(f"base style share {d}", lambda r, d=d: r["base"]["domain_shares"][d], "{:.1%}") for d in domains],
    ]
    if all("client" in r for r in results.values()):
        n = results[a]["client"]["steps"]
        rows += [
            (f"client style acc after {n} steps, confident", lambda r: r["client"]["style_acc"], "{:.1%}"),
            ("client style acc, top guess", lambda r: r["client"]["style_top"], "{:.1%}"),
            ("client class acc, confident", lambda r: r["client"]["class_acc"], "{:.1%}"),
            ("client fine-tune s", lambda r: r["client"]["seconds"], "{:.0f}"),
        ]
    lines = [f"| | {a} | {b} | {b} / {a} |", "|---|---|---|---|"]
    for name, get, fmt in rows:
        x, y = get(results[a]), get(results[b])
        ratio = f"{y / x:.2f}" if x else "-"
        lines.append(f"| {name} | {fmt.format(x)} | {fmt.format(y)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="pretraining steps of each variant (default: 1000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=16, help="base samples per class (default: 16, i.e. 96)")
    ap.add_argument("--finetune-steps", type=int, default=100, help="client fine-tune steps; 0 skips it (default: 100)")
    ap.add_argument("--domain", default="sketch", help="the fine-tuning client's domain (default: sketch)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_text_encoder"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = preset("demo")
    data = ImageFolder(ensure_dataset(None, cfg), size=cfg.data.size)
    train, test = split(data.samples, cfg.data.held_out, cfg.data.seed)
    evaluator = evaluator_for(data, train, cfg.evaluator, progress=False)
    results = {}
    for kind in TEXT_ENCODERS:
        results[kind] = measure(kind, args, data, train, test, evaluator)
        print(f"{kind}: done ({results[kind]['pretrain_seconds']:.0f} s pretraining)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2) + "\n"
    )
    print(table(results, data.domains))
    print(f"threshold {cfg.evaluator.confidence}; grids and models under {args.out}")


if __name__ == "__main__":
    main()
