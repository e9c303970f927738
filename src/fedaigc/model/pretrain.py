"""Pretraining the embedded base model on all style domains with prompts that never name the style.

The base then knows every style the way Stable Diffusion does, and a client's LoRA (and private
token) only has to steer it to one. A frozen text encoder (MiniLM) is run once on the few
distinct prompts and its hidden states are looked up, which makes a training step a UNet step
only; a text encoder trained with the base (`model.text_encoder = "clip"`) runs on every batch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedaigc.config import Config
from fedaigc.data.dataset import ImageFolder, split
from fedaigc.errors import UserError
from fedaigc.model.base import build_model, pick_device, save_model
from fedaigc.paths import replacing

log = logging.getLogger(__name__)

PROMPT_TEMPLATES = ("a picture of a {}", "an image of a {}", "a {}")


def sample_timesteps(
    num_train_timesteps: int, batch: int, generator: torch.Generator | None = None, bias: float = 1.0
) -> torch.Tensor:
    """Training timesteps ⌊T·(1 − u^bias)⌋, u ~ U(0, 1): bias 1 is uniform (pretraining); above 1
    favours high noise, where a sample's colours and background (its style) are decided: clients
    train with `client.timestep_bias` (docs/method.md has the measurement)."""
    if bias <= 0:
        raise ValueError(f"timestep bias must be > 0, got {bias}")
    if bias == 1.0:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    u = torch.rand(batch, generator=generator)
    return (num_train_timesteps * (1 - u**bias)).long().clamp(0, num_train_timesteps - 1)


def draw_noise(model, latents: torch.Tensor, generator: torch.Generator | None = None, timestep_bias: float = 1.0):
    """The noise and timesteps (`sample_timesteps`) of one training batch, drawn in this order."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = sample_timesteps(model.noise_scheduler.config.num_train_timesteps, latents.shape[0], generator, timestep_bias)
    return noise, t.to(latents.device)


