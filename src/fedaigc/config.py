"""Presets and config files.

One flat dataclass per concern; a preset fills them, a TOML file (`--config FILE`) overrides
preset values, and command-line flags override both. The fully resolved config is written to
every output directory as `config.toml`, so a run can be repeated exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from fedaigc.errors import UserError
from fedaigc.model.recipe import recipe as model_recipe

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
    dtype: str = "auto"  # frozen UNet, VAE, text encoder: auto (float32 on CPU, bfloat16 on a GPU) | float32 | bfloat16 | float16
    resolution: int = 0  # training and sampling size in pixels; 0 = the model's (UNet sample size x VAE factor)


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
    micro_batch: int = 0  # images per forward/backward pass, gradients accumulated over the batch; 0 = the whole batch
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward: less memory, more time


@dataclass
class FederationConfig:
    strategy: str = "cluster"  # cluster | fedavg | fedgeomed | flora | local | central (server/strategies.py)
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
    merge_similarity: float = 0.18  # cluster_by update, k = 0, no profiling pass: a cluster while mean update cosine >= this
    merge_agreement: float = 0.5  # the same with a profiling pass: mean noise-corrected cosine (clustering.reference_similarity)
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
    actors: int = 0  # simulation: client processes at once; 0 = one per CPU core, on a GPU one per GPU for an external model
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
        setattr(obj, key, _typed(value, typing.get_type_hints(type(obj))[key], where + key))


def load(preset_name: str, config_file: Path | None = None, overrides: dict | None = None, recipe: dict | None = None) -> Config:
    """Preset, then the model's recipe (`fedaigc.model.recipe`: what a Stable Diffusion folder
    trains and samples with), then the TOML file, then explicit overrides (nested dicts), each
    winning over the last."""
    cfg = preset(preset_name)
    if recipe:
        _merge(cfg, recipe, "")
    if config_file is not None:
        values = read_toml(config_file)
        values.pop("preset", None)
        _merge(cfg, values, "")
    if overrides:
        _merge(cfg, overrides, "")
    return validate(cfg)


def read_toml(path: Path) -> dict:
    """A TOML file's table, or a UserError naming the file: missing, a directory, not UTF-8, malformed."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"malformed config file {path}: {e}") from None


def apply(cfg: Config, values: dict) -> Config:
    """A copy of `cfg` with `values` (nested dicts, as a TOML file holds them; `preset` aside) merged in, validated."""
    out = copy.deepcopy(cfg)
    _merge(out, {k: v for k, v in values.items() if k != "preset"}, "")
    return validate(out)


def save(cfg: Config, path: Path) -> None:
    Path(path).write_text(to_toml(cfg))


def from_run_config(run_config: dict) -> Config:
    """The Config of a Flower run: `preset` plus an optional TOML text `config` of overrides
    (`fedaigc federate` passes the fully resolved config this way; `flwr run` reads both from
    `[tool.flwr.app.config]`)."""
    try:
        values = tomllib.loads(str(run_config.get("config", "") or ""))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"malformed TOML in the run config's 'config': {e}") from None
    cfg = preset(str(values.pop("preset", run_config.get("preset", "demo"))))
    if run_config.get("model"):
        _merge(cfg, model_recipe(run_config["model"]), "")
    _merge(cfg, values, "")
    return validate(cfg)


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

    values = read_toml(path)
    try:
        cfg = from_run_config({"config": tomli_w.dumps(values)})
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    missing = sorted(keys(asdict(cfg)) - keys(values))
    if missing:
        raise UserError(
            f"{Path(path).parent} holds a run of an older fedaigc (its config.toml lacks {missing[0]}, so what "
            "that run did there is unknown): remove it or choose another --out"
        )
    return cfg


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(asdict(cfg))


# Validation -----------------------------------------------------------------------------------
# One table, one rule per key (`validate` applies it): a value of the right type that no part of
# fedaigc can work with is refused here, naming the key, before any file is written or Ray starts.
# The choices are named here; the modules that act on them import them from here.

