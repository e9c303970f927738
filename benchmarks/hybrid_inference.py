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
from pathlib import Path

import httpx
import torch

from fedaigc import config
from fedaigc.data.dataset import ImageFolder, ensure_dataset, split
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.report import save_grid
from fedaigc.eval.scoring import score
from fedaigc.inference.device import InferenceServer, generate, personal_model

SPLITS = (0.0, 0.1, 0.2, 0.3, 0.4)


def start_service(run: Path, tokens: Path, model: Path | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if not tokens.exists():
        subprocess.run([sys.executable, "-m", "fedaigc", "serve", "--tokens", str(tokens), "--new-tokens", "16"], check=True)
    cmd = [sys.executable, "-m", "fedaigc", "-q", "serve", "--adapters", str(run / "adapters"), "--tokens", str(tokens)]
    cmd += ["--port", str(port), "--max-split", "1"] + (["--model", str(model)] if model else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("fedaigc serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo/cluster"), help="a finished run (adapters/, devices/)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_hybrid"))
    ap.add_argument("--requests", type=int, default=48, help="images per throughput setting (default: 48)")
    args = ap.parse_args()
    cfg = config.load("demo", args.run / "config.toml")
    sources = json.loads((args.run / "sources.json").read_text()) if (args.run / "sources.json").is_file() else {}
    model_dir = Path(sources["model"]) if sources.get("model") else None
    folder = ImageFolder(ensure_dataset(Path(sources["data"]) if sources.get("data") else None, cfg), size=cfg.data.size)
    train, test = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    evaluator = evaluator_for(folder, train, cfg.evaluator)
    domains = json.loads((args.run / "metrics.json").read_text())["clustering"]["true_domains"]
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = args.out / "tokens.txt"
    proc, url = start_service(args.run, tokens, model_dir)
    token_list = [line.split()[1] for line in tokens.read_text().splitlines()]
    n, steps, guidance = cfg.client.samples, cfg.sample.steps, cfg.sample.guidance
    classes = [folder.classes[i % len(folder.classes)] for i in range(n)]
    try:
        devices = {
            int(c): personal_model(
                model_dir,
                args.run / "adapters" / f"client_{c}.safetensors",
                args.run / "devices" / f"client_{c}" / "style_token.safetensors",
            )
            for c in domains
        }
        # 1. split ratio: quality, device compute, bytes
        rows, grids = [], []
        for s in SPLITS:
            server = InferenceServer(url, token_list[0]) if s > 0 else None
            device_s, style, fid, images_all = 0.0, [], [], []
            for cid, device in devices.items():
                prompts = [f"a <style> of a {k}" for k in classes]
                result = generate(device, prompts, 10_000, steps, guidance, server, s)
                device_s += result.device_seconds
                real = folder.stack([x for x in test if x.domain == domains[str(cid)]])
                m = score(evaluator, result.images, real, domains[str(cid)], classes, cfg.evaluator.confidence)
                style.append(m["style_acc"])
                fid.append(m["fid"])
                images_all.append(result.images[:6])
            grids.append(torch.cat(images_all[:4]))
            images = n * len(devices)
            rows.append(
                {
                    "split": s,
                    "server_steps": result.server_steps,
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
        save_grid(grids, args.out / "split_grid.png", labels=[f"s={s}" for s in SPLITS])

        # 2. throughput with 1, 4 and 16 concurrent clients (one image per request, s = 0.3)
        cids = sorted(devices)
        requests = []
        for i in range(args.requests):
            device = devices[cids[i % len(cids)]]
            cond, uncond = device.encode([f"a <style> of a {classes[i % len(classes)]}"])
            requests.append((cond, uncond, device.task_embedding()))
        throughput = []
        for clients in (1, 4, 16):
            servers = [InferenceServer(url, token_list[i % len(token_list)]) for i in range(clients)]

            def worker(w: int, servers=servers, clients=clients) -> None:
                for i in range(w, len(requests), clients):
                    cond, uncond, emb = requests[i]
                    servers[w].first_steps(cond, uncond, i, steps, 0.3, guidance, task_embedding=emb)

            before = httpx.get(f"{url}/metrics").json()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(worker, range(clients)))
            seconds = time.perf_counter() - t0
            after = httpx.get(f"{url}/metrics").json()
            batches = after["batches"] - before["batches"]
            throughput.append(
                {"clients": clients, "images_per_s": len(requests) / seconds, "mean_batch": len(requests) / max(batches, 1)}
            )
            print(throughput[-1], flush=True)
        for t in throughput:
            t["ratio_to_1"] = t["images_per_s"] / throughput[0]["images_per_s"]

        # 3. hybrid styles over two clusters
        mixtures = style_mixtures(args.run, model_dir, url, token_list[0], evaluator, folder.classes, cfg, domains)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    result = {"run": str(args.run), "samples_per_client": n, "steps": steps, "split": rows, "throughput": throughput}
    result["mixtures"] = mixtures
    result["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    (args.out / "hybrid.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| s | server steps | device time (ratio to all-local) | sent/image | received/image | style acc | evaluator-FID |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['split']} | {r['server_steps']} | {r['device_seconds']:.1f} s ({r['device_time_ratio']:.2f}x) | "
            f"{r['bytes_sent_per_image'] / 1024:.1f} KiB | {r['bytes_received_per_image'] / 1024:.1f} KiB | "
            f"{r['style_acc']:.1%} | {r['fid']:.1f} |"
        )
    print("\n| concurrent clients | images/s | ratio to 1 client | mean images per UNet batch |")
    print("|---|---|---|---|")
    for t in throughput:
        print(f"| {t['clients']} | {t['images_per_s']:.2f} | {t['ratio_to_1']:.2f}x | {t['mean_batch']:.1f} |")
    print("\n| weights | " + " | ".join(mixtures["domains"]) + " (evaluator's confident style shares) |")
    print("|---|" + "---|" * len(mixtures["domains"]))
    for name, shares in mixtures["shares"].items():
        print(f"| {name} | " + " | ".join(f"{v:.0%}" for v in shares.values()) + " |")
    print(f"\none-cluster request vs that cluster's adapter run locally: max pixel difference {mixtures['max_diff_one_hot']:.2e}")
    print(f"\n{args.out / 'hybrid.json'}, {args.out / 'split_grid.png'}")


