"""One edge client: its images, its private token, local LoRA fine-tuning, and what it uploads.

`LocalClient.follow(plan, seed)` is the whole client side of a federated round: start from what
the server's `RoundPlan` sent (a LoRA and a token slot; zero LoRA and a neutral slot at first; under
FLoRA a fresh LoRA on base weights with the global stack merged in), train a bounded number of
steps on the local images, and return the `Upload` (both in fedaigc/protocol/round.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from fedaigc.client.adapter import attach_lora, get_adapter, lora_parameters, set_adapter, set_base_delta
from fedaigc.client.privacy import EmbeddingGuard
from fedaigc.client.tokens import PrivateToken, private_token_name, rewrite
from fedaigc.config import ClientConfig
from fedaigc.data.render import STYLE_WORDS
from fedaigc.model.base import DiffusionModel
from fedaigc.model.pretrain import denoising_loss, draw_noise
from fedaigc.protocol.lora import Adapter, LoraSpec
from fedaigc.protocol.round import RoundPlan, Upload


def style_prompt(style_word: str, cls: str) -> str:
    return f"a {style_word} of a {cls}"


def free_token_name(model: DiffusionModel, rng: np.random.Generator) -> str:
    """A private token name from `rng` that the model's tokenizer does not hold yet: clients
    sharing a model each add their own (on a model of its own, simply the first draw)."""
    taken = model.tokenizer.get_added_vocab()
    name = private_token_name(rng)
    while name in taken:
        name = private_token_name(rng)
    return name


class LocalClient:
    def __init__(
        self,
        model: DiffusionModel,
        images: torch.Tensor,
        domains: list[str],
        classes: list[str],
        cfg: ClientConfig,
        seed: int,
    ):
        """`model` is the base model this client trains: its own, or one that clients of the same
        process share (the first one attaches the LoRA; each adds its own token, and `load` puts
        its LoRA and slot in before each use). `images` in [0, 1] with their (domain, class)
        labels. Prompts name the class and the style word of the image's domain."""
        self.model, self.cfg = model, cfg
        self.spec = LoraSpec.of(cfg)
        if "initial_lora" not in vars(model):  # the first client on this model
            attach_lora(model, self.spec)
            model.initial_lora = get_adapter(model)
        elif model.lora_spec != self.spec:
            raise ValueError(f"the shared model carries a LoRA {model.lora_spec}, this client needs {self.spec}")
        rng = np.random.default_rng(seed)
        self.token = PrivateToken(model, free_token_name(model, rng)) if cfg.prompt_mode == "private" else None
        self.images, self.domains = images, list(domains)
        self.prompts = [self.prompt_for(d, c) for d, c in zip(domains, classes, strict=True)]
        self.unique_prompts = sorted(set(self.prompts))
        self.prompt_index = torch.tensor([self.unique_prompts.index(p) for p in self.prompts])
        self.initial = (model.initial_lora, self.token.get_slot() if self.token is not None else None)
        self.guard = EmbeddingGuard.from_config(cfg, model.text_encoder.config.hidden_size)
        self.start = self.initial[1]  # the slot this round started from: the noise protects its change
        self._latents: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()

    def prompt_for(self, domain: str, cls: str) -> str:
        """The prompt this client writes for an image, after the private rewrite if on."""
        prompt = style_prompt(STYLE_WORDS.get(domain, domain), cls)
        if self.token is not None:
            prompt = rewrite(prompt, STYLE_WORDS.get(domain, domain), self.token.name)
        return prompt

    def load(self, adapter: Adapter | None, slot: torch.Tensor | None, base_delta: Adapter | None = None) -> None:
        """Start from what the server sent; None means the initial LoRA / neutral slot / the plain
        base weights (`base_delta`: FLoRA's merged stack, see `set_base_delta`). A slot from the
        server is in the guard's coordinates (client/privacy.py) and is rotated back first."""
        set_base_delta(self.model, base_delta, source="server base delta")
        set_adapter(self.model, adapter if adapter is not None else self.initial[0], source="server adapter")
        if self.token is not None:
            self.start = self.guard.receive(slot) if slot is not None and slot.numel() else self.initial[1]
            self.token.set_slot(self.start)

    def fine_tune(self, steps: int, generator: torch.Generator, timestep_bias: float | None = None) -> float:
        """`steps` AdamW steps on LoRA (and the token slot); returns the mean loss of the last quarter.
        `timestep_bias`: the server's choice for this round (uniform in a profiling round), else the config's."""
        model, cfg = self.model, self.cfg
        bias = cfg.timestep_bias if timestep_bias is None else timestep_bias
        lora = lora_parameters(model)
        with self.token.learnable() if self.token is not None else nullcontext() as slot:
            lora_and_slot = lora + ([slot] if slot is not None else [])
            for p in lora:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(lora_and_slot, lr=cfg.lr, weight_decay=0.0)
            latents, flipped = self.latents()
            losses = []
            for _ in range(steps):
                idx = torch.randint(0, len(latents), (min(cfg.batch_size, len(latents)),), generator=generator)
                flip = (torch.rand(len(idx), generator=generator) < 0.5).to(latents.device)
                x = torch.where(flip[:, None, None, None], flipped[idx], latents[idx])
                noise, t = draw_noise(model, x, generator, bias)
                optimizer.zero_grad(set_to_none=True)
                loss = 0.0
                for part in torch.arange(len(idx)).split(cfg.micro_batch or len(idx)):  # gradient accumulation
                    context = model.encode_prompts(self.unique_prompts)[self.prompt_index[idx[part]]]
                    part_loss = denoising_loss(model, x[part], noise[part], t[part], context) * (len(part) / len(idx))
                    part_loss.backward()
                    loss += part_loss.item()
                optimizer.step()
                losses.append(loss)
        for p in lora:
            p.requires_grad_(False)
            p.grad = None
        tail = losses[-max(1, len(losses) // 4) :]
        return float(np.mean(tail)) if tail else float("nan")

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's images and their mirror images as latents, encoded once (a batch at a time:
        a VAE over all the images at once set the peak memory) and kept: the flip is applied to
        the pixels, never to a VAE latent, which has no mirror symmetry."""
        if self._latents is None:
            chunks = self.images.split(self.cfg.micro_batch or self.cfg.batch_size)
            self._latents = tuple(torch.cat([self.model.to_latent(c.flip(-1) if f else c) for c in chunks]) for f in (0, 1))
        return self._latents

    @torch.no_grad()
    def task_embedding(self) -> torch.Tensor:
        """The encoded task: what this client's data taught it about style, never the style word.

        Private mode: the learned embedding of the private token (its slot). Plain mode: the pooled
        text-encoder output of the client's style phrases ("a sketch"), weighted by how often each
        occurs. Class words are left out on purpose: with them the embedding follows the client's
        class mix more than its style (measured: clustering ARI 0.59 vs 1.0, docs/method.md)."""
        if self.token is not None:
            return self.token.get_slot().float()
        words = [STYLE_WORDS.get(d, d) for d in self.domains]
        phrases = sorted(set(words))
        pooled = self.model.pooled_prompts([f"a {w}" for w in phrases]).cpu()
        weights = torch.tensor([words.count(w) for w in phrases], dtype=pooled.dtype)
        return (pooled * weights[:, None]).sum(0) / weights.sum()

    def make_upload(self, train_loss: float, generator: torch.Generator) -> Upload:
        """What leaves the device, through the guard (client/privacy.py). Private mode: the slot
        is the task embedding, so one guarded vector is both (its noise drawn once)."""
        if self.token is not None:
            slot = embedding = self.guard.send(self.token.get_slot(), self.start, generator)
        else:
            slot, embedding = torch.zeros(0), self.guard.send(self.task_embedding(), None, generator)
        return Upload(get_adapter(self.model), slot, len(self.images), embedding.float(), train_loss)

    def train_round(
        self,
        adapter: Adapter | None,
        slot: torch.Tensor | None,
        steps: int,
        generator: torch.Generator,
        base_delta: Adapter | None = None,
        timestep_bias: float | None = None,
        profile_steps: int = 0,
        profile_bias: float | None = None,
    ) -> Upload:
        """With `profile_steps`, a profiling pass comes first, twice: that many steps at `profile_bias`
        from the same start, drawing on in `generator`; the UNet LoRAs become the upload's `profile` and
        `profile_repeat` (what the server clusters the client by, and how far two passes over the same
        images differ) and are then thrown away; the round's own training starts from the start again."""
        profiles = []
        for _ in range(2 if profile_steps else 0):
            self.load(adapter, slot, base_delta)
            self.fine_tune(profile_steps, generator, profile_bias)
            profiles.append({k: v for k, v in get_adapter(self.model).items() if k.startswith("unet.")})
        self.load(adapter, slot, base_delta)
        upload = self.make_upload(self.fine_tune(steps, generator, timestep_bias), generator)
        upload.profile, upload.profile_repeat = profiles or (None, None)
        return upload

    def follow(self, plan: RoundPlan, seed: int) -> Upload:
        """The round `plan` asks for, every draw from a generator seeded with `seed` (the ClientApp's:
        `plan.client_seed(client id)`)."""
        generator = torch.Generator().manual_seed(seed)
        return self.train_round(
            plan.adapter, plan.slot, plan.steps, generator, plan.merged, plan.timestep_bias, plan.profile_steps, plan.profile_bias
        )
