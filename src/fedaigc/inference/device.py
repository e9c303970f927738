"""The device's side of hybrid inference: encode the prompt locally (private token included), let
the inference edge server run the first steps, finish with the personalized LoRA.

Only text-encoder states, a seed and (with mix=auto, for per-request cluster weights) the task
embedding the training server already knows leave the device; the prompt text and the token's
name never do. The other modes (`MIX_MODES`) send no embedding: the server learns nothing of the
request's cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as save_tensors

from fedaigc.client.adapter import attach_lora, load_adapter_file
from fedaigc.client.tokens import PrivateToken
from fedaigc.errors import RunFailed, UserError
from fedaigc.inference.sampler import SplitState, finish, first_steps
from fedaigc.model.base import DiffusionModel, load_model
from fedaigc.protocol.adapter_files import adapter_spec

STYLE_PLACEHOLDER = "<style>"


@dataclass
class PersonalModel:
    model: DiffusionModel
    token: PrivateToken | None = None

    def prompt(self, text: str) -> str:
        """Write the private token where the prompt says `<style>`."""
        if STYLE_PLACEHOLDER in text:
            if self.token is None:
                raise UserError(f"the prompt uses {STYLE_PLACEHOLDER} but no --style-token file was given")
            text = text.replace(STYLE_PLACEHOLDER, self.token.name)
        return text

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) text-encoder states, one row of cond per prompt."""
        return self.model.encode_prompts([self.prompt(p) for p in prompts]), self.model.encode_prompts([""])

    def task_embedding(self) -> torch.Tensor | None:
        """What the training server clustered this device by: its token slot (private mode)."""
        return self.token.get_slot().float() if self.token is not None else None


def personal_model(
    model_dir: Path | None, adapter: Path | None = None, style_token: Path | None = None, dtype: str = "auto", resolution: int = 0
) -> PersonalModel:
    """The base model (`load_model`'s dtype and resolution) with this device's adapter and private token loaded."""
    model = load_model(model_dir, dtype=dtype, resolution=resolution)
    if adapter is not None:
        attach_lora(model, adapter_spec(adapter))
        load_adapter_file(model, adapter)
    token = PrivateToken.load(model, style_token) if style_token is not None else None
    return PersonalModel(model, token)