def style_mixtures(run: Path, model_dir, url, token, evaluator, classes, cfg, domains) -> dict:
    """Two clusters (sketch and cartoon when the run has them), weights 1/0, 0/1, 0.5/0.5."""
    from fedaigc.client.adapter import adapter_spec, attach_lora, load_adapter_file
    from fedaigc.inference.device import PersonalModel
    from fedaigc.model.base import load_model

    info = json.loads((run / "adapters" / "clusters.json").read_text())["clusters"]
    ks = sorted(info, key=int)
    domain_of = {k: domains[str(info[k]["members"][0])] for k in ks}
    by_domain = {d: k for k, d in domain_of.items()}
    a, b = by_domain.get("sketch", ks[0]), by_domain.get("cartoon", ks[-1])
    prompts = [f"a picture of a {classes[i % len(classes)]}" for i in range(48)]
    base = PersonalModel(load_model(model_dir))
    server = InferenceServer(url, token)
    shares, images = {}, {}
    for name, wa in (
        (f"{domain_of[a]} 1 / {domain_of[b]} 0", 1.0),
        (f"{domain_of[a]} 0 / {domain_of[b]} 1", 0.0),
        ("0.5 / 0.5", 0.5),
    ):
        w = [0.0] * len(ks)
        w[ks.index(a)], w[ks.index(b)] = wa, 1 - wa
        images[name] = generate(base, prompts, 20_000, cfg.sample.steps, cfg.sample.guidance, server, 1.0, w).images
        pred = evaluator.predict(images[name])["domain"].softmax(-1)
        confident = pred.max(-1).values >= cfg.evaluator.confidence
        shares[name] = {d: float(((pred.argmax(-1) == i) & confident).float().mean()) for i, d in enumerate(evaluator.domains)}
    local = load_model(model_dir)
    adapter = run / "adapters" / f"cluster_{a}.safetensors"
    attach_lora(local, adapter_spec(adapter))
    load_adapter_file(local, adapter)
    local.text_encoder.disable_adapters()  # the server's steps use the base text states sent to it
    mine = generate(PersonalModel(local), prompts, 20_000, cfg.sample.steps, cfg.sample.guidance).images
    one_hot = images[f"{domain_of[a]} 1 / {domain_of[b]} 0"]
    return {"domains": list(evaluator.domains), "shares": shares, "max_diff_one_hot": float((mine - one_hot).abs().max())}


if __name__ == "__main__":
    main()
