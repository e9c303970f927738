"""Presets and config files.

One flat dataclass per concern; a preset fills them, a TOML file (`--config FILE`) overrides
preset values, and command-line flags override both. The fully resolved config is written to
every output directory as `config.toml`, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli_w
import tomllib

from fedaigc.errors import UserError

PRESETS = ("tiny", "demo", "paper")


@dataclass
class DataConfig:
    per_class: int = 120  # images per (domain, class)
    size: int = 32
    seed: int = 0
    held_out: float = 0.2
    styles: str = "default"  # the generated set's styles and classes: default | heldout (data/render.py STYLE_SETS)


@dataclass
class ModelConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    prompt_length: int = 12  # tokens per prompt for the embedded (MiniLM) text encoder
    text_encoder: str = "minilm"  # "minilm": frozen all-MiniLM-L6-v2; "clip": small CLIP trained with the base


@dataclass
class PretrainConfig:
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    prompt_drop: float = 0.1  # share of empty prompts, for classifier-free guidance
    checkpoint_every: int = 250
    seed: int = 0


@dataclass
class SampleConfig:
    steps: int = 25
    guidance: float = 3.0
    guidance_rescale: float = 0.0
    split: float = 0.3  # hybrid inference: share of the steps the inference edge server runs (0.1-0.4)


@dataclass
class EvaluatorConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    confidence: float = 0.9  # a sample counts as "in style" / "right class" only above this
    seed: int = 0


@dataclass
class ClientConfig:
    rank: int = 4
    alpha: float = 4.0
    lr: float = 3e-3
    steps: int = 40  # local LoRA steps per federated round
    batch_size: int = 16
    timestep_bias: float = 2.0  # training timesteps T(1 - u^bias): 1 = uniform, > 1 favours high noise (docs/method.md)
    text_encoder_lora: bool = True  # the paper's LoRA on the text encoder's attention too
    convs: bool = False  # add the UNet's resnet convs to the LoRA targets
    prompt_mode: str = "private"  # "private": style word -> private token; "plain": style word sent as is
    samples: int = 32  # generated samples per client for every metric
    embedding_key: int = 0  # secret rotation of the uploaded task embedding and slot (client/privacy.py); 0 = off
    embedding_epsilon: float = 0.0  # Gaussian mechanism on them: (epsilon, delta) per round; 0 = off
    embedding_delta: float = 1e-5
    embedding_clip: float = 0.5  # L2 clip of the round's change of the slot (of the embedding in plain mode)
    transfer_dtype: str = "float32"  # LoRA tensors on the wire: float32 | float16 | bfloat16 (math stays float32)


@dataclass
class FederationConfig:
    strategy: str = "cluster"  # cluster | fedavg | fedgeomed | flora | local | central
    num_clients: int = 8
    fraction: float = 1.0  # share of the clients sampled to train each round (drawn from seed and round)
    rounds: int = 3
    per_client: int = 64  # images per client
    purity: float = 0.9  # share of a client's images from its dominant domain
    dirichlet: float = 1.0  # alpha of the Dirichlet over classes
    intra: str = "fedit"  # intra-cluster mode: fedit (average A, B) or exact (average BA, re-factor)
    server_lr: float = 1.0  # cluster strategy: adapter = start + server_lr x (members' average - start)
    k: int = 0  # number of clusters; 0 = automatic (update: merge_similarity; embedding: silhouette)
    cluster_by: str = "update"  # what clients are clustered by: update (their first round's UNet change) | embedding
    merge_similarity: float = 0.18  # cluster_by update, k = 0: clients share a cluster at mean update cosine >= this
    profile_steps: int = 40  # cluster_by update: a first round's extra pass at the timestep bias, clustered by; 0 = none
    recluster_every: int = 1  # re-cluster every N rounds (ids stay stable)
    tau: float = 0.1  # temperature of the DED softmax
    use_ded: bool = True
    use_snt: bool = True
    max_rank: int = 0  # truncate the global stack (cluster, flora) to this rank by SVD; 0 = exact stack
    norm_factor: float = 100.0  # reject updates whose norm exceeds this x the cluster median
    attackers: tuple[int, ...] = ()  # poisoning experiments: ids of the clients that attack (client/attacks.py)
    attacks: tuple[str, ...] = ()  # one per attacker, or one for all: scale | signflip | noise | backdoor
    attack_strength: float = 0.0  # update x this (scale, backdoor), x -this (signflip), noise norm / update norm; 0: default
    defense: str = "none"  # cluster strategy: none | robust (norm bound + cosine to the cluster's median update)
    defense_norm: float = 3.0  # robust: reject ΔW updates longer than this x the cluster's median update norm
    defense_cos: float = 0.3  # robust: reject ΔW updates whose cosine to the others' median update < this x the typical one
    join_rounds: tuple[int, ...] = ()  # per client (cycled over the ids): the first round it is asked; () = round 1
    join_threshold: float = 0.3  # cluster_by embedding: a newcomer joins the nearest cluster at centred cosine >= this
    newcomer_start: str = "initial"  # a client's first round starts from: initial (the common start) | global (warm start)
    sampling: str = "uniform"  # of the online clients: uniform | network (the rarely seen first, server/participation.py)
    weighting: str = "plain"  # aggregation weights: plain (∝ examples) | network (∝ examples / participation rate)
    seed: int = 0


@dataclass
class NetworkConfig:
    """A simulated network, one value per client; each list cycles over the client ids (client i
    gets item i mod len), so a list as long as the number of domains sets one value per domain."""

    participation: tuple[float, ...] = (1.0,)  # chance that a joined client is online in a round
    bandwidth: tuple[float, ...] = (10.0,)  # Mbit/s, either direction
    latency: tuple[float, ...] = (0.05,)  # seconds per message
    step_seconds: tuple[float, ...] = (0.5,)  # seconds per local training step on the device


@dataclass
class Config:
    preset: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)


def preset(name: str) -> Config:
    """The defaults of a preset: `tiny` runs in seconds (tests), `demo` is the README's main job,
    `paper` is sized for a GPU."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    if name == "tiny":
        cfg.data = DataConfig(per_class=6, size=32)
        cfg.model = ModelConfig(block_out_channels=(8, 16, 16), prompt_length=12)
        cfg.pretrain = PretrainConfig(steps=4, batch_size=8, checkpoint_every=2, warmup=1)
        cfg.sample = SampleConfig(steps=4)
        cfg.evaluator = EvaluatorConfig(steps=30, batch_size=32)
        cfg.client = ClientConfig(steps=3, batch_size=8, samples=4)
        cfg.federation = FederationConfig(num_clients=4, rounds=2, per_client=16, profile_steps=3)
    elif name == "paper":
        cfg.data = DataConfig(per_class=400, size=64)
        cfg.model = ModelConfig(block_out_channels=(64, 128, 256), layers_per_block=2)
        cfg.pretrain = PretrainConfig(steps=100_000, batch_size=128, lr=2e-4)
        cfg.sample = SampleConfig(steps=50)
        cfg.evaluator = EvaluatorConfig(steps=4000)
    return cfg


