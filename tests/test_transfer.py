"""`client.transfer_dtype`: the LoRA tensors travel in float16/bfloat16 (half the bytes), and
everything the server keeps and computes with stays float32."""

import json

import pytest
import torch
from flwr.app import ArrayRecord
from test_server import FakeGrid

from fedaigc import config
from fedaigc.errors import UserError
from fedaigc.protocol.wire import WIRE_DTYPES, bytes_of, from_wire, to_wire, wire_dtype
from fedaigc.server.rundir import RunDir
from fedaigc.server.server_app import ClusterStrategy
from fedaigc.server.strategies import make_strategy


def federate(tmp_path, tiny_cfg, tiny_data, tiny_model_dir, dtype: str):
    """Two rounds of two clients through the fake grid: metrics, the aggregator and the grid."""
    cfg = config.from_run_config({"config": config.to_toml(tiny_cfg)})
    cfg.federation.num_clients, cfg.federation.rounds, cfg.federation.k = 2, 2, 1
    cfg.client.steps, cfg.client.transfer_dtype = 2, dtype
    run_config = {"config": config.to_toml(cfg), "data": str(tiny_data), "model": str(tiny_model_dir)}
    aggregator, run, grid = (
        make_strategy(cfg),
        RunDir(tmp_path / dtype),
        FakeGrid(2, run_config),
    )
    ClusterStrategy(cfg, aggregator).run(grid, run, 1, 2)
    return json.loads(run.metrics_file.read_text())["rounds"], aggregator, grid


def test_float16_halves_the_bytes_and_the_server_stays_float32(tmp_path, tiny_cfg, tiny_data, tiny_model_dir):
    full, full_agg, _ = federate(tmp_path, tiny_cfg, tiny_data, tiny_model_dir, "float32")
    half, half_agg, grid = federate(tmp_path, tiny_cfg, tiny_data, tiny_model_dir, "float16")
    for f, h in zip(full, half, strict=True):
        assert h["bytes_up"] > 0 and 2 * h["bytes_up"] == f["bytes_up"]
        assert 2 * h["bytes_down"] == f["bytes_down"]
    assert half[1]["bytes_down"] > 0  # round 2 sends the cluster's adapter
    sent = [msg.content["lora"].to_torch_state_dict() for r, _, msg in grid.sent if r == 2]
    assert sent and all(t.dtype == torch.float16 for lora in sent for t in lora.values())
    tensors, _ = half_agg.state()
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    # the same federation up to rounding: the cluster adapters differ by far less than their size
    a, b = full_agg.clusters[0].adapter, half_agg.clusters[0].adapter
    diff = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(a[k].norm() ** 2 for k in a) ** 0.5
    assert diff < 0.05


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_a_round_trip_through_flower_arrays_loses_only_rounding(name):
    tensors = {"lora_A": torch.randn(4, 32), "slot": torch.randn(384)}
    wire = to_wire(tensors, wire_dtype(name))
    back = from_wire(ArrayRecord(wire).to_torch_state_dict())  # numpy has no bfloat16: it must survive Flower
    assert 2 * bytes_of(wire) == bytes_of(tensors)
    eps = torch.finfo(wire_dtype(name)).eps
    for k, t in tensors.items():
        assert back[k].dtype == torch.float32
        assert 0 < (back[k] - t).norm() / t.norm() <= eps
    same = from_wire(to_wire(tensors, torch.float32))
    assert all(torch.equal(same[k], t) for k, t in tensors.items())  # float32 travels unchanged


def test_an_unknown_transfer_dtype_is_refused():
    with pytest.raises(UserError, match="client.transfer_dtype must be one of float32, float16, bfloat16, got 'float8'"):
        config.load("tiny", overrides={"client": {"transfer_dtype": "float8"}})
    assert config.TRANSFER_DTYPES == tuple(WIRE_DTYPES)  # the names the config allows are the ones the wire knows
