"""The inference edge server: an HTTP service that runs the first ⌈s·T⌉ denoising steps for every
user, batching concurrent requests, and returns the intermediate latent (`fedaigc serve`).

POST /v1/denoise?seed=S&steps=T&split=s[&guidance=g][&mix=auto|global]
    body: safetensors bytes with `cond` (B, L, D) and `uncond` (1 or B, L, D) — the prompt's
    text-encoder states, encoded on the device (text never travels) — and optionally
    `task_embedding` (D_t,) for per-request cluster weights or `weights` (K,) explicit ones.
    reply: safetensors bytes with `latents`, `step`, `num_steps` and the adapter `weights` used.
GET /healthz, GET /metrics (requests, images, batch sizes, latency, errors by status).
Every request needs `Authorization: Bearer <token>` with a token from the tokens file.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from fedaigc.errors import UserError
from fedaigc.inference.mixing import ClusterMixer
from fedaigc.inference.sampler import SplitState, split_step
from fedaigc.model.base import DiffusionModel, load_model
from fedaigc.model.sampling import denoise, initial_noise

log = logging.getLogger(__name__)

BODY_TENSORS = {"cond", "uncond", "task_embedding", "weights"}


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_images: int = 16  # per request
    max_prompt_tokens: int = 77
    max_steps: int = 100
    max_split: float = 0.5
    max_guidance: float = 20.0
    max_batch: int = 64  # images per UNet batch
    window_s: float = 0.01  # how long the batcher waits for more requests after the first


# tokens -------------------------------------------------------------------------------------------
def read_tokens(path: Path) -> dict[str, str]:
    """{token: client name} from a file of `<client name> <token>` lines (# comments allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokens file not found: {path} (create one with: fedaigc serve --new-tokens N --tokens {path})")
    tokens: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise UserError(f"{path}:{n}: expected '<client name> <token of at least 16 characters>'")
        tokens[parts[1]] = parts[0]
    if not tokens:
        raise UserError(f"{path}: no tokens")
    return tokens


def write_new_tokens(path: Path, n: int) -> Path:
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists; not overwriting its tokens")
    path.write_text("".join(f"client-{i} {secrets.token_hex(24)}\n" for i in range(n)))
    path.chmod(0o600)
    return path


# the batching engine ------------------------------------------------------------------------------
@dataclass
class Job:
    cond: torch.Tensor  # (B, L, D)
    uncond: torch.Tensor  # (B, L, D)
    seeds: list[int]
    num_steps: int
    stop: int
    guidance: float
    guidance_rescale: float
    weights: torch.Tensor | None  # (len(mixer.names),) or None without adapters
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def key(self) -> tuple[int, int, int, float]:  # jobs with the same key share UNet calls
        return self.num_steps, self.stop, self.cond.shape[1], self.guidance_rescale


class DenoiseEngine:
    """Collects requests for a short window, groups them by schedule and runs each group as one
    batch in a worker thread (the event loop keeps accepting requests meanwhile)."""

    def __init__(self, model: DiffusionModel, mixer: ClusterMixer | None, limits: Limits):
        self.model, self.mixer, self.limits = model, mixer, limits
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self.batch_sizes: Counter[int] = Counter()

    async def submit(self, job: Job) -> torch.Tensor:
        await self.queue.put(job)
        return await job.done

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.limits.window_s
            while (remaining := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            for batch in self._batches(jobs):
                try:
                    latents = await loop.run_in_executor(self.executor, self._run, batch)
                except Exception as e:  # a failed batch fails its requests, never the service
                    log.exception("denoising batch failed")
                    for job in batch:
                        if not job.done.done():
                            job.done.set_exception(e)
                    continue
                for job, out in zip(batch, latents, strict=True):
                    if not job.done.done():  # the client may have gone away
                        job.done.set_result(out)

    def _batches(self, jobs: list[Job]) -> list[list[Job]]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        batches = []
        for group in groups.values():
            batch, size = [], 0
            for job in group:
                if batch and size + len(job.seeds) > self.limits.max_batch:
                    batches.append(batch)
                    batch, size = [], 0
                batch.append(job)
                size += len(job.seeds)
            batches.append(batch)
        return batches

    def _run(self, batch: list[Job]) -> list[torch.Tensor]:
        sizes = [len(j.seeds) for j in batch]
        self.batch_sizes[sum(sizes)] += 1
        cond = torch.cat([j.cond for j in batch])
        uncond = torch.cat([j.uncond for j in batch])
        guidance = torch.cat([torch.full((n,), j.guidance) for j, n in zip(batch, sizes, strict=True)])
        latents = initial_noise(self.model, [s for j in batch for s in j.seeds])
        num_steps, stop, _, rescale = batch[0].key
        with torch.inference_mode():
            if self.mixer is None:
                out = denoise(self.model, latents, cond, uncond, num_steps, 0, stop, guidance, rescale)
            else:
                weights = torch.cat([j.weights.expand(n, -1) for j, n in zip(batch, sizes, strict=True)])
                with self.mixer.weights(weights):
                    out = denoise(self.model, latents, cond, uncond, num_steps, 0, stop, guidance, rescale)
        return list(out.split(sizes))


# metrics ------------------------------------------------------------------------------------------
class Stats:
    def __init__(self):
        self.started = time.time()
        self.requests, self.images = 0, 0
        self.status: Counter[int] = Counter()
        self.latency: deque[float] = deque(maxlen=1000)

    def as_dict(self, engine: DenoiseEngine) -> dict:
        lat = sorted(self.latency)
        sizes = engine.batch_sizes
        batches = sum(sizes.values())
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests,
            "images": self.images,
            "responses_by_status": {str(k): v for k, v in sorted(self.status.items())},
            "batches": batches,
            "mean_batch_images": sum(k * v for k, v in sizes.items()) / batches if batches else 0.0,
            "batch_images_histogram": {str(k): v for k, v in sorted(sizes.items())},
            "latency_s": {
                "mean": statistics.fmean(lat) if lat else 0.0,
                "p50": lat[len(lat) // 2] if lat else 0.0,
                "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0,
            },
        }


# the app ------------------------------------------------------------------------------------------
def create_app(
    model: DiffusionModel, mixer: ClusterMixer | None, tokens: dict[str, str], limits: Limits | None = None
) -> FastAPI:
    limits = limits or Limits()
    engine = DenoiseEngine(model, mixer, limits)
    stats = Stats()
    dim = model.unet.config.cross_attention_dim

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = asyncio.create_task(engine.run_forever())
        yield
        task.cancel()
        engine.executor.shutdown(wait=False)

    app = FastAPI(title="fedaigc inference edge server", lifespan=lifespan)
    app.state.engine, app.state.stats = engine, stats

    @app.middleware("http")
    async def count_responses(request: Request, call_next):
        response = await call_next(request)
        stats.status[response.status_code] += 1
        return response

    def client_name(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            for known, name in tokens.items():
                if secrets.compare_digest(known.encode(), token.encode()):
                    return name
        raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "adapters": mixer.names if mixer else [], "latent_shape": list(model.latent_shape)}

    @app.get("/metrics")
    async def metrics() -> dict:
        return stats.as_dict(engine)

    @app.post("/v1/denoise")
    async def denoise_endpoint(
        request: Request,
        client: str = Depends(client_name),
        seed: int = Query(0, ge=0, le=2**63 - 1, description="seed of the first image; image i uses seed + i"),
        steps: int = Query(25, ge=1, le=limits.max_steps, description="T, the whole schedule's length"),
        split: float = Query(0.3, ge=0.0, le=limits.max_split, description="s: the server runs the first ceil(s*T) steps"),
        guidance: float = Query(3.0, ge=0.0, le=limits.max_guidance, description="classifier-free guidance scale"),
        guidance_rescale: float = Query(0.0, ge=0.0, le=1.0, description="CFG rescale (Lin et al. 2023); 0 = off"),
        mix: Literal["auto", "global"] = Query("auto", description="auto: weights from task_embedding when sent"),
    ) -> Response:
        t0 = time.perf_counter()
        tensors = parse_body(await read_body(request, limits.max_body_bytes))
        cond, uncond = check_prompt_tensors(tensors, limits, dim)
        weights = choose_weights(mixer, tensors, mix)
        seeds = [seed + i for i in range(cond.shape[0])]
        job = Job(cond, uncond, seeds, steps, split_step(steps, split), guidance, guidance_rescale, weights)
        latents = await engine.submit(job)
        state = SplitState(latents, job.stop, steps)
        extra = {"weights": weights} if weights is not None else {}
        stats.requests += 1
        stats.images += len(seeds)
        stats.latency.append(time.perf_counter() - t0)
        log.debug("%s: %d image(s), %d of %d steps", client, len(seeds), job.stop, steps)
        return Response(state.to_bytes(extra), media_type="application/octet-stream")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes before reading them when the length is declared."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
    return bytes(body)


def parse_body(body: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = load_tensors(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise HTTPException(400, f"body is not safetensors bytes: {e}") from None
    unknown = sorted(set(tensors) - BODY_TENSORS)
    if unknown:
        raise HTTPException(422, f"unknown tensor {unknown[0]!r}; allowed: {', '.join(sorted(BODY_TENSORS))}")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise HTTPException(422, f"{name}: expected a floating-point tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise HTTPException(422, f"{name}: contains NaN or Inf")
    return {k: v.float() for k, v in tensors.items()}


def check_prompt_tensors(tensors: dict[str, torch.Tensor], limits: Limits, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if "cond" not in tensors or "uncond" not in tensors:
        raise HTTPException(422, "body needs tensors 'cond' (B, L, D) and 'uncond' (1 or B, L, D)")
    cond, uncond = tensors["cond"], tensors["uncond"]
    if cond.dim() != 3 or not 1 <= cond.shape[0] <= limits.max_images or not 1 <= cond.shape[1] <= limits.max_prompt_tokens:
        raise HTTPException(
            422, f"cond: expected (B <= {limits.max_images}, L <= {limits.max_prompt_tokens}, {dim}), got {tuple(cond.shape)}"
        )
    if cond.shape[2] != dim:
        raise HTTPException(422, f"cond: hidden size {cond.shape[2]} does not match the model's {dim}")
    if uncond.dim() != 3 or uncond.shape[0] not in (1, cond.shape[0]) or uncond.shape[1:] != cond.shape[1:]:
        raise HTTPException(422, f"uncond: expected (1 or {cond.shape[0]}, {cond.shape[1]}, {dim}), got {tuple(uncond.shape)}")
    return cond, uncond.expand_as(cond).contiguous()


def choose_weights(mixer: ClusterMixer | None, tensors: dict[str, torch.Tensor], mix: str) -> torch.Tensor | None:
    """Explicit `weights` win; else the request's task embedding (mix=auto); else the global stack."""
    if mixer is None:
        if "weights" in tensors:
            raise HTTPException(422, "this server holds no cluster adapters; 'weights' cannot be used")
        return None
    try:
        if "weights" in tensors:
            w = tensors["weights"]
            if w.dim() != 1 or (w < 0).any() or w.sum() <= 0:
                raise ValueError("weights: expected a 1-D tensor of non-negative values with a positive sum")
            return mixer.cluster_weights((w / w.sum()).tolist())
        if mix == "auto" and "task_embedding" in tensors:
            return mixer.request_weights(tensors["task_embedding"])
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return mixer.global_weights()


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` with uvicorn in a background thread (port 0: a free one); yields its URL. For
    the demo and tests: a real HTTP service inside the calling process."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, ws="none", log_level="warning"))
    thread = threading.Thread(target=server.run, name="fedaigc-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the inference service failed to start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def run_service(adapters: Path, model_dir: Path | None, client: str = "local") -> Iterator[tuple[str, str]]:
    """A real inference edge server for a run's adapters, with its own copy of the base model, on a
    free port of 127.0.0.1 inside this process and one fresh bearer token: yields (url, token).
    What the demo and the experiments measure hybrid inference through."""
    token = secrets.token_hex(24)
    model = load_model(model_dir)
    with serving(create_app(model, ClusterMixer(model, adapters), {token: client})) as url:
        yield url, token