def _merge(obj, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key {where}{key!r}; known: {', '.join(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key {where}{key} must be a table")
            _merge(current, value, f"{where}{key}.")
            continue
        expected = type(current)
        if expected is tuple:
            value = tuple(value) if isinstance(value, list) else value
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected):
            raise UserError(f"config key {where}{key} must be {expected.__name__}, got {value!r}")
        setattr(obj, key, value)


def load(preset_name: str, config_file: Path | None = None, overrides: dict | None = None) -> Config:
    """Preset, then the TOML file, then explicit overrides (nested dicts), each winning over the last."""
    cfg = preset(preset_name)
    if config_file is not None:
        try:
            values = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise UserError(f"config file not found: {config_file}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"malformed config file {config_file}: {e}") from None
        values.pop("preset", None)
        _merge(cfg, values, "")
    if overrides:
        _merge(cfg, overrides, "")
    return cfg


def save(cfg: Config, path: Path) -> None:
    Path(path).write_text(to_toml(cfg))


def from_run_config(run_config: dict) -> Config:
    """The Config of a Flower run: `preset` plus an optional TOML text `config` of overrides
    (`fedaigc federate` passes the fully resolved config this way; `flwr run` reads both from
    `[tool.flwr.app.config]`)."""
    values = tomllib.loads(str(run_config.get("config", "") or ""))
    cfg = preset(str(values.pop("preset", run_config.get("preset", "demo"))))
    _merge(cfg, values, "")
    return cfg


def from_saved(path: Path) -> Config:
    """The config a run directory was made with (its `config.toml`), refusing one written by an
    older fedaigc that lacks a key added since: filling it with today's default would pass off,
    say, a run trained before `client.timestep_bias` existed (uniform timesteps) as one with
    today's bias 2."""

    def keys(tree: dict, where: str = "") -> set[str]:
        out = set()
        for key, value in tree.items():
            out |= keys(value, f"{where}{key}.") if isinstance(value, dict) else {where + key}
        return out

    text = Path(path).read_text()
    cfg = from_run_config({"config": text})
    missing = sorted(keys(asdict(cfg)) - keys(tomllib.loads(text)))
    if missing:
        raise UserError(
            f"{Path(path).parent} holds a run of an older fedaigc (its config.toml lacks {missing[0]}, so what "
            "that run did there is unknown): remove it or choose another --out"
        )
    return cfg


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(asdict(cfg))