STRATEGY_NAMES = ("cluster", "fedavg", "fedgeomed", "flora", "local", "central")
INTRA_MODES = ("fedit", "exact")
CLUSTER_BY = ("update", "embedding")
NEWCOMER_STARTS = ("initial", "global")
SAMPLING = ("uniform", "network")
WEIGHTING = ("plain", "network")
DEFENSES = ("none", "robust")
ATTACKS = ("scale", "signflip", "noise", "backdoor")
PROMPT_MODES = ("private", "plain")
TRANSFER_DTYPES = ("float32", "float16", "bfloat16")  # client/adapter.WIRE_DTYPES maps them to torch dtypes
TEXT_ENCODERS = ("minilm", "clip")  # model/base.TEXT_ENCODERS
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # model/base.pick_dtype
STYLE_SETS = ("default", "heldout")  # data/render.STYLE_SETS


@dataclass(frozen=True)
class Rule:
    """What a key's value must be beyond its type: `ok(value)` tells, `says` completes "must be ..."."""

    ok: Callable[[Any], bool]
    says: str


def at_least(low: float) -> Rule:
    return Rule(lambda x: x >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda x: x > low, f"> {low}")


def within(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Rule:
    def ok(x) -> bool:
        return (x > low if open_low else x >= low) and (x < high if open_high else x <= high)

    return Rule(ok, f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(lambda x: x in choices, f"one of {', '.join(choices)}")


def each(rule: Rule, nonempty: bool = False) -> Rule:
    """A list whose every item obeys `rule` (and that has one at least, with `nonempty`)."""

    def ok(xs) -> bool:
        return (bool(xs) or not nonempty) and all(rule.ok(x) for x in xs)

    return Rule(ok, f"a {'non-empty ' * nonempty}list of values {rule.says}")


SEED = at_least(0)  # numpy's generators take no negative seed
FRACTION = within(0, 1, open_low=True)

RULES: dict[str, Rule] = {
    "preset": one_of(PRESETS),
    "data.per_class": at_least(1),
    "data.size": at_least(8),
    "data.seed": SEED,
    "data.held_out": within(0, 1, open_low=True, open_high=True),  # both sides need images
    "data.styles": one_of(STYLE_SETS),
    "model.block_out_channels": each(at_least(1), nonempty=True),
    "model.layers_per_block": at_least(1),
    "model.attention_head_dim": at_least(1),
    "model.prompt_length": at_least(1),
    "model.text_encoder": one_of(TEXT_ENCODERS),
    "model.dtype": one_of(MODEL_DTYPES),
    "model.resolution": at_least(0),  # 0 = the model's own
    "pretrain.steps": at_least(1),
    "pretrain.batch_size": at_least(1),
    "pretrain.lr": above(0),
    "pretrain.warmup": at_least(0),
    "pretrain.ema_decay": within(0, 1, open_high=True),
    "pretrain.prompt_drop": within(0, 1, open_high=True),
    "pretrain.checkpoint_every": at_least(1),
    "pretrain.seed": SEED,
    "sample.steps": at_least(1),
    "sample.guidance": at_least(0),
    "sample.guidance_rescale": within(0, 1),
    "sample.split": within(0, 1),
    "evaluator.steps": at_least(1),
    "evaluator.batch_size": at_least(1),
    "evaluator.lr": above(0),
    "evaluator.confidence": within(0, 1, open_high=True),
    "evaluator.seed": SEED,
    "client.rank": at_least(1),
    "client.alpha": above(0),
    "client.lr": above(0),
    "client.steps": at_least(1),
    "client.batch_size": at_least(1),
    "client.timestep_bias": above(0),  # 1 = uniform timesteps
    "client.prompt_mode": one_of(PROMPT_MODES),
    "client.samples": at_least(1),
    "client.embedding_key": at_least(0),  # 0 = no rotation; else the seed of the rotation
    "client.embedding_epsilon": at_least(0),  # 0 = no noise
    "client.embedding_delta": within(0, 1, open_low=True, open_high=True),
    "client.embedding_clip": above(0),
    "client.transfer_dtype": one_of(TRANSFER_DTYPES),
    "client.micro_batch": at_least(0),  # 0 = the whole batch
    "federation.strategy": one_of(STRATEGY_NAMES),
    "federation.num_clients": at_least(1),
    "federation.fraction": FRACTION,
    "federation.rounds": at_least(1),
    "federation.per_client": at_least(1),
    "federation.purity": FRACTION,
    "federation.dirichlet": above(0),
    "federation.intra": one_of(INTRA_MODES),
    "federation.server_lr": above(0),  # 1 = plain averaging
    "federation.k": at_least(0),  # 0 = automatic
    "federation.cluster_by": one_of(CLUSTER_BY),
    "federation.merge_similarity": within(-1, 1, open_low=True, open_high=True),  # a cosine
    "federation.merge_agreement": within(-1, 1, open_low=True, open_high=True),  # a noise-corrected cosine
    "federation.profile_steps": at_least(0),  # 0 = no profiling pass
    "federation.recluster_every": at_least(1),
    "federation.tau": above(0),
    "federation.max_rank": at_least(0),  # 0 = the exact stack
    "federation.norm_factor": above(0),
    "federation.attackers": each(at_least(0)),
    "federation.attacks": each(one_of(ATTACKS)),
    "federation.attack_strength": at_least(0),  # 0 = each attack's default
    "federation.defense": one_of(DEFENSES),
    "federation.defense_norm": above(0),
    "federation.defense_cos": at_least(0),
    "federation.join_rounds": each(at_least(1)),  # () = everyone from round 1
    "federation.join_threshold": within(-1, 1),  # a cosine
    "federation.newcomer_start": one_of(NEWCOMER_STARTS),
    "federation.sampling": one_of(SAMPLING),
    "federation.weighting": one_of(WEIGHTING),
    "federation.actors": at_least(0),  # 0 = automatic
    "federation.seed": SEED,
    "network.participation": each(FRACTION, nonempty=True),
    "network.bandwidth": each(above(0)),  # () = unlimited
    "network.latency": each(at_least(0)),
    "network.step_seconds": each(at_least(0)),
}


def _typed(value, hint, key: str):
    """`value` as a config key of type `hint` holds it (an int for a float, a list for a tuple),
    or a UserError naming `key`: a bool is no number, a float is finite."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise UserError(f"config key {key} must be a list of {item.__name__}, got {value!r}")
        return tuple(_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool):
        raise UserError(f"config key {key} must be {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise UserError(f"config key {key} must be a finite number, got {value!r}")
    return value


def _keys(obj, where: str = ""):
    """(dotted key, value, type hint) of every leaf of a config dataclass."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{where}{f.name}.")
        else:
            yield where + f.name, value, hints[f.name]


def validate(cfg: Config) -> Config:
    """Refuse, with one line naming the key, a config that some part of fedaigc could not run: a
    wrong type, a value outside its `RULES`, or keys that contradict each other. Every command and
    both Flower apps call it before they start anything."""
    for key, value, hint in _keys(cfg):
        value = _typed(value, hint, key)
        rule = RULES.get(key)
        if rule is not None and not rule.ok(value):
            raise UserError(f"config key {key} must be {rule.says}, got {list(value) if isinstance(value, tuple) else value!r}")
    f = cfg.federation
    if f.k > f.num_clients:
        raise UserError(f"config key federation.k must be <= federation.num_clients ({f.num_clients}), got {f.k}")
    if f.defense != "none" and f.strategy != "cluster":
        raise UserError(f"config key federation.defense {f.defense!r} needs the cluster strategy, got {f.strategy!r}")
    if any(c >= f.num_clients for c in f.attackers) or len(set(f.attackers)) < len(f.attackers):
        raise UserError(f"config key federation.attackers must be distinct client ids < {f.num_clients}, got {list(f.attackers)}")
    if f.attackers and len(f.attacks) not in (1, len(f.attackers)):
        raise UserError(
            f"config key federation.attacks needs one attack or one per attacker ({len(f.attackers)}), got {len(f.attacks)}"
        )
    if f.join_rounds and min(f.join_rounds[c % len(f.join_rounds)] for c in range(f.num_clients)) != 1:
        raise UserError(f"config key federation.join_rounds leaves round 1 without clients, got {list(f.join_rounds)}")
    return cfg
