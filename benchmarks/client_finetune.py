"""One client fine-tunes its LoRA + private token for its default budget; style accuracy,
class accuracy and evaluator-FID of its samples vs. the base model's for the same prompts.

    python benchmarks/client_finetune.py --preset demo --domain sketch [--steps 150] [--batch-size 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedaigc.client.train import LocalClient
from fedaigc.config import Config, preset
from fedaigc.data.dataset import ImageFolder, ensure_dataset, partition, split
from fedaigc.data.render import STYLE_WORDS
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.report import save_grid
from fedaigc.eval.scoring import score
from fedaigc.model.base import load_model
from fedaigc.model.sampling import generate
from fedaigc.protocol.round import Upload


def train_one_client(
    cfg: Config, model_dir: Path | None, data: ImageFolder, train: list, domain: str, steps: int
) -> tuple[LocalClient, Upload, float]:
    """The `domain` client of an 8-client partition (200 images, 90 % `domain`), trained from the
    initial LoRA and slot for `steps` steps; returns it, its upload and the training seconds."""
    share = next(s for s in partition(train, 8, 200, purity=0.9, seed=0) if s.domain == domain)
    client = LocalClient(
        load_model(model_dir),
        data.stack(share.samples),
        [s.domain for s in share.samples],
        [s.cls for s in share.samples],
        cfg.client,
        seed=0,
    )
    t0 = time.perf_counter()
    upload = client.train_round(None, None, steps, torch.Generator().manual_seed(0))
    return client, upload, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--domain", default="sketch")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default: 150, the one-client budget)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    ap.add_argument("--model", type=Path, help="base model (default: embedded)")
    ap.add_argument("--prompt-mode", default="private", choices=["private", "plain"])
    ap.add_argument("--convs", action="store_true", help="LoRA on the resnet convs too")
    ap.add_argument("--no-text-lora", action="store_true", help="no LoRA on the text encoder")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_client"))
    args = ap.parse_args()
    cfg = preset(args.preset)
    c = cfg.client
    c.prompt_mode, c.convs, c.text_encoder_lora = args.prompt_mode, args.convs, not args.no_text_lora
    steps, c.batch_size = args.steps, args.batch_size
    data = ImageFolder(ensure_dataset(None, cfg), size=cfg.data.size)
    train, test = split(data.samples, cfg.data.held_out, cfg.data.seed)
    evaluator = evaluator_for(data, train, cfg.evaluator)
    real = data.stack([s for s in test if s.domain == args.domain])
    classes = [data.classes[i % len(data.classes)] for i in range(c.samples)]
    seeds = list(range(1000, 1000 + c.samples))
    thr = cfg.evaluator.confidence
    word = STYLE_WORDS[args.domain]

    base = load_model(args.model)
    plain_prompts = [f"a {word} of a {k}" for k in classes]
    base_images = generate(base, plain_prompts, seeds, cfg.sample.steps, cfg.sample.guidance)
    base_scores = score(evaluator, base_images, real, args.domain, classes, thr)

    client, upload, seconds = train_one_client(cfg, args.model, data, train, args.domain, steps)
    prompts = [client.prompt_for(args.domain, k) for k in classes]
    images = generate(client.model, prompts, seeds, cfg.sample.steps, cfg.sample.guidance)
    tuned = score(evaluator, images, real, args.domain, classes, thr)

    args.out.mkdir(parents=True, exist_ok=True)
    save_grid(
        [real[: c.samples // 2], base_images[: c.samples // 2], images[: c.samples // 2]],
        args.out / "grid.png",
        labels=["real", "base", "client"],
    )
    result = {
        "preset": args.preset,
        "domain": args.domain,
        "steps": steps,
        "seconds": round(seconds, 1),
        "images": upload.num_examples,
        "threshold": thr,
        "base": base_scores,
        "client": tuned,
        "final_loss": upload.train_loss,
        "prompt_mode": c.prompt_mode,
        "convs": c.convs,
        "text_lora": c.text_encoder_lora,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, s in (("base", base_scores), ("client", tuned)):
        print(
            f"{name:7s} style {s['style_acc']:.1%} (top {s['style_top']:.1%})  class {s['class_acc']:.1%} "
            f"(top {s['class_top']:.1%})  evaluator-FID {s['fid']:.1f}  KID {s['kid']:.4f}  alignment {s['alignment']:.3f}"
        )
    print(f"fine-tune: {steps} steps in {seconds:.0f} s on {upload.num_examples} images ({args.domain})")
    print(f"fid_ratio (client / base): {tuned['fid'] / base_scores['fid']:.2f}")
    print(f"grid: {args.out / 'grid.png'}")


if __name__ == "__main__":
    main()
