"""Style learned per step with biased vs uniform training timesteps (`client.timestep_bias`).

One client per style, the demo's budget: its share of an 8-client partition (64 images, 90 % its
style), 3 rounds x 40 steps of batch 16, a fresh optimizer each round, as in a federation without
the averaging. The same client is trained twice, with timesteps T(1 - u^bias) and uniform ones,
and scored on the same `--samples` seeds. Prints both and the ratio of mean style accuracies.

    python benchmarks/timestep_bias.py [--bias 2.0] [--partition-seed 0] [--samples 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from fedaigc.client.train import LocalClient
from fedaigc.config import preset
from fedaigc.data.dataset import ImageFolder, ensure_dataset, partition, split
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.scoring import score
from fedaigc.model.base import load_model
from fedaigc.model.sampling import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bias", type=float, default=2.0, help="timestep bias to compare with uniform (default: 2.0)")
    ap.add_argument("--partition-seed", type=int, default=0, help="which 8-client partition (default: 0)")
    ap.add_argument("--samples", type=int, default=64, help="generated images per client (default: 64)")
    args = ap.parse_args()
    cfg = preset("demo")
    data = ImageFolder(ensure_dataset(None, cfg), size=cfg.data.size)
    train, test = split(data.samples, cfg.data.held_out, cfg.data.seed)
    evaluator = evaluator_for(data, train, cfg.evaluator)
    shares = partition(train, 8, cfg.federation.per_client, cfg.federation.purity, seed=args.partition_seed)
    classes = [data.classes[i % len(data.classes)] for i in range(args.samples)]
    seeds = list(range(10_000, 10_000 + args.samples))
    means = {}
    print(f"{'domain':13s} {'bias':>5s} {'style':>6s} {'class':>6s} {'FID':>6s} {'train s':>7s}")
    for bias in (1.0, args.bias):
        client_cfg = dataclasses.replace(cfg.client, timestep_bias=bias)
        styles = []
        for domain in data.domains:
            share = next(s for s in shares if s.domain == domain)
            torch.manual_seed(0)  # the same LoRA initialisation for both biases
            client = LocalClient(
                load_model(),
                data.stack(share.samples),
                [s.domain for s in share.samples],
                [s.cls for s in share.samples],
                client_cfg,
                seed=args.partition_seed,
            )
            t0 = time.perf_counter()
            adapter = slot = None
            for r in range(cfg.federation.rounds):
                upload = client.train_round(
                    adapter, slot, cfg.client.steps, torch.Generator().manual_seed(100 * args.partition_seed + r)
                )
                adapter, slot = upload.lora, upload.slot
            seconds = time.perf_counter() - t0
            images = generate(
                client.model,
                [client.prompt_for(domain, k) for k in classes],
                seeds,
                cfg.sample.steps,
                cfg.sample.guidance,
                progress=False,
            )
            real = data.stack([s for s in test if s.domain == domain])
            s = score(evaluator, images, real, domain, classes, cfg.evaluator.confidence)
            styles.append(s["style_acc"])
            print(
                f"{domain:13s} {bias:5.1f} {s['style_acc']:6.1%} {s['class_acc']:6.1%} {s['fid']:6.1f} {seconds:7.0f}", flush=True
            )
        means[bias] = sum(styles) / len(styles)
    print(f"mean style: uniform {means[1.0]:.1%}, bias {args.bias} {means[args.bias]:.1%}")
    print(f"style_ratio (bias {args.bias} / uniform): {means[args.bias] / means[1.0]:.2f}")


if __name__ == "__main__":
    main()