class InferenceServer:
    """HTTP client of `fedaigc serve`; fits its requests to the limits the service advertises
    (GET /v1/limits), waits out a 429's Retry-After, and counts the bytes it moves. Prompt states
    travel as `prompt_dtype` (float16 halves the bytes; the server computes in its own dtype)."""

    RETRIES = 5  # answers 429 in a row before giving up
    HEADER_BYTES = 4096  # safetensors header and tensors besides the prompt states, generously

    def __init__(self, url: str, token: str, timeout: float = 120.0, prompt_dtype: torch.dtype = torch.float32):
        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        self.prompt_dtype = prompt_dtype
        self.bytes_sent = self.bytes_received = 0
        self._limits: dict | None = None

    @property
    def limits(self) -> dict:
        if self._limits is None:
            try:
                limits = self._call("GET", "/v1/limits").json()
                int(limits["max_body_bytes"]), int(limits["max_images"])
            except (ValueError, KeyError, TypeError):
                raise RunFailed(f"{self.http.base_url} advertises no limits (GET /v1/limits): not fedaigc serve?") from None
            self._limits = limits
        return self._limits

    def images_per_request(self, cond: torch.Tensor, uncond: torch.Tensor) -> int:
        """The most rows of `cond` one request may carry: the service's image limit, and its body limit."""
        per_image = cond[0].numel() * self.prompt_dtype.itemsize * (2 if len(uncond) > 1 else 1)
        fixed = self.HEADER_BYTES + (uncond[0].numel() * self.prompt_dtype.itemsize if len(uncond) == 1 else 0)
        fit = (self.limits["max_body_bytes"] - fixed) // per_image
        if fit < 1:
            raise RunFailed(
                f"inference server {self.http.base_url} takes bodies of {self.limits['max_body_bytes']} bytes: "
                f"not even one image's prompt states ({per_image} bytes)"
            )
        return min(int(self.limits["max_images"]), int(fit))

    def first_steps(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        seed: int,
        num_steps: int,
        split: float,
        guidance: float,
        guidance_rescale: float = 0.0,
        task_embedding: torch.Tensor | None = None,
        weights: list[float] | None = None,
        mix: str = "auto",
    ) -> SplitState:
        """The server's half for every row of `cond` (image i from seed + i), in requests that fit
        the service's limits; `mix` chooses the server's adapters (`MIX_MODES`)."""
        n = self.images_per_request(cond, uncond)
        if len(cond) > n:
            parts = [
                self.first_steps(
                    cond[i : i + n],
                    uncond if len(uncond) == 1 else uncond[i : i + n],
                    seed + i,
                    num_steps,
                    split,
                    guidance,
                    guidance_rescale,
                    task_embedding,
                    weights,
                    mix,
                )
                for i in range(0, len(cond), n)
            ]
            return SplitState(torch.cat([p.latents for p in parts]), parts[0].step, num_steps)
        tensors = {
            "cond": cond.to("cpu", self.prompt_dtype).contiguous(),
            "uncond": uncond.to("cpu", self.prompt_dtype).contiguous(),
        }
        if task_embedding is not None:
            tensors["task_embedding"] = task_embedding.float().contiguous()
        if weights is not None:
            tensors["weights"] = torch.tensor(weights, dtype=torch.float32)
        body = save_tensors(tensors)
        params = {"seed": seed, "steps": num_steps, "split": split, "guidance": guidance}
        params |= {"guidance_rescale": guidance_rescale, "mix": mix}
        reply = self._call("POST", "/v1/denoise", params=params, content=body)
        self.bytes_sent += len(body)
        self.bytes_received += len(reply.content)
        try:
            return SplitState.from_bytes(reply.content)
        except ValueError as e:
            raise RunFailed(f"inference server sent a bad reply: {e}") from None

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.RETRIES):
            try:
                reply = self.http.request(method, path, **kwargs)
            except httpx.HTTPError as e:
                raise RunFailed(f"inference server {self.http.base_url} unreachable: {e}") from None
            if reply.status_code != 429 or attempt == self.RETRIES - 1:
                break
            wait = reply.headers.get("retry-after", "1")
            time.sleep(min(60, int(wait)) if wait.isdigit() else 1)
        if reply.status_code != 200:
            try:
                detail = reply.json().get("detail", reply.text)
            except (ValueError, AttributeError):
                detail = reply.text
            raise RunFailed(f"inference server answered {reply.status_code}: {detail}")
        return reply


@dataclass
class HybridResult:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    server_steps: int
    device_seconds: float  # encoding + the device's steps + decoding (waiting for the server excluded)


def generate(
    device: PersonalModel,
    prompts: list[str],
    seed: int,
    num_steps: int,
    guidance: float,
    server: InferenceServer | None = None,
    split: float = 0.3,
    weights: list[float] | None = None,
    guidance_rescale: float = 0.0,
    mix: str = "auto",
) -> HybridResult:
    """One image per prompt (image i from seed + i): the first ⌈s·T⌉ steps on `server` with the
    adapters `mix` chooses (`MIX_MODES`; only auto sends this device's task embedding, or its
    explicit `weights`), the rest here; without a server every step runs here."""
    if mix != "auto" and weights is not None:
        raise UserError(f"explicit cluster weights are a mix=auto request; mix={mix} chooses its own")
    emb = device.task_embedding() if mix == "auto" else None
    if server is not None and mix == "auto" and emb is None and weights is None:
        raise UserError(
            "mix=auto sends your task embedding, which needs a private style token; without one, choose global, base or uniform"
        )
    t0 = time.perf_counter()
    cond, uncond = device.encode(prompts)
    seeds = list(range(seed, seed + len(prompts)))
    if server is None:
        state = first_steps(device.model, cond, uncond, seeds, num_steps, 0.0, guidance, guidance_rescale)
        waited = 0.0
    else:
        t_wait = time.perf_counter()
        state = server.first_steps(cond, uncond, seed, num_steps, split, guidance, guidance_rescale, emb, weights, mix)
        waited = time.perf_counter() - t_wait
    images = finish(device.model, state, cond, uncond, guidance, guidance_rescale)
    return HybridResult(images, state.step, time.perf_counter() - t0 - waited)