def denoising_loss(model, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """MSE between the UNet's prediction on the noised latents and what the scheduler's
    `prediction_type` asks for (v for the embedded default, the noise for Stable Diffusion 1.x).
    The UNet runs in the model's dtype; the target and the loss are float32."""
    sched = model.noise_scheduler
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    dtype = model.unet.dtype
    pred = model.unet(noisy.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample
    return F.mse_loss(pred.float(), target.float())


def diffusion_loss(
    model,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator | None = None,
    timestep_bias: float = 1.0,
) -> torch.Tensor:
    """The denoising loss of one batch at random noise and timesteps (`draw_noise`)."""
    noise, t = draw_noise(model, latents, generator, timestep_bias)
    return denoising_loss(model, latents, noise, t, context)


CHECKPOINT = "checkpoint.safetensors"
RESUMED_BY = ("data", "model", "pretrain")  # the config sections a checkpoint is resumed under unchanged,
FREE_KEYS = {"pretrain.steps", "pretrain.checkpoint_every"}  # but for these: a pretraining may go on for more steps


def _split(obj, key: str, tensors: dict[str, torch.Tensor]):
    """`obj` (nested dicts, lists, tuples of tensors and JSON scalars: a state dict) as JSON, each
    tensor replaced by {"tensor": its key in `tensors`}; dict keys keep their type (optimizer states use ints)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[k, _split(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return {type(obj).__name__: [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"{key}: a {type(obj).__name__} has no place in a checkpoint")


def _join(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of `_split`."""
    if not isinstance(tree, dict):
        return tree
    ((kind, value),) = tree.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _join(v, tensors) for k, v in value}
    items = [_join(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


def save_checkpoint(state: dict, path: Path, cfg: Config) -> None:
    """`state` (state dicts and scalars) as one safetensors file, the tensors as tensors and the rest
    as JSON in its metadata with the config it was trained under: nothing that loading it could
    execute (a pickle could), written under a temporary name and renamed."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, "state", tensors)
    used = {name: asdict(cfg)[name] for name in RESUMED_BY}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fedaigc.checkpoint": json.dumps(tree), "fedaigc.config": json.dumps(used)})


def load_checkpoint(path: Path, cfg: Config) -> dict:
    """What `save_checkpoint` wrote, refused in one line if the file is corrupt or was trained under
    another `data`, `model` or `pretrain` config (resuming it would mix two trainings; `FREE_KEYS` aside)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        tree, used = json.loads(meta["fedaigc.checkpoint"]), json.loads(meta["fedaigc.config"])
        state = _join(tree, tensors)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"corrupt pretraining checkpoint {path} ({e!r}): remove it to start over") from None
    now = json.loads(json.dumps({name: asdict(cfg)[name] for name in RESUMED_BY}))
    before = {f"{s}.{k}": v for s in used for k, v in used[s].items()}
    after = {f"{s}.{k}": v for s in now for k, v in now[s].items()}
    changed = sorted(k for k, v in after.items() if before.get(k) != v and k not in FREE_KEYS)
    if changed:
        raise UserError(f"{path} was trained with another {changed[0]}: remove it to start over, or pretrain with its config")
    return state


def pretrain(cfg: Config, data_root: Path, out: Path, progress: bool = True) -> Path:
    """Train the base UNet; checkpoints to `out/checkpoint.safetensors` (resumed if present) and writes the
    final EMA weights as a model directory in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = cfg.pretrain
    torch.manual_seed(p.seed)
    dataset = ImageFolder(data_root, size=cfg.data.size)
    train, _ = split(dataset.samples, cfg.data.held_out, cfg.data.seed)
    model = build_model(cfg.model, cfg.data.size).to(pick_device())
    images = (dataset.stack(train) * 2 - 1).to(model.device)
    classes = dataset.classes
    labels = torch.tensor([classes.index(s.cls) for s in train])
    # prompt row `label * len(PROMPT_TEMPLATES) + template`; the last row is the empty prompt
    joint = cfg.model.text_encoder == "clip"  # trained with the UNet; MiniLM stays frozen
    if joint:
        tokens = model.tokenize([t.format(c) for c in classes for t in PROMPT_TEMPLATES] + [""])
        model.text_encoder.requires_grad_(True).train()

        def contexts(rows: torch.Tensor) -> torch.Tensor:
            return model.token_hidden_states(tokens["input_ids"][rows], tokens["attention_mask"][rows])
    else:
        with torch.no_grad():
            table = torch.stack([model.encode_prompts([t.format(c) for t in PROMPT_TEMPLATES]) for c in classes])
            null = model.encode_prompts([""])[0]
        states = torch.cat([table.flatten(0, 1), null[None]])

        def contexts(rows: torch.Tensor) -> torch.Tensor:
            return states[rows]

    unet = model.unet
    unet.requires_grad_(True).train()
    params = list(unet.parameters()) + (list(model.text_encoder.parameters()) if joint else [])
    optimizer = torch.optim.AdamW(params, lr=p.lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, p.warmup, p.steps)
    ema = EMAModel(params, decay=p.ema_decay, use_ema_warmup=True, power=0.75)
    gen = torch.Generator().manual_seed(p.seed)
    step, seconds = 0, 0.0
    ckpt = out / CHECKPOINT
    if (out / "checkpoint.pt").exists():
        log.warning("%s is not loaded (a pickle may run code); resuming needs %s", out / "checkpoint.pt", CHECKPOINT)
    if ckpt.exists():
        state = load_checkpoint(ckpt, cfg)
        try:
            unet.load_state_dict(state["unet"])
            if joint:
                model.text_encoder.load_state_dict(state["text_encoder"])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            ema.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"pretraining checkpoint {ckpt} does not fit this model ({e!r}): remove it to start over") from None
        ema.to(model.device)
        gen.set_state(state["generator"])
        step, seconds = state["step"], state["seconds"]
        log.info("resuming pretraining from %s at step %d", ckpt, step)
    n_params = sum(x.numel() for x in unet.parameters())
    n_text = sum(x.numel() for x in model.text_encoder.parameters())
    log.info(
        "pretraining a %.2f M-parameter UNet (text encoder: %s, %.2f M, %s) on %d images (%d classes, %d domains) for %d steps",
        n_params / 1e6,
        cfg.model.text_encoder,
        n_text / 1e6,
        "trained" if joint else "frozen",
        len(train),
        len(classes),
        len(dataset.domains),
        p.steps,
    )
    bar = tqdm(total=p.steps, initial=step, desc="pretraining", unit="step", disable=not progress)
    t0 = time.perf_counter() - seconds
    while step < p.steps:
        idx = torch.randint(0, len(train), (p.batch_size,), generator=gen)
        x = images[idx]
        flip = (torch.rand(p.batch_size, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        template = torch.randint(0, len(PROMPT_TEMPLATES), (p.batch_size,), generator=gen)
        rows = labels[idx] * len(PROMPT_TEMPLATES) + template
        drop = torch.rand(p.batch_size, generator=gen) < p.prompt_drop
        rows = torch.where(drop, len(classes) * len(PROMPT_TEMPLATES), rows)
        loss = diffusion_loss(model, x, contexts(rows), gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % p.checkpoint_every == 0 or step == p.steps:
            save_checkpoint(
                {
                    "unet": unet.state_dict(),
                    **({"text_encoder": model.text_encoder.state_dict()} if joint else {}),
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "ema": ema.state_dict(),
                    "generator": gen.get_state(),
                    "step": step,
                    "seconds": time.perf_counter() - t0,
                },
                ckpt,
                cfg,
            )
    bar.close()
    ema.copy_to(params)
    model.freeze()
    info = {
        "pretrain": {
            "steps": p.steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "params": n_params,
            "text_encoder": {"kind": cfg.model.text_encoder, "params": n_text, "trained": joint},
            "data": str(data_root),
            "preset": cfg.preset,
            "seed": p.seed,
        }
    }
    save_model(model, out, unet_dtype=torch.float16, with_text_encoder=True, info=info)
    (out / "pretrain.json").write_text(json.dumps(info["pretrain"], indent=2) + "\n")
    return out
