"""`fedaigc serve` under load: images/s and latency at 1, 16 and 64 concurrent users, and the
server's memory (RSS) before and after, and after 32 concurrent 1-MB bodies.

Each user has its own token and sends one-image requests (T = 25 steps, s = 0.3: 8 server steps)
back to back; a 429 counts as a refused request (its Retry-After is honoured by the device
client, not here). The server is a real `fedaigc serve` subprocess on the embedded model.

    python benchmarks/service_load.py [--model DIR] [--requests-per-user 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from hybrid_inference import start_service  # benchmarks/ is on the path as a script
from safetensors.torch import save as save_tensors

from fedaigc.inference.auth import write_new_tokens
from fedaigc.model.base import load_model

USERS = (1, 16, 64)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def load_level(url: str, tokens: list[str], body: bytes, users: int, per_user: int) -> dict:
    def user(u: int) -> list[tuple[int, float]]:
        out = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[u]}"}, timeout=600) as c:
            for i in range(per_user):
                t0 = time.perf_counter()
                r = c.post("/v1/denoise", params={"seed": u * 1000 + i, "steps": 25, "split": 0.3}, content=body)
                out.append((r.status_code, time.perf_counter() - t0))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        results = [x for xs in pool.map(user, range(users)) for x in xs]
    seconds = time.perf_counter() - t0
    ok = sorted(t for code, t in results if code == 200)
    return {
        "users": users,
        "requests": len(results),
        "ok": len(ok),
        "refused_429": sum(code == 429 for code, _ in results),
        "other": sum(code not in (200, 429) for code, _ in results),
        "images_per_s": len(ok) / seconds,
        "p50_s": ok[len(ok) // 2] if ok else None,
        "p95_s": ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None,
    }


def big_bodies(url: str, token: str, n: int = 32, size: int = 1 << 20) -> list[int]:
    """`n` concurrent bodies of `size` bytes that are not safetensors (each read whole, then refused)."""

    def one(_):
        auth = {"Authorization": f"Bearer {token}"}
        return httpx.post(f"{url}/v1/denoise", headers=auth, content=os.urandom(size), timeout=120)

    with ThreadPoolExecutor(n) as pool:
        return sorted({r.status_code for r in pool.map(one, range(n))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model directory (default: the embedded model)")
    ap.add_argument("--requests-per-user", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_service_load.json"))
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    body = save_tensors({"cond": model.encode_prompts(["a picture of a star"]), "uncond": model.encode_prompts([""])})
    with tempfile.TemporaryDirectory() as tmp:
        tokens = list(write_new_tokens(Path(tmp) / "tokens.txt", max(USERS)).values())
        proc, url = start_service(Path(tmp) / "tokens.txt", args.model, flags=["--rate", "1000"])
        try:
            result = {"rss_mb_start": rss_mb(proc.pid)}
            load_level(url, tokens, body, 1, 2)  # warm-up
            result["rss_mb_warm"] = rss_mb(proc.pid)
            result["levels"] = [load_level(url, tokens, body, u, args.requests_per_user) for u in USERS]
            result["rss_mb_after_load"] = rss_mb(proc.pid)
            result["big_bodies_status"] = big_bodies(url, tokens[0])
            result["rss_mb_after_big_bodies"] = rss_mb(proc.pid)
            time.sleep(5)
            result["rss_mb_after_idle_5s"] = rss_mb(proc.pid)
            healthy = httpx.post(f"{url}/v1/denoise", headers={"Authorization": f"Bearer {tokens[0]}"}, content=body).status_code
            result["valid_request_after"] = healthy
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| users | requests | ok | 429 | images/s | p50 s | p95 s |\n|---|---|---|---|---|---|---|")
    for r in result["levels"]:
        print(
            f"| {r['users']} | {r['requests']} | {r['ok']} | {r['refused_429']} | {r['images_per_s']:.1f} | "
            f"{r['p50_s']:.2f} | {r['p95_s']:.2f} |"
        )
    print({k: v for k, v in result.items() if k != "levels"})


if __name__ == "__main__":
    main()
