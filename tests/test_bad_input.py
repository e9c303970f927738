"""Bad configs, corrupt run directories and crash windows: each refused with one line and exit code 2
before Ray starts or a file is written, or survived where a kill could have caused it (docs/config.md,
"Validation"; docs/method.md, "Run directory"). A synthetic two-round run stands in for a trained one:
every case here is decided before training, so no model is needed, and each case takes milliseconds."""

import json
import os
import shutil
from pathlib import Path

import pytest
import tomli_w
import tomllib
import torch
from safetensors.torch import load_file

from fedaigc import config
from fedaigc.cli import main
from fedaigc.errors import UserError
from fedaigc.model.pretrain import load_checkpoint, save_checkpoint
from fedaigc.protocol.lora import LoraSpec
from fedaigc.protocol.round import Upload
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import STRATEGIES, ServerStrategy, make_strategy


class SimulationStarted(Exception):
    pass


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every case must be decided before the simulation engine starts (or the evaluator trains)."""
    import flwr.simulation

    import fedaigc.demo  # noqa: F401  modules that bind evaluate_run at import: bound to the real one, not the patch
    import fedaigc.experiments.common  # noqa: F401

    def started(*args, **kwargs):
        raise SimulationStarted

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)
    monkeypatch.setattr("fedaigc.eval.evaluate.evaluate_run", started)


def refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), (needles, err)
    return err


# one validation of the whole config -----------------------------------------------------------
CONFIGS = [
    ("[federation]\nrounds = 0", "federation.rounds must be >= 1, got 0"),
    ("[federation]\nrounds = -1", "federation.rounds must be >= 1"),
    ("[federation]\nrounds = true", "federation.rounds must be int, got True"),
    ("[federation]\nnum_clients = 0", "federation.num_clients must be >= 1"),
    ("[federation]\nnum_clients = -2", "federation.num_clients must be >= 1"),
    ("[client]\nrank = 0", "client.rank must be >= 1"),
    ("[client]\nrank = -4", "client.rank must be >= 1"),
    ("[federation]\ntau = 0", "federation.tau must be > 0"),
    ("[federation]\nk = -1", "federation.k must be >= 0"),
    ("[federation]\nk = 9", "federation.k must be <= federation.num_clients (4)"),
    ("[client]\nsamples = 0", "client.samples must be >= 1"),
    ("[client]\nbatch_size = 0", "client.batch_size must be >= 1"),
    ("[federation]\nper_client = 0", "federation.per_client must be >= 1"),
    ("[data]\nsize = 0", "data.size must be >= 8"),
    ("[client]\nlr = nan", "client.lr must be a finite number"),
    ("[client]\nlr = 0", "client.lr must be > 0"),
    ("[client]\nsteps = -1", "client.steps must be >= 1"),
    ("[client]\nsteps = 2.5", "client.steps must be int, got 2.5"),
    ("[network]\nparticipation = []", "network.participation must be a non-empty list of values in (0, 1]"),
    ("[network]\nparticipation = [0.5, 1.5]", "network.participation must be a non-empty list"),
    ("[network]\nparticipation = [true]", "network.participation[0] must be float, got True"),
    ("[network]\nbandwidth = [0.0]", "network.bandwidth must be a list of values > 0"),
    ("[federation]\nfraction = 1.5", "federation.fraction must be in (0, 1]"),
    ('[federation]\nstrategy = "fedprox"', "federation.strategy must be one of cluster, fedavg"),
    ('[federation]\ncluster_by = "prompt"', "federation.cluster_by must be one of update, embedding"),
    ('[federation]\nintra = "mean"', "federation.intra must be one of fedit, exact"),
    ('[federation]\nnewcomer_start = "nearest"', "federation.newcomer_start must be one of"),
    ("[federation]\nserver_lr = 0", "federation.server_lr must be > 0"),
    ("[federation]\nmerge_similarity = 1.0", "federation.merge_similarity must be in (-1, 1)"),
    ("[federation]\nprofile_steps = -3", "federation.profile_steps must be >= 0"),
    ("[federation]\nrecluster_every = 0", "federation.recluster_every must be >= 1"),
    ('[federation]\nsampling = "fastest"', "federation.sampling must be one of uniform, network"),
    ('[federation]\ndefense = "robust"\nstrategy = "fedavg"', "federation.defense 'robust' needs the cluster strategy"),
    ('[federation]\nattackers = [0]\nattacks = ["flood"]', "federation.attacks must be a list of values one of scale"),
    ('[federation]\nattackers = [0, 1, 2]\nattacks = ["scale", "noise"]', "one attack or one per attacker (3), got 2"),
    ('[federation]\nattackers = [7]\nattacks = ["scale"]', "federation.attackers must be distinct client ids < 4"),
    ("[federation]\njoin_rounds = [0]", "federation.join_rounds must be a list of values >= 1"),
    ("[federation]\njoin_rounds = [2]", "federation.join_rounds leaves round 1 without clients"),
    ("[federation]\nuse_ded = 1", "federation.use_ded must be bool, got 1"),
    ('[client]\nprompt_mode = "secret"', "client.prompt_mode must be one of private, plain"),
    ('[client]\ntransfer_dtype = "fp8"', "client.transfer_dtype must be one of float32, float16, bfloat16"),
    ("[client]\nembedding_delta = 1.0", "client.embedding_delta must be in (0, 1)"),
    ("[sample]\nsteps = 0", "sample.steps must be >= 1"),
    ("[data]\nheld_out = 1.0", "data.held_out must be in (0, 1)"),
    ("[model]\nblock_out_channels = []", "model.block_out_channels must be a non-empty list"),
    ("[pretrain]\nema_decay = 1.0", "pretrain.ema_decay must be in [0, 1)"),
    ("[federation]\nround = 3", "unknown config key federation.'round'"),
    ("federation = 3", "config key federation must be a table"),
]


@pytest.mark.parametrize("toml, message", CONFIGS, ids=[c[0].replace("\n", " ") for c in CONFIGS])
def test_a_bad_config_is_refused_in_one_line_before_anything_starts(toml, message, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml + "\n")
    out = tmp_path / "run"
    refused(capsys, main(["federate", "--preset", "tiny", "--config", str(bad), "--out", str(out)]), message)
    assert not out.exists()  # nothing written, not even an empty --out


def test_the_strategy_registry_is_what_the_config_and_the_cli_accept(tmp_path, capsys):
    assert tuple(STRATEGIES) == config.STRATEGY_NAMES
    cfg = config.preset("tiny")
    for name, cls in STRATEGIES.items():
        cfg.federation.strategy = name
        config.validate(cfg)
        assert type(make_strategy(cfg)) is cls and issubclass(cls, ServerStrategy)
    cfg.federation.strategy = "fedprox"
    with pytest.raises(UserError, match=f"federation.strategy must be one of {', '.join(STRATEGIES)}, got 'fedprox'"):
        config.validate(cfg)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["federate", "--preset", "tiny", "--strategy", "fedprox", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and all(repr(name) in err for name in STRATEGIES) and not out.exists()


@pytest.mark.parametrize(
    "command, message",
    [
        (["federate", "--rounds", "0"], "federation.rounds must be >= 1"),
        (["federate", "--num-clients", "-2"], "federation.num_clients must be >= 1"),
        (["federate", "--steps", "-1"], "client.steps must be >= 1"),
        (["federate", "--fraction", "0"], "federation.fraction must be in (0, 1]"),
        (["federate", "--allow-config-change"], "--allow-config-change goes with --resume"),
        (["generate", "--prompt", "a star", "--split", "1.5", "--server", "http://127.0.0.1:9", "--token", "t"], "sample.split"),
        (["generate", "--prompt", "a star", "--steps", "0"], "sample.steps must be >= 1"),
    ],
)
def test_bad_flags_are_refused_the_same_way(command, message, tmp_path, capsys):
    out = tmp_path / "run"
    target = out / "x.png" if command[0] == "generate" else out
    refused(capsys, main([*command, "--preset", "tiny", "--out", str(target)]), message)
    assert not out.exists()


def test_a_federate_that_fails_leaves_no_run_directory_behind(tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, main(["federate", "--preset", "tiny", "--data", str(tmp_path / "none"), "--out", str(out)]), "data folder")
    assert not out.exists()
    with pytest.raises(SimulationStarted):  # a failure after the directory was made, before a round finished
        main(["federate", "--preset", "tiny", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["data", "--out", "{out}"],
        ["pretrain", "--out", "{out}"],
        ["evaluate", "--out", "{out}"],
        ["generate", "--prompt", "a star", "--out", "{out}/x.png"],
        ["experiment", "aggregation", "--out", "{out}"],
        ["demo", "--out", "{out}"],
    ],
    ids=lambda c: c[0],
)
def test_every_command_validates_the_whole_config(command, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nrounds = 0\n")
    out = tmp_path / "out"
    args = [a.replace("{out}", str(out)) for a in command]
    refused(capsys, main([*args, "--preset", "tiny", "--config", str(bad)]), "federation.rounds must be >= 1")
    assert not out.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"[federation]\nrounds = \xff\xfe\n"), "is not UTF-8 text"),
        (lambda p: p.write_text("[federation\n"), "malformed config file"),
        (lambda p: None, "config file not found"),
    ],
    ids=["directory", "not-utf8", "malformed", "missing"],
)
def test_an_unreadable_config_file_is_one_line(make, message, tmp_path, capsys):
    path = tmp_path / "c.toml"
    make(path)
    refused(capsys, main(["federate", "--preset", "tiny", "--config", str(path), "--out", str(tmp_path / "run")]), message)
    assert not (tmp_path / "run").exists()


def test_the_flower_apps_read_their_config_through_the_same_validation():
    # ServerApp.main and the ClientApp's train build their config with from_run_config
    with pytest.raises(UserError, match="federation.rounds must be >= 1"):
        config.from_run_config({"config": "preset = 'tiny'\n[federation]\nrounds = 0\n"})
    with pytest.raises(UserError, match="malformed TOML"):
        config.from_run_config({"config": "[federation\n"})


def test_every_key_has_a_rule_and_every_rule_a_key():
    keys = {key: value for key, value, _ in config._keys(config.preset("tiny"))}
    assert {k for k, v in keys.items() if not isinstance(v, bool)} <= set(config.RULES)
    assert set(config.RULES) <= set(keys)
    for name in config.PRESETS:
        config.validate(config.preset(name))


def test_the_config_names_the_choices_the_code_acts_on():
    from fedaigc.data.render import STYLE_SETS
    from fedaigc.model.base import DTYPES, TEXT_ENCODERS
    from fedaigc.protocol.wire import WIRE_DTYPES

    assert config.TRANSFER_DTYPES == tuple(WIRE_DTYPES) and config.TEXT_ENCODERS == TEXT_ENCODERS
    assert config.MODEL_DTYPES == ("auto", *DTYPES) and config.STYLE_SETS == tuple(STYLE_SETS)


# run directories ------------------------------------------------------------------------------
NAMES, DIM, RANK = ("unet.down.attn.to_q", "text_encoder.layer.attn.v_proj"), 8, 2


def upload(cid: int, r: int) -> Upload:
    g = torch.Generator().manual_seed(100 * r + cid)
    lora = {}
    for name in NAMES:
        lora[f"{name}.lora_A.weight"] = torch.randn(RANK, DIM, generator=g)
        lora[f"{name}.lora_B.weight"] = torch.randn(DIM, RANK, generator=g)
    slot = torch.zeros(DIM)
    slot[0], slot[1 + cid % 2] = 10.0, 1.0  # two planted styles
    return Upload(lora, slot, 10, slot, 0.1)


def synthetic_cfg() -> config.Config:
    cfg = config.preset("tiny")
    f = cfg.federation
    f.strategy, f.cluster_by, f.k, f.profile_steps, f.num_clients, f.rounds = "cluster", "embedding", 2, 0, 4, 2
    return config.validate(cfg)


def play_round(run: RunDir, aggregator: ServerStrategy, cfg: config.Config, r: int) -> None:
    report = aggregator.aggregate(r, {c: upload(c, r) for c in range(cfg.federation.num_clients)})
    entry = {"round": r, "train_loss": 0.1 * r, "clusters": {str(c): k for c, k in report.clusters.items()}}
    run.save_round(aggregator, entry, LoraSpec(RANK, 2.0 * RANK, True, False), cfg)


def scratch(cfg: config.Config) -> ServerStrategy:
    return make_strategy(cfg)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> Path:
    """A finished run of two rounds, as `fedaigc federate` leaves it before evaluation."""
    root = tmp_path_factory.mktemp("runs") / "run"
    cfg, run = synthetic_cfg(), RunDir(root)
    aggregator = scratch(cfg)
    run.start(cfg, aggregator)
    (root / "sources.json").write_text('{"data": "", "model": ""}\n')
    for r in (1, 2):
        play_round(run, aggregator, cfg, r)
    return root


@pytest.fixture
def run_copy(two_rounds, tmp_path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(two_rounds, root)
    return root


def edit_config(key: str, value):
    section, name = key.split(".")

    def edit(root: Path) -> None:
        values = tomllib.loads((root / "config.toml").read_text())
        values[section][name] = value
        (root / "config.toml").write_text(tomli_w.dumps(values))

    return edit


def truncate(path: str):
    def cut(root: Path) -> None:
        data = (root / path).read_bytes()
        (root / path).write_bytes(data[: len(data) // 2])

    return cut


def write(path: str, payload: bytes | str):
    def put(root: Path) -> None:
        (root / path).write_bytes(payload if isinstance(payload, bytes) else payload.encode())

    return put


def edit_entry(root: Path) -> None:
    path = root / "rounds" / "round_002" / "state.json"
    record = json.loads(path.read_text())
    record["entry"]["train_loss"] = 0.0
    path.write_text(json.dumps(record))


CORRUPT = [
    ("config.toml garbage", write("config.toml", "x = = 1"), "config.toml"),
    ("config.toml not utf-8", write("config.toml", b"\xff\xfe[federation]"), "config.toml is not UTF-8 text"),
    ("config.toml mistyped", edit_config("federation.rounds", "two"), "config.toml: config key federation.rounds must be int"),
    ("config.toml out of range", edit_config("client.rank", 0), "config.toml: config key client.rank must be >= 1"),
    ("metrics.json garbage", write("metrics.json", "{"), "metrics.json is corrupt"),
    ("metrics.json not utf-8", write("metrics.json", b"\xff\xfe"), "metrics.json is corrupt"),
    ("metrics.json list", write("metrics.json", "[]"), "metrics.json is not a run's metrics"),
    ("metrics.json rounds 5", write("metrics.json", '{"rounds": 5}'), "metrics.json is not a run's metrics"),
    ("state.json garbage", write("rounds/round_002/state.json", "{"), "round_002/state.json is corrupt"),
    ("state.json list", write("rounds/round_002/state.json", "[]"), "round_002/state.json is not a round state"),
    ("state.json edited", edit_entry, "do not match their content hash"),
    ("state truncated", truncate("rounds/round_002/state.safetensors"), "do not match their content hash"),
    ("state missing", lambda root: (root / "rounds/round_002/state.safetensors").unlink(), "cannot read"),
    ("sources.json garbage", write("sources.json", "{"), "sources.json is corrupt"),
    ("sources.json list", write("sources.json", "[]"), "sources.json is corrupt"),
    ("sources.json number", write("sources.json", '{"data": 5}'), "sources.json is corrupt"),
    ("strategy edited", edit_config("federation.strategy", "fedavg"), "federation.strategy = 'cluster', now 'fedavg'"),
    ("clients 4 -> 2", edit_config("federation.num_clients", 2), "federation.num_clients = 4, now 2"),
    ("rounds below done", edit_config("federation.rounds", 1), "federation.rounds must be >= 2, got 1"),
]


@pytest.mark.parametrize("corrupt, message", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_a_corrupt_or_changed_run_directory_is_refused_naming_the_file(corrupt, message, command, run_copy, capsys):
    corrupt(run_copy)
    args = ["federate", "--resume", str(run_copy)] if command == "resume" else ["evaluate", "--run", str(run_copy)]
    refused(capsys, main(args), message)


def test_resume_with_changed_flags_needs_the_explicit_flag(run_copy, tmp_path, capsys):
    refused(capsys, main(["federate", "--resume", str(run_copy), "--strategy", "fedavg"]), "federation.strategy")
    other = tmp_path / "other.toml"
    other.write_text("[client]\nlr = 0.01\n")
    refused(capsys, main(["federate", "--resume", str(run_copy), "--config", str(other)]), "client.lr = 0.003, now 0.01")
    with pytest.raises(SimulationStarted):  # more rounds: a run may go on
        main(["federate", "--resume", str(run_copy), "--rounds", "3"])
    with pytest.raises(SimulationStarted):
        main(["federate", "--resume", str(run_copy), "--strategy", "fedavg", "--allow-config-change"])
    assert config.from_saved(run_copy / "config.toml").federation.strategy == "fedavg"  # the rounds from now on


def test_a_leftover_temporary_is_ignored_and_replaced(run_copy):
    for leftover in ("rounds/round_003.tmp", "adapters/round_003.tmp"):
        (run_copy / leftover).mkdir()
        (run_copy / leftover / "state.json").write_text("{")  # a write a kill interrupted
    run, cfg = RunDir(run_copy), synthetic_cfg()
    assert run.last_round() == 2 and [e["round"] for e in run.metrics()["rounds"]] == [1, 2]
    cfg.federation.rounds = 3
    run.check(cfg)
    aggregator = scratch(cfg)
    assert run.start(cfg, aggregator) == 2
    play_round(run, aggregator, cfg, 3)
    assert run.last_round() == 3 and not list(run_copy.glob("*/round_003.tmp"))


def test_metrics_are_rebuilt_from_the_saved_rounds(run_copy):
    run = RunDir(run_copy)
    kept = run.metrics()
    kept["rounds"][0]["ari"] = 0.5  # what evaluation adds to a round's entry stays
    kept["rounds"] = kept["rounds"][:1]  # a kill between round 2's state and its metrics
    (run_copy / "metrics.json").write_text(json.dumps(kept))
    rounds = run.metrics()["rounds"]
    assert [e["round"] for e in rounds] == [1, 2] and rounds[0]["ari"] == 0.5 and rounds[1]["train_loss"] == pytest.approx(0.2)
    (run_copy / "metrics.json").unlink()
    assert [e["train_loss"] for e in run.metrics()["rounds"]] == pytest.approx([0.1, 0.2])


def contents(folder: Path) -> dict[str, object]:
    """The files of a folder, the tensors of the safetensors ones (their headers' key order varies)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            out[p.name] = {k: v.tolist() for k, v in load_file(str(p)).items()} if p.suffix == ".safetensors" else p.read_bytes()
    return out


def test_a_kill_at_any_point_of_save_round_leaves_the_last_good_round_loadable(two_rounds, tmp_path, monkeypatch):
    """A kill before each of save_round's writes (renames, copies, file writes, removals), simulated
    by raising there; then the run resumes, redoes the round and ends as an uninterrupted one."""
    cfg = synthetic_cfg()
    cfg.federation.rounds = 3
    calls = {"n": 0, "at": 0}

    def killing(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)

        return call

    for target, name in [(os, "replace"), (shutil, "copyfile"), (shutil, "rmtree"), (Path, "write_text"), (Path, "write_bytes")]:
        monkeypatch.setattr(target, name, killing(getattr(target, name)))
    expected, outcomes = None, set()
    for at in range(1, 200):
        root = tmp_path / f"run_{at}"
        calls["at"] = 0
        shutil.copytree(two_rounds, root)
        run, aggregator = RunDir(root), scratch(cfg)
        run.start(cfg, aggregator)
        calls["n"], calls["at"] = 0, at
        try:
            play_round(run, aggregator, cfg, 3)
            killed = False
        except KeyboardInterrupt:
            killed = True
        calls["at"] = 0
        again = RunDir(root)
        done = again.last_round()
        assert done in (2, 3)
        outcomes.add(done)
        again.check(cfg)  # the state, its hash and the metrics all load
        assert [e["round"] for e in again.metrics()["rounds"]] == list(range(1, done + 1))
        resumed = scratch(cfg)
        if again.start(cfg, resumed) == 2:
            play_round(again, resumed, cfg, 3)
        files = contents(root / "adapters")
        assert files == contents(root / "adapters" / "round_003")
        expected = expected or files
        assert files == expected and not list(root.rglob("*.tmp"))
        if not killed:
            break
    assert at > 10 and outcomes == {2, 3}  # kills before and after the round's state is in place


def test_the_pretraining_checkpoint_round_trips_without_pickle(tmp_path, tiny_cfg):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, betas=(0.8, 0.9))
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "generator": torch.Generator().manual_seed(3).get_state(), "step": 7}
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(state, path, tiny_cfg)
    back = load_checkpoint(path, tiny_cfg)
    assert back["step"] == 7 and torch.equal(back["generator"], state["generator"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas stay a tuple, ids ints
    moments = state["optimizer"]["state"]
    assert all(torch.equal(back["optimizer"]["state"][i][k], v) for i, s in moments.items() for k, v in s.items())
    again = torch.optim.AdamW(layer.parameters(), lr=0.1)
    again.load_state_dict(back["optimizer"])
    other = config.apply(tiny_cfg, {"pretrain": {"lr": 0.5}})
    with pytest.raises(UserError, match="trained with another pretrain.lr"):
        load_checkpoint(path, other)
    load_checkpoint(path, config.apply(tiny_cfg, {"pretrain": {"steps": 99}}))  # more steps: it goes on
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt pretraining checkpoint"):
        load_checkpoint(path, tiny_cfg)
