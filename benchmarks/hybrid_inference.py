"""Hybrid inference, measured against the all-local run on the same work.

1. Split: for s in {0, 0.1, 0.2, 0.3, 0.4}, every client of a finished run generates its
   `client.samples` images with its own adapter and private token, the first ⌈s·T⌉ steps on a real
   `fedaigc serve`. Reports the device's compute time as a ratio of s = 0 (all local), bytes
   sent/received per image, and style accuracy / evaluator-FID of the result.
2. Throughput: 1, 4 and 16 concurrent clients, each sending one-image requests at s = 0.3 with its
   own task embedding (so each request has its own cluster mixture); images/s as a ratio of 1 client.
3. Hybrid styles: the server runs every step (s = 1) for neutral prompts ("a picture of a <class>")
   with explicit weights over two clusters, 1/0, 0/1 and 0.5/0.5; the evaluator's style shares of
   each set, and the 1/0 images against the same prompts run locally with that cluster's adapter.

    fedaigc federate --preset demo --strategy cluster --out runs/demo/cluster   # or: fedaigc demo
    python benchmarks/hybrid_inference.py --run runs/demo/cluster [--out runs/bench_hybrid]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from fedaigc import config
from fedaigc.data.dataset import ImageFolder, ensure_dataset, split
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.report import save_grid
from fedaigc.eval.scoring import score
from fedaigc.inference.auth import write_new_tokens
from fedaigc.inference.device import InferenceServer, PersonalModel, generate, personal_model

SPLITS = (0.0, 0.1, 0.2, 0.3, 0.4)


def start_service(tokens: Path, model: Path | None = None, adapters: Path | None = None, flags=()):
    """`fedaigc serve` on a free port with the tokens file `tokens` (written by the caller), a run's
    `adapters` folder (None: the base model) and any further `flags`; returns (process, URL) once
    /healthz answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fedaigc", "-q", "serve", "--tokens", str(tokens), "--port", str(port), *flags]
    cmd += (["--model", str(model)] if model else []) + (["--adapters", str(adapters)] if adapters else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("fedaigc serve did not start")


@dataclass
class Bench:
    """What every part needs: the run's config, data, evaluator, devices and a running service."""

    run: Path
    cfg: config.Config
    model_dir: Path | None
    folder: ImageFolder
    test: list
    evaluator: object
    domains: dict[str, str]
    devices: dict[int, PersonalModel]
    url: str
    tokens: list[str]

    @property
    def classes(self) -> list[str]:
        return [self.folder.classes[i % len(self.folder.classes)] for i in range(self.cfg.client.samples)]


def measure_split(b: Bench, out: Path) -> list[dict]:
    """Every client's samples at each s: device time, bytes, style accuracy, evaluator-FID."""
    rows, grids = [], []
    steps, guidance = b.cfg.sample.steps, b.cfg.sample.guidance
    for s in SPLITS:
        server = InferenceServer(b.url, b.tokens[0]) if s > 0 else None
        device_s, style, fid, shown = 0.0, [], [], []
        for cid, device in b.devices.items():
            made = generate(device, [f"a <style> of a {k}" for k in b.classes], 10_000, steps, guidance, server, s)
            device_s += made.device_seconds
            domain = b.domains[str(cid)]
            real = b.folder.stack([x for x in b.test if x.domain == domain])
            m = score(b.evaluator, made.images, real, domain, b.classes, b.cfg.evaluator.confidence)
            style.append(m["style_acc"])
            fid.append(m["fid"])
            shown.append(made.images[:6])
        grids.append(torch.cat(shown[:4]))
        images = len(b.classes) * len(b.devices)
        rows.append(
            {
                "split": s,
                "server_steps": made.server_steps,
                "device_seconds": device_s,
                "bytes_sent_per_image": server.bytes_sent / images if server else 0,
                "bytes_received_per_image": server.bytes_received / images if server else 0,
                "style_acc": sum(style) / len(style),
                "fid": sum(fid) / len(fid),
            }
        )
        print(rows[-1], flush=True)
    for r in rows:
        r["device_time_ratio"] = r["device_seconds"] / rows[0]["device_seconds"]
    save_grid(grids, out / "split_grid.png", labels=[f"s={s}" for s in SPLITS])
    print("\n| s | server steps | device time (ratio to all-local) | sent/image | received/image | style acc | evaluator-FID |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['split']} | {r['server_steps']} | {r['device_seconds']:.1f} s ({r['device_time_ratio']:.2f}x) | "
            f"{r['bytes_sent_per_image'] / 1024:.1f} KiB | {r['bytes_received_per_image'] / 1024:.1f} KiB | "
            f"{r['style_acc']:.1%} | {r['fid']:.1f} |"
        )
    return rows


def measure_throughput(b: Bench, requests: int) -> list[dict]:
    """One-image requests at s = 0.3, each with its device's task embedding, from 1, 4, 16 clients."""
    cids = sorted(b.devices)
    bodies = []
    for i in range(requests):
        device = b.devices[cids[i % len(cids)]]
        cond, uncond = device.encode([f"a <style> of a {b.classes[i % len(b.classes)]}"])
        bodies.append((cond, uncond, device.task_embedding()))
    rows = []
    for clients in (1, 4, 16):
        servers = [InferenceServer(b.url, b.tokens[i % len(b.tokens)]) for i in range(clients)]

        def worker(w: int, servers=servers, clients=clients) -> None:
            for i in range(w, len(bodies), clients):
                cond, uncond, emb = bodies[i]
                servers[w].first_steps(cond, uncond, i, b.cfg.sample.steps, 0.3, b.cfg.sample.guidance, task_embedding=emb)

        auth = {"Authorization": f"Bearer {b.tokens[0]}"}
        before = httpx.get(f"{b.url}/metrics", headers=auth).json()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, range(clients)))
        seconds = time.perf_counter() - t0
        batches = httpx.get(f"{b.url}/metrics", headers=auth).json()["batches"] - before["batches"]
        rows.append({"clients": clients, "images_per_s": len(bodies) / seconds, "mean_batch": len(bodies) / max(batches, 1)})
        print(rows[-1], flush=True)
    for r in rows:
        r["ratio_to_1"] = r["images_per_s"] / rows[0]["images_per_s"]
    print("\n| concurrent clients | images/s | ratio to 1 client | mean images per UNet batch |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['images_per_s']:.2f} | {r['ratio_to_1']:.2f}x | {r['mean_batch']:.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo/cluster"), help="a finished run (adapters/, devices/)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_hybrid"))
    ap.add_argument("--parts", default="split,throughput,mixtures", help="which parts to run (default: all three)")
    ap.add_argument("--requests", type=int, default=48, help="images per throughput setting (default: 48)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    cfg = config.load("demo", args.run / "config.toml")
    sources = json.loads((args.run / "sources.json").read_text()) if (args.run / "sources.json").is_file() else {}
    model_dir = Path(sources["model"]) if sources.get("model") else None
    folder = ImageFolder(ensure_dataset(Path(sources["data"]) if sources.get("data") else None, cfg), size=cfg.data.size)
    train, test = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    evaluator = evaluator_for(folder, train, cfg.evaluator)
    domains = json.loads((args.run / "metrics.json").read_text())["clustering"]["true_domains"]
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = args.out / "tokens.txt"
    tokens.unlink(missing_ok=True)  # the file keeps only hashes: fresh tokens for every run of the benchmark
    token_list = list(write_new_tokens(tokens, 16).values())
    proc, url = start_service(tokens, model_dir, args.run / "adapters", ["--max-split", "1"])
    devices = {
        int(c): personal_model(
            model_dir,
            args.run / "adapters" / f"client_{c}.safetensors",
            args.run / "devices" / f"client_{c}" / "style_token.safetensors",
        )
        for c in domains
    }
    b = Bench(args.run, cfg, model_dir, folder, test, evaluator, domains, devices, url, token_list)
    result_file = args.out / "hybrid.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result.update({"run": str(args.run), "samples_per_client": cfg.client.samples, "steps": cfg.sample.steps})
    result["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    try:
        if "split" in parts:
            result["split"] = measure_split(b, args.out)
        if "throughput" in parts:
            result["throughput"] = measure_throughput(b, args.requests)
        if "mixtures" in parts:
            result["mixtures"] = style_mixtures(b)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result_file}" + (f", {args.out / 'split_grid.png'}" if "split" in parts else ""))


def style_mixtures(b: Bench) -> dict:
    """Two clusters (sketch and cartoon when the run has them), weights 1/0, 0/1, 0.5/0.5, all
    steps on the server (s = 1) for neutral prompts."""
    from fedaigc.client.adapter import attach_lora, load_adapter_file
    from fedaigc.model.base import load_model
    from fedaigc.protocol.adapter_files import adapter_spec

    run, model_dir, cfg, evaluator, domains = b.run, b.model_dir, b.cfg, b.evaluator, b.domains
    classes = b.folder.classes
    info = json.loads((run / "adapters" / "clusters.json").read_text())["clusters"]
    ks = sorted(info, key=int)
    domain_of = {k: domains[str(info[k]["members"][0])] for k in ks}
    by_domain = {d: k for k, d in domain_of.items()}
    ka, kb = by_domain.get("sketch", ks[0]), by_domain.get("cartoon", ks[-1])
    prompts = [f"a picture of a {classes[i % len(classes)]}" for i in range(48)]
    base = PersonalModel(load_model(model_dir))
    server = InferenceServer(b.url, b.tokens[0])
    shares, images = {}, {}
    for name, wa in (
        (f"{domain_of[ka]} 1 / {domain_of[kb]} 0", 1.0),
        (f"{domain_of[ka]} 0 / {domain_of[kb]} 1", 0.0),
        ("0.5 / 0.5", 0.5),
    ):
        w = [0.0] * len(ks)
        w[ks.index(ka)], w[ks.index(kb)] = wa, 1 - wa
        images[name] = generate(base, prompts, 20_000, cfg.sample.steps, cfg.sample.guidance, server, 1.0, w).images
        probs = evaluator.predict(images[name])["domain"]
        confident = probs.max(-1).values >= cfg.evaluator.confidence
        shares[name] = {
            d: (float(((probs.argmax(-1) == i) & confident).float().mean()), float((probs.argmax(-1) == i).float().mean()))
            for i, d in enumerate(evaluator.domains)
        }
    local = load_model(model_dir)
    adapter = run / "adapters" / f"cluster_{ka}.safetensors"
    attach_lora(local, adapter_spec(adapter))
    load_adapter_file(local, adapter)
    local.text_encoder.disable_adapters()  # the server's steps use the base text states sent to it
    mine = generate(PersonalModel(local), prompts, 20_000, cfg.sample.steps, cfg.sample.guidance).images
    one_hot = images[f"{domain_of[ka]} 1 / {domain_of[kb]} 0"]
    out = {"domains": list(evaluator.domains), "shares": shares, "max_diff_one_hot": float((mine - one_hot).abs().max())}
    print("\n| weights | " + " | ".join(out["domains"]) + " |  (style shares: confident / top guess)")
    print("|---|" + "---|" * len(out["domains"]))
    for name, row in shares.items():
        print(f"| {name} | " + " | ".join(f"{c:.0%} / {t:.0%}" for c, t in row.values()) + " |")
    print(f"\none-cluster request vs that cluster's adapter run locally: max pixel difference {out['max_diff_one_hot']:.2e}")
    return out


if __name__ == "__main__":
    main()
