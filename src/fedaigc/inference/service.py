"""The inference edge server: an HTTP service that runs the first ⌈s·T⌉ denoising steps for every
user, batching concurrent requests, and returns the intermediate latent (`fedaigc serve`).

POST /v1/denoise?seed=S&steps=T&split=s[&guidance=g][&mix=auto|global|base|uniform]
    body: safetensors bytes with `cond` (B, L, D) and `uncond` (1 or B, L, D) — the prompt's
    text-encoder states, encoded on the device (text never travels), float32, float16 or bfloat16 —
    and, with mix=auto (the default) only, `task_embedding` (D_t,) for per-request cluster weights or
    `weights` (K,) explicit ones; the other modes (`MIX_MODES`) take neither.
    reply: safetensors bytes with `latents`, `step`, `num_steps` and the adapter `weights` used.
GET /v1/limits: what a request may ask for (the device splits its requests to fit).
GET /metrics: requests, images, batch sizes, latency, responses by status.
GET /healthz: {"status": "ok"}, the only route without a token.
Every other request needs `Authorization: Bearer <token>` with a token whose hash is in the tokens
file (`auth.py`); a token may be limited to some clusters.

Limits that hold under load: a bound on the images queued (429 + Retry-After beyond it), on the
request bytes being read at once, a request rate per token (429 + Retry-After), a deadline for
reading each request's head and body (a client that drips bytes is disconnected), and the work of a
client that disconnects is dropped from its batch at the next denoising step.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import secrets
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import h11
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from safetensors import SafetensorError, deserialize
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedaigc.inference import MIX_MODES
from fedaigc.inference.auth import Client, RateLimiter, TokenStore
from fedaigc.inference.mixing import ClusterMixer
from fedaigc.inference.sampler import SplitState, split_step
from fedaigc.model.base import DiffusionModel, load_model
from fedaigc.model.sampling import denoise, initial_noise

log = logging.getLogger(__name__)

BODY_TENSORS = {"cond", "uncond", "task_embedding", "weights"}
BODY_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors' names


@dataclass
class Limits:
    """What one request may ask for, and what the service holds at once. The defaults fit 16
    Stable-Diffusion-1.5 images in one request: cond and uncond of 16 x 77 x 768 float32 (7.6 MB)."""

    max_body_bytes: int = 8 << 20
    max_images: int = 16  # per request
    max_prompt_tokens: int = 77
    max_steps: int = 100
    max_split: float = 0.5  # the server runs at most ceil(max_split * T) steps, and never all T below 1
    max_server_steps: int = 50  # nor more than this many, whatever T
    max_guidance: float = 20.0
    max_abs_value: float = 1e4  # of a body tensor's entries (text-encoder states are O(10))
    max_batch: int = 64  # images per UNet batch
    window_s: float = 0.01  # how long the batcher waits for more requests after the first
    max_queued_images: int = 256  # accepted and not yet answered; beyond: 429
    max_reading_bytes: int = 64 << 20  # request bodies being read at once; beyond: 429
    rate_per_token: float = 20.0  # requests a second per token, on average
    burst_per_token: int = 40
    read_timeout_s: float = 10.0  # to receive a request's head and body

    def server_steps(self, num_steps: int) -> int:
        """The most steps of a T-step schedule the server runs: fewer than T unless max_split is 1
        (an operator's explicit choice: the server may then finish images itself)."""
        most = min(split_step(num_steps, self.max_split), self.max_server_steps)
        return most if self.max_split >= 1 else max(0, min(most, num_steps - 1))


# the batching engine ------------------------------------------------------------------------------
@dataclass(eq=False)  # hashed by identity: the engine maps each job to its rows
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
    cancelled: bool = False  # its client went away: drop it from its batch

    @property
    def key(self) -> tuple[int, int, int, float]:  # jobs with the same key share UNet calls
        return self.num_steps, self.stop, self.cond.shape[1], self.guidance_rescale


def _non_finite() -> HTTPException:
    return HTTPException(422, "these prompt states drive the model to non-finite values")


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def give_back_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim). glibc keeps what a batch's
    activations and the request bodies freed in its per-thread arenas: without this, the
    server's RSS stays at its peak after a burst. Called when the queue runs empty."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class DenoiseEngine:
    """Collects requests for a short window, groups them by schedule and runs each group as one
    batch in a worker thread (the event loop keeps accepting requests meanwhile). A batch runs
    step by step, so the rows of requests whose client went away leave it at the next step."""

    def __init__(self, model: DiffusionModel, mixer: ClusterMixer | None, limits: Limits):
        self.model, self.mixer, self.limits = model, mixer, limits
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self.batch_sizes: Counter[int] = Counter()
        self.queued_images = 0  # accepted, not yet answered
        self.cancelled_images = 0
        self.images_per_s = 0.0  # of the last batch: what Retry-After is estimated from

    def admit(self, job: Job) -> None:
        """Queue `job`, or refuse it with 429 when the queue holds too many images."""
        n = len(job.seeds)
        if self.queued_images + n > self.limits.max_queued_images:
            wait = (self.queued_images + n) / self.images_per_s if self.images_per_s > 0 else 1.0
            retry = str(min(60, max(1, math.ceil(wait))))
            detail = f"{self.queued_images} images queued (limit {self.limits.max_queued_images})"
            raise HTTPException(429, detail, {"Retry-After": retry})
        self.queued_images += n
        self.queue.put_nowait(job)

    def release(self, job: Job) -> None:
        self.queued_images -= len(job.seeds)

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
            for batch in self._batches([j for j in jobs if not j.cancelled]):
                t0 = time.perf_counter()
                try:
                    latents = await loop.run_in_executor(self.executor, self._run, batch)
                except Exception as e:  # a failed batch fails its requests, never the service
                    log.exception("denoising batch failed")
                    for job in batch:
                        if not job.done.done():
                            job.done.set_exception(e)
                    continue
                self.images_per_s = sum(len(j.seeds) for j in batch) / max(time.perf_counter() - t0, 1e-6)
                for job, out in latents.items():
                    if not job.done.done():
                        if torch.isfinite(out).all():
                            job.done.set_result(out)
                        else:
                            job.done.set_exception(_non_finite())
            if self.queue.empty():
                await loop.run_in_executor(self.executor, give_back_memory)

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

    def _run(self, batch: list[Job]) -> dict[Job, torch.Tensor]:
        """The batch's latents after its `stop` steps, per job still wanted."""
        sizes = [len(j.seeds) for j in batch]
        self.batch_sizes[sum(sizes)] += 1
        device = self.model.device
        rows = {
            "cond": torch.cat([j.cond for j in batch]).to(device),
            "uncond": torch.cat([j.uncond for j in batch]).to(device),
            "guidance": torch.cat([torch.full((n,), j.guidance) for j, n in zip(batch, sizes, strict=True)]),
            "latents": initial_noise(self.model, [s for j in batch for s in j.seeds]),
        }
        if self.mixer is not None:
            rows["weights"] = torch.cat([j.weights.expand(n, -1) for j, n in zip(batch, sizes, strict=True)])
        num_steps, stop, _, rescale = batch[0].key
        with torch.inference_mode():
            for step in range(stop):
                if any(j.cancelled for j in batch):
                    keep = torch.cat([torch.full((n,), not j.cancelled) for j, n in zip(batch, sizes, strict=True)])
                    self.cancelled_images += int((~keep).sum())
                    rows = {k: v[keep.to(v.device)] for k, v in rows.items()}
                    sizes = [n for j, n in zip(batch, sizes, strict=True) if not j.cancelled]
                    batch = [j for j in batch if not j.cancelled]
                    if not batch:
                        return {}
                rows["latents"] = self._step(rows, num_steps, step, rescale)
        return dict(zip(batch, rows["latents"].split(sizes), strict=True))

    def _step(self, rows: dict[str, torch.Tensor], num_steps: int, step: int, rescale: float) -> torch.Tensor:
        args = (self.model, rows["latents"], rows["cond"], rows["uncond"], num_steps, step, step + 1, rows["guidance"], rescale)
        if self.mixer is None:
            return denoise(*args)
        with self.mixer.weights(rows["weights"]):
            return denoise(*args)


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
            "queued_images": engine.queued_images,
            "cancelled_images": engine.cancelled_images,
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


