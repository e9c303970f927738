"""The ServerApp's strategy against in-process ClientApps through a fake Flower grid: dropped and
failing clients, poisoned updates, per-node arrays. (The real engines are tested in test_federate.)"""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedaigc import config
from fedaigc.client.client_app import make_client_app
from fedaigc.errors import UserError
from fedaigc.protocol.wire import from_wire
from fedaigc.server.participation import sample_clients
from fedaigc.server.rundir import RunDir
from fedaigc.server.server_app import ClusterStrategy
from fedaigc.server.strategies import make_strategy


class FakeGrid:
    """Delivers messages to in-process ClientApps; can drop, fail or tamper with a client's reply."""

    def __init__(self, n, run_config, drop=(), fail=(), tamper=None):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.run_config, self.n = make_client_app(), run_config, n
        self.drop, self.fail, self.tamper = set(drop), set(fail), tamper or {}
        self.nodes = {1000 + i: i for i in range(n)}
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            cid = self.nodes[msg.metadata.dst_node_id]
            r = int(msg.content["config"]["server-round"]) if "server-round" in msg.content["config"] else 0
            self.sent.append((r, cid, msg))
            if (r, cid) in self.drop:
                continue
            if (r, cid) in self.fail:
                replies.append(Message(Error(1, f"client {cid} crashed"), reply_to=msg))
                continue
            ctx = Context(
                run_id=1,
                node_id=msg.metadata.dst_node_id,
                node_config={"partition-id": cid, "num-partitions": self.n},
                state=RecordDict(),
                run_config=self.run_config,
            )
            reply = self.app(msg, ctx)
            if (r, cid) in self.tamper:
                self.tamper[(r, cid)](reply.content)
            replies.append(reply)
        return replies


@pytest.fixture
def setup(tmp_path, tiny_cfg, tiny_data, tiny_model_dir):
    def make(client=None, **fed):
        cfg = config.from_run_config({"config": config.to_toml(tiny_cfg)})
        cfg.federation.num_clients, cfg.federation.rounds = 4, 2
        for k, v in fed.items():
            setattr(cfg.federation, k, v)
        for k, v in (client or {}).items():
            setattr(cfg.client, k, v)
        run_config = {"config": config.to_toml(cfg), "data": str(tiny_data), "model": str(tiny_model_dir)}
        aggregator = make_strategy(cfg)
        return cfg, run_config, aggregator, RunDir(tmp_path / f"run_{len(list(tmp_path.iterdir()))}")

    return make


def test_round_completes_without_the_clients_that_die_or_vanish(setup):
    cfg, run_config, aggregator, run = setup()
    grid = FakeGrid(4, run_config, drop={(2, 2)}, fail={(2, 1)})
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 2)
    rounds = json.loads(run.metrics_file.read_text())["rounds"]
    assert rounds[0]["missing"] == [] and rounds[1]["missing"] == [1, 2]
    assert set(rounds[1]["clusters"]) == {"0", "1", "2", "3"}  # the absent keep their cluster
    for entry in rounds:
        assert entry["bytes_up"] > 0 and entry["seconds"] > 0 and math.isfinite(entry["train_loss"])
    assert rounds[1]["bytes_down"] > 0  # round 2 sends every node its cluster's adapter


def test_each_node_gets_its_own_clusters_adapter(setup):
    cfg, run_config, aggregator, run = setup(k=2)
    grid = FakeGrid(4, run_config)
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 2)
    clusters = json.loads(run.metrics_file.read_text())["rounds"][0]["clusters"]
    assert len(set(clusters.values())) == 2
    sent = {cid: msg.content["lora"].to_torch_state_dict() for r, cid, msg in grid.sent if r == 2}
    for cid, got in sent.items():
        file = load_file(str(run.root / "adapters" / "round_001" / f"cluster_{clusters[str(cid)]}.safetensors"))
        assert all(torch.allclose(got[k], file[k]) for k in got)
    a, b = (next(c for c in sent if clusters[str(c)] == k) for k in set(clusters.values()))
    assert any(not torch.equal(sent[a][k], sent[b][k]) for k in sent[a])


def test_a_clients_first_round_trains_uniformly_and_a_profiling_pass_at_the_bias_is_what_it_is_clustered_by(setup):
    def round_config(strategy_setup, **fed):
        cfg, run_config, aggregator, run = strategy_setup
        replies = {}
        grid = FakeGrid(4, run_config, tamper={(1, c): (lambda content, c=c: replies.__setitem__(c, content)) for c in range(4)})
        ClusterStrategy(cfg, aggregator).run(grid, run, 1, 2)
        configs = {(r, cid): msg.content["config"] for r, cid, msg in grid.sent if r}
        asked = {key: (c["timestep-bias"], c["profile-steps"]) for key, c in configs.items()}
        return aggregator, replies, [{asked[(r, c)] for c in range(4)} for r in (1, 2)]

    by_update = setup(client={"timestep_bias": 2.0}, profile_steps=3)  # the default: clustered by first updates
    aggregator, replies, (first, second) = round_config(by_update)
    assert first == {(1.0, 3)} and second == {(2.0, 0)}
    for c, content in replies.items():
        profile = from_wire(content["profile"].to_torch_state_dict())
        assert profile.keys() == {k for k in from_wire(content["lora"].to_torch_state_dict()) if k.startswith("unet.")}
        change = aggregator.clients[c].change
        assert all(torch.equal(change[k], profile[k]) for k in change)  # from the common start: the change is the LoRA
    _, replies, (first, second) = round_config(setup(client={"timestep_bias": 2.0}, profile_steps=0))
    assert first == second == {(2.0, 0)} and all("profile" not in r for r in replies.values())  # the round is the profile
    _, _, (first, second) = round_config(setup(client={"timestep_bias": 2.0}, cluster_by="embedding"))
    assert first == {(1.0, 0)} and second == {(2.0, 0)}  # the uniform round's token slot is the profile
    fedavg = setup(strategy="fedavg")[2]
    assert fedavg.profile_steps(0) == 0 and fedavg.timestep_bias(0, 2.0) == 2.0


