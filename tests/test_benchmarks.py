"""The performance benchmarks' pieces on the tiny preset, `run_all`'s figure lines, and the shared
base model that lets one process serve many clients."""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedaigc import config
from fedaigc.client.client_app import build_client
from fedaigc.client.train import LocalClient
from fedaigc.model.base import load_model
from fedaigc.protocol.seeds import derived_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import federation_overhead  # noqa: E402
import many_clients  # noqa: E402
import profile_separation  # noqa: E402
import run_all  # noqa: E402


def test_clients_of_one_process_share_one_model_and_train_as_with_their_own(tiny_cfg, tiny_data, tiny_model_dir, one_thread):
    cfg = config.from_run_config({"config": config.to_toml(tiny_cfg)})
    cfg.federation.num_clients = n = 3  # a config of its own: no other test's clients share its model
    steps = 2
    clients = [build_client(cfg, cid, n, tiny_data, tiny_model_dir) for cid in range(n)]
    assert len({id(c.model) for c in clients}) == 1
    assert build_client(cfg, 1, n, tiny_data, tiny_model_dir) is clients[1]
    assert len({c.token.name for c in clients}) == n and len({c.token.id for c in clients}) == n
    shared = {}
    for server_round in (1, 2):  # interleaved: each client trains on what the others left in the model
        for cid, c in enumerate(clients):
            shared[server_round, cid] = c.train_round(
                None, None, steps, torch.Generator().manual_seed(derived_seed(server_round, cid))
            )
    for cid, c in enumerate(clients):
        torch.manual_seed(cfg.federation.seed)
        classes = [p.rsplit(" ", 1)[-1] for p in c.prompts]
        own = LocalClient(
            load_model(tiny_model_dir), c.images, c.domains, classes, cfg.client, seed=derived_seed(0, "token", cid)
        )
        assert own.token.name == c.token.name
        for server_round in (1, 2):
            alone = own.train_round(None, None, steps, torch.Generator().manual_seed(derived_seed(server_round, cid)))
            got = shared[server_round, cid]
            assert all(torch.equal(alone.lora[k], got.lora[k]) for k in alone.lora)
            assert torch.equal(alone.slot, got.slot) and torch.equal(alone.embedding, got.embedding)


def test_federation_overhead_pieces_measure_a_real_round(tiny_cfg, tiny_data):
    seconds, uploads = federation_overhead.local_round(tiny_cfg, 1, [0, 1])
    assert sorted(uploads) == [0, 1] and seconds > 0
    assert all(math.isfinite(u.train_loss) for u in uploads.values())
    assert federation_overhead.serialisation_seconds(uploads) > 0
    spec = build_client(tiny_cfg, 0, tiny_cfg.federation.num_clients).spec
    assert federation_overhead.server_seconds(tiny_cfg, uploads, spec) > 0


def test_proc_memory_reads_rss_and_its_peak():
    before = many_clients.proc_memory(os.getpid())
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = many_clients.proc_memory(os.getpid())
    assert 0 < before["VmRSS"] <= before["VmHWM"] and after["VmRSS"] <= after["VmHWM"]
    assert after["RssAnon"] >= before["RssAnon"] + 48 * 2**20 and after["VmRSS"] >= before["VmRSS"] + 48 * 2**20
    assert before["RssFile"] > 0  # the interpreter and torch's libraries are mapped files
    del block


@pytest.mark.parametrize("name", ["client_cost"])
def test_run_all_prints_finite_figures(name):
    lines, error = run_all.figures(name, quick=True)
    assert error is None, error
    assert len(lines) >= 5
    for line in lines:
        assert run_all.FIGURE.match(line), line
        assert line.startswith(f"{name}_")
        value = float(line.split(": ", 1)[1].split(" ", 1)[0])
        assert math.isfinite(value) and value >= 0, line
    assert run_all.figures("no_such_benchmark", quick=True) == (["no_such_benchmark: missing"], None)


def test_profile_separation_evaluates_saved_grams_without_a_model(tmp_path, capsys):
    """Planted passes: four orthogonal style directions, two clients each, two noisy passes per
    client; `--load` clusters them from the saved Gram matrix alone, centred or not."""
    rng = np.random.default_rng(0)
    styles = ["a", "a", "b", "b", "c", "c", "d", "d"]
    means = np.eye(4, 64)[[ord(s) - ord("a") for s in styles]] * 3.0
    passes = np.concatenate([means + rng.normal(0, 0.1, means.shape), means + rng.normal(0, 0.1, means.shape)])
    np.savez(tmp_path / "heldout_seed7.npz", gram=passes @ passes.T, domains=np.array(styles), n=8, seconds=5.0)
    across, sep = {}, {}
    for extra in ([], ["--centred"]):
        profile_separation.main(["--styles", "heldout", "--load", str(tmp_path), *extra])
        table = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("   7")]
        assert [row[:4] for row in table] == [["7", rule, "1.00", "4"] for rule in ("raw", "rho", "sep")]
        assert all(float(row[4]) > 0.8 for row in table[:2]) and float(table[2][4]) > 0  # sep: within the noise
        across[bool(extra)] = [float(row[5]) for row in table[:2]]
        sep[bool(extra)] = table[2]
    assert all(abs(a) < 0.1 for a in across[False])  # orthogonal styles
    assert all(a < -0.2 for a in across[True])  # four centred orthogonal directions: cosines -1/3
    assert float(sep[False][5]) < -10 and sep[True] == sep[False]  # styles 30 noise units apart; a mean cancels
    with pytest.raises(SystemExit):
        profile_separation.main(["--styles", "default", "--load", str(tmp_path)])