class CountStatus:
    """ASGI middleware counting responses by status (plain ASGI: it leaves the request's receive
    channel alone, so a handler still sees its client disconnect)."""

    def __init__(self, app, status: Counter[int]):
        self.app, self.status = app, status

    async def __call__(self, scope, receive, send):
        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.status[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send if scope["type"] == "http" else send)


# the app ------------------------------------------------------------------------------------------
def create_app(
    model: DiffusionModel,
    mixer: ClusterMixer | None,
    tokens: TokenStore | dict[str, str],
    limits: Limits | None = None,
    docs: bool = False,
) -> FastAPI:
    """The service. `tokens`: the tokens file's store, or {token: client name} for a service inside
    this process. `docs`: serve /docs, /redoc and /openapi.json (off: they map the attack surface)."""
    limits = limits or Limits()
    store = tokens if isinstance(tokens, TokenStore) else TokenStore.of(tokens)
    engine = DenoiseEngine(model, mixer, limits)
    stats = Stats()
    rates = RateLimiter(limits.rate_per_token, limits.burst_per_token)
    dim = model.unet.config.cross_attention_dim
    reading = {"bytes": 0}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = asyncio.create_task(engine.run_forever())
        yield
        task.cancel()
        engine.executor.shutdown(wait=False)

    paths = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    app = FastAPI(title="fedaigc inference edge server", lifespan=lifespan, **{k: v if docs else None for k, v in paths.items()})
    app.state.engine, app.state.stats = engine, stats
    app.add_middleware(CountStatus, status=stats.status)

    bearer = HTTPBearer(auto_error=False)  # None for a missing header or another scheme: the 401 below

    def client(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Client:
        found = store.find(credentials.credentials) if credentials else None
        if found is None:
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def rate_limited(who: Client = Depends(client)) -> Client:
        if retry := rates.retry_after(who.name):
            detail = f"more than {limits.rate_per_token:g} requests/s for this token"
            raise HTTPException(429, detail, {"Retry-After": str(retry)})
        return who

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(_who: Client = Depends(client)) -> dict:
        return stats.as_dict(engine)

    @app.get("/v1/limits")
    async def advertised(who: Client = Depends(client)) -> dict:
        names = mixer.names if mixer else []
        if who.clusters is not None:
            names = [n for n in names if n.startswith("cluster_") and int(n.removeprefix("cluster_")) in who.clusters]
        return {
            **asdict(limits),
            "prompt_dtypes": ["float32", "float16", "bfloat16"],
            "hidden_size": dim,
            "latent_shape": list(model.latent_shape),
            "adapters": names,
        }

    @app.post("/v1/denoise")
    async def denoise_endpoint(
        request: Request,
        who: Client = Depends(rate_limited),
        seed: int = Query(0, ge=0, le=2**63 - 1, description="seed of the first image; image i uses seed + i"),
        steps: int = Query(25, ge=1, le=limits.max_steps, description="T, the whole schedule's length"),
        split: float = Query(0.3, ge=0.0, le=limits.max_split, description="s: the server runs the first ceil(s*T) steps"),
        guidance: float = Query(3.0, ge=0.0, le=limits.max_guidance, description="classifier-free guidance scale"),
        guidance_rescale: float = Query(0.0, ge=0.0, le=1.0, description="CFG rescale (Lin et al. 2023); 0 = off"),
        mix: Literal[tuple(MIX_MODES)] = Query(
            "auto", description="the adapters of the server's steps: " + "; ".join(f"{k}: {v}" for k, v in MIX_MODES.items())
        ),
    ) -> Response:
        t0 = time.perf_counter()
        stop, most = split_step(steps, split), limits.server_steps(steps)
        if stop > most:
            raise HTTPException(422, f"split {split} of {steps} steps is {stop} server steps; this server runs at most {most}")
        tensors = parse_body(await read_body(request, limits, reading), limits.max_abs_value)
        cond, uncond = check_prompt_tensors(tensors, limits, dim)
        weights = choose_weights(mixer, tensors, mix, who)
        if seed + cond.shape[0] > 2**63:
            raise HTTPException(422, "seed + number of images must stay below 2**63")
        seeds = [seed + i for i in range(cond.shape[0])]
        job = Job(cond, uncond, seeds, steps, stop, guidance, guidance_rescale, weights)
        engine.admit(job)
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({job.done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done.done():  # the client went away: its rows leave the batch
                job.cancelled = True
                return Response(status_code=499)
            latents = job.done.result()
        finally:
            gone.cancel()
            engine.release(job)
        state = SplitState(latents, job.stop, steps)
        extra = {"weights": weights} if weights is not None else {}
        stats.requests += 1
        stats.images += len(seeds)
        stats.latency.append(time.perf_counter() - t0)
        log.debug("%s: %d image(s), %d of %d steps", who.name, len(seeds), job.stop, steps)
        return Response(state.to_bytes(extra), media_type="application/octet-stream")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (its body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request: Request, limits: Limits, reading: dict[str, int]) -> bytes:
    """The body, refusing more than `max_body_bytes` before reading them when the length is declared,
    and 429 while the bodies being read would pass `max_reading_bytes`."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"body larger than {limit} bytes")
    reserve = int(declared) if declared is not None else limit
    if reading["bytes"] + reserve > limits.max_reading_bytes:
        raise HTTPException(429, "too many request bodies being received; retry", {"Retry-After": "1"})
    reading["bytes"] += reserve
    try:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"body larger than {limit} bytes")
        return bytes(body)
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected while sending its body") from None
    finally:
        reading["bytes"] -= reserve


def parse_body(body: bytes, max_abs: float) -> dict[str, torch.Tensor]:
    """The body's tensors as float32, refusing other dtypes before converting anything, and any
    entry that is not finite or larger than `max_abs` in magnitude."""
    try:
        entries = deserialize(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise HTTPException(400, f"body is not safetensors bytes: {e}") from None
    tensors = {}
    for name, entry in entries:
        if name not in BODY_TENSORS:
            raise HTTPException(422, f"unknown tensor {name!r}; allowed: {', '.join(sorted(BODY_TENSORS))}")
        if entry["dtype"] not in BODY_DTYPES:
            raise HTTPException(422, f"{name}: dtype {entry['dtype']} not accepted; send one of {', '.join(BODY_DTYPES)}")
        if math.prod(entry["shape"]) == 0:
            raise HTTPException(422, f"{name}: empty tensor of shape {tuple(entry['shape'])}")
        t = torch.frombuffer(bytearray(entry["data"]), dtype=BODY_DTYPES[entry["dtype"]]).reshape(entry["shape"]).float()
        if not torch.isfinite(t).all():
            raise HTTPException(422, f"{name}: contains NaN or Inf")
        if t.abs().max() > max_abs:
            raise HTTPException(422, f"{name}: entries of magnitude over {max_abs:g}")
        tensors[name] = t
    return tensors


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


def choose_weights(mixer: ClusterMixer | None, tensors: dict[str, torch.Tensor], mix: str, who: Client) -> torch.Tensor | None:
    """The adapter weights of one request's steps, by its `mix` (`MIX_MODES`). mix=auto: explicit
    `weights` win, else the request's task embedding (required); the other modes take neither, so
    the server learns nothing of the request's cluster. A token limited to some clusters gets
    mixtures of those only (explicit weights on others: 403). None: a server without adapters,
    which runs the base model whatever the mode."""
    sent = [name for name in ("task_embedding", "weights") if name in tensors]
    if mix != "auto" and sent:
        raise HTTPException(422, f"mix={mix} takes no {sent[0]!r} (it says nothing of the request's cluster); send mix=auto")
    if mixer is None:
        if "weights" in tensors:
            raise HTTPException(422, "this server holds no cluster adapters; 'weights' cannot be used")
        return None
    allowed = None if who.clusters is None else sorted(who.clusters & set(mixer.clusters))
    if allowed == []:
        raise HTTPException(403, f"token of {who.name} may use none of this server's clusters")
    if mix == "base":
        return mixer.base_weights()
    if mix == "global":
        return mixer.global_weights(allowed)
    if mix == "uniform":
        return mixer.uniform_weights(allowed)
    if not sent:
        raise HTTPException(
            422, "mix=auto needs the request's 'task_embedding' (or 'weights'); without one, send mix=global, base or uniform"
        )
    try:
        if "weights" in tensors:
            w = tensors["weights"]
            if w.dim() != 1 or (w < 0).any() or w.sum() <= 0:
                raise ValueError("weights: expected a 1-D tensor of non-negative values with a positive sum")
            chosen = mixer.cluster_weights((w / w.sum()).tolist())
            if allowed is not None and any(w[i] > 0 for i, k in enumerate(mixer.clusters) if k not in allowed):
                raise HTTPException(403, f"token of {who.name} may use clusters {allowed} only")
            return chosen
        return mixer.request_weights(tensors["task_embedding"], allowed)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None


# running it ---------------------------------------------------------------------------------------
class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request, head and body: a client
    that drips its bytes (or opens a connection and sends nothing) is disconnected after
    `read_timeout` seconds. uvicorn's own keep-alive timer restarts at every byte received."""

    read_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_deadline()

    def connection_lost(self, exc) -> None:
        self._read_deadline.cancel()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if (old := getattr(self, "_read_deadline", None)) is not None:
            old.cancel()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_deadline_passed)

    def _read_deadline_passed(self) -> None:
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request in %.1f s", self.read_timeout)
            self.transport.close()


def uvicorn_config(app: FastAPI, host: str, port: int, limits: Limits, log_level: str = "warning") -> uvicorn.Config:
    protocol = type("TimedH11", (TimedH11Protocol,), {"read_timeout": limits.read_timeout_s})
    return uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", log_level=log_level, timeout_keep_alive=5)


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None):
    """Run `app` with uvicorn in a background thread (port 0: a free one); yields its URL. For
    the demo and tests: a real HTTP service inside the calling process."""
    server = uvicorn.Server(uvicorn_config(app, host, port, limits or Limits()))
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