def test_a_missing_or_poisoned_profile_rejects_the_clients_first_round(setup):
    cfg, run_config, aggregator, run = setup(k=1)

    def drop(content):
        del content["profile"]

    def nan(content):
        arrays = content["profile"].to_torch_state_dict()
        next(iter(arrays.values()))[..., 0] = float("nan")
        content["profile"] = ArrayRecord(arrays)

    grid = FakeGrid(4, run_config, tamper={(1, 0): drop, (1, 3): nan})
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 2)
    rounds = json.loads(run.metrics_file.read_text())["rounds"]
    assert "no profile" in rounds[0]["rejected"]["0"] and "profile: NaN" in rounds[0]["rejected"]["3"]
    assert set(rounds[0]["clusters"]) == {"1", "2"} and all(aggregator.clients[c].change is not None for c in range(4))
    assert rounds[1]["rejected"] == {}  # asked again in round 2, with a profile this time
    sent = {(r, cid): msg.content["config"]["profile-steps"] for r, cid, msg in grid.sent if r}
    assert sent[(2, 0)] == sent[(2, 3)] == cfg.federation.profile_steps and sent[(2, 1)] == 0


def test_poisoned_updates_are_rejected_and_never_aggregated(setup):
    cfg, run_config, aggregator, run = setup(k=1)

    def nan(content):
        arrays = content["lora"].to_torch_state_dict()
        key = next(iter(arrays))
        arrays[key][..., 0] = float("nan")
        content["lora"] = ArrayRecord(arrays)

    def huge(content):
        content["lora"] = ArrayRecord({k: v * 1e4 for k, v in content["lora"].to_torch_state_dict().items()})

    grid = FakeGrid(4, run_config, tamper={(1, 0): nan, (1, 3): huge})
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 1)
    rejected = json.loads(run.metrics_file.read_text())["rounds"][0]["rejected"]
    assert "NaN" in rejected["0"] and "median" in rejected["3"]
    merged = aggregator.clusters[0].adapter
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert max(t.abs().max().item() for t in merged.values()) < 100


def test_flora_sends_the_growing_stack_and_a_restarted_server_resumes_it(setup):
    cfg, run_config, aggregator, run = setup(strategy="flora")
    cfg.client.steps = 1  # what the server asks for: keeps six rounds of four clients short
    grid = FakeGrid(4, run_config)
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 3)
    rounds = json.loads(run.metrics_file.read_text())["rounds"]
    assert rounds[0]["bytes_down"] == 0 < rounds[1]["bytes_down"] and rounds[2]["bytes_down"] == 2 * rounds[1]["bytes_down"]
    for r, _, msg in grid.sent:
        if r >= 1:  # a fresh LoRA every round, on the merged stack of the rounds before
            assert "lora" not in msg.content and ("merged" in msg.content) == (r > 1)
    # a server killed after round 1 resumes from disk; the clients (cached) last merged round 3's stack
    _, _, first, resumed = setup(strategy="flora")
    ClusterStrategy(cfg, first).run(FakeGrid(4, run_config), resumed, 1, 1)
    restarted = make_strategy(cfg)
    resumed.restore(restarted, 1)
    ClusterStrategy(cfg, restarted).run(FakeGrid(4, run_config), resumed, 2, 3)
    a, b = (load_file(str(r.root / "adapters" / "global.safetensors")) for r in (run, resumed))

    def close(x: torch.Tensor, y: torch.Tensor) -> bool:
        # Not bit-equal: two uninterrupted runs in one process differ by up to 1.4e-4 of a tensor's norm
        # (measured; it starts in round 1 in the text encoder's LoRA, source not pinned down). A resumed
        # fedit run in a fresh process is bit-equal (test_federate.py). A run of another seed is far off.
        return x.shape == y.shape and float((x - y).norm()) <= 1e-2 * float(y.norm())

    assert a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    assert close(aggregator.model_for(0)[1], restarted.model_for(0)[1])


def test_a_sampled_fraction_of_the_clients_trains_each_round(setup):
    cfg, run_config, aggregator, run = setup(fraction=0.5)
    grid = FakeGrid(4, run_config)
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 2)
    rounds = json.loads(run.metrics_file.read_text())["rounds"]
    for entry in rounds:
        trained = sorted(cid for r, cid, _ in grid.sent if r == entry["round"])
        assert len(trained) == 2 and entry["sampled"] == trained and entry["missing"] == []
    assert sample_clients(list(range(100)), 0.1, 0, 3) == sample_clients(list(range(100)), 0.1, 0, 3)  # resumable
    assert sample_clients(list(range(100)), 0.1, 0, 3) != sample_clients(list(range(100)), 0.1, 0, 4)
    assert len(sample_clients(list(range(100)), 0.1, 0, 1)) == 10 and sample_clients([3, 1], 1.0, 0, 1) == [1, 3]
    with pytest.raises(UserError, match="fraction"):
        ClusterStrategy(setup(fraction=0.0)[0], aggregator)
