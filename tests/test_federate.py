"""`fedaigc federate` on Flower's simulation engine (Ray): the run directory, and a server killed
mid-run that resumes to the same final adapters as an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from fedaigc.cli import main


def federate_args(out, data, model):
    """3 rounds of the tiny preset on the test data and model."""
    return ["federate", "--preset", "tiny", "--data", str(data), "--model", str(model), "--rounds", "3", "--out", str(out)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_data, tiny_model_dir):
    out = tmp_path_factory.mktemp("fed") / "run"
    code = main(federate_args(out, tiny_data, tiny_model_dir))
    assert code == 0
    return out


def test_run_directory_has_what_the_spec_names(straight_run):
    for name in (
        "config.toml",
        "metrics.json",
        "adapters/global.safetensors",
        "adapters/client_0.safetensors",
        "adapters/cluster_0.safetensors",
        "samples/client_0/0000.png",
        "samples_grid.png",
        "plots/accuracy_per_client.png",
        "plots/train_loss.png",
    ):
        assert (straight_run / name).exists(), name
    m = json.loads((straight_run / "metrics.json").read_text())
    assert m["strategy"] == "cluster" and [r["round"] for r in m["rounds"]] == [1, 2, 3]
    for r in m["rounds"]:
        assert set(r["clusters"]) == {"0", "1", "2", "3"}
        assert r["bytes_up"] > 0 and r["bytes_down"] >= 0 and r["seconds"] > 0 and 0 <= r["train_loss"] < 10
        assert -1 <= r["ari"] <= 1
    assert -1 <= m["clustering"]["ari"] <= 1
    final = m["final"]
    for cid, per in final["per_client"].items():
        assert per["domain"] in ("photo", "art_painting", "cartoon", "sketch")
        for key in ("style_acc", "class_acc", "fid", "kid", "alignment"):
            assert per[key] == per[key], (cid, key)  # finite numbers, not NaN
        assert 0 <= per["style_acc"] <= 1 and 0 <= per["class_acc"] <= 1 and -1 <= per["alignment"] <= 1
    assert set(final["mean"]) >= {"style_acc", "class_acc", "fid", "kid", "alignment"}
    report = (straight_run / "report.md").read_text()
    assert "strategy `cluster`" in report and f"{final['mean']['style_acc']:.3f}" in report
    assert f"\n| 3 | {m['rounds'][-1]['train_loss']:.3f} | " in report  # the last round's row
    assert all(f"\n| {c} | {p['domain']} | " in report for c, p in final["per_client"].items())


def test_a_finished_run_is_ready_for_the_inference_server(straight_run, tiny_model_dir):
    from fedaigc.inference.device import personal_model
    from fedaigc.inference.mixing import ClusterMixer
    from fedaigc.model.base import load_model

    info = json.loads((straight_run / "adapters" / "clusters.json").read_text())
    assignment = json.loads((straight_run / "metrics.json").read_text())["rounds"][-1]["clusters"]
    assert {int(c) for k in info["clusters"].values() for c in k["members"]} == {int(c) for c in assignment}
    mixer = ClusterMixer(load_model(tiny_model_dir), straight_run / "adapters")
    assert [f"cluster_{k}" for k in sorted(info["clusters"], key=int)] == mixer.names[:-1] and mixer.names[-1] == "global"
    device = personal_model(
        tiny_model_dir,
        straight_run / "adapters" / "client_0.safetensors",
        straight_run / "devices" / "client_0" / "style_token.safetensors",
    )
    weights = mixer.request_weights(device.task_embedding())
    own = sorted(info["clusters"], key=int).index(str(assignment["0"]))
    assert abs(float(weights.sum()) - 1) < 1e-5 and int(weights.argmax()) == own


def test_killed_server_resumes_to_the_same_adapters(straight_run, tmp_path, tiny_data, tiny_model_dir):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fedaigc",
        "-q",
        *federate_args(out, tiny_data, tiny_model_dir),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 240
    while not (out / "rounds" / "round_001" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "round 1 never finished"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((out / "metrics.json").read_text())["rounds"]
    assert 1 <= len(done) < 3
    assert main(["federate", "--resume", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    for name in ("global.safetensors", "cluster_0.safetensors", "client_3.safetensors"):
        a, b = load_file(str(straight_run / "adapters" / name)), load_file(str(out / "adapters" / name))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5, name


def test_a_finished_run_is_scored_again_with_more_samples(straight_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    assert main(["evaluate", "--run", str(run), "--per-client", "6"]) == 0
    assert "6 samples per client: style acc" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    again, final = m["samples_6"], m["final"]
    assert again["samples_per_client"] == 6 and set(again["per_client"]) == set(final["per_client"])
    assert all(0 <= per["style_acc"] <= 1 and per["fid"] == per["fid"] for per in again["per_client"].values())
    made = sorted((run / "samples" / "samples_6" / "client_0").glob("*.png"))
    assert len(made) == 6
    for i in range(final["samples_per_client"]):  # the run's own samples are the first ones: same seeds, same adapter
        assert made[i].read_bytes() == (run / "samples" / "client_0" / made[i].name).read_bytes()
    assert main(["evaluate", "--run", str(tmp_path), "--per-client", "6"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_resume_needs_a_run_and_a_finished_run_needs_resume(tmp_path, straight_run, capsys):
    assert main(["federate", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["federate", "--preset", "tiny", "--out", str(straight_run)]) == 2
    assert "--resume" in capsys.readouterr().err
