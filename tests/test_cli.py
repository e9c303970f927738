import json
import subprocess
import sys

import pytest

from fedaigc.cli import build_parser, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "fedaigc", *args], capture_output=True, text=True, timeout=300)


def test_every_subcommand_has_help_that_explains_its_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"data", "pretrain", "generate", "serve", "evaluate", "demo"} <= set(sub.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"
    r = run("demo", "--help")
    assert r.returncode == 0 and "--preset" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "--preset", "huge", "--out", "X"], "unknown preset 'huge'"),
        (["evaluate", "--preset", "tiny", "--data", "/nonexistent/dir", "--out", "X"], "data folder not found"),
        (["generate", "--model", "/nonexistent/m", "--prompt", "a", "--out", "x.png"], "not a model directory"),
        (["generate", "--device", "tpu", "--prompt", "a", "--out", "x.png"], "unknown device 'tpu'"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedaigc", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_malformed_config_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nsteps = 'many'\n")
    assert main(["data", "--preset", "tiny", "--config", str(bad), "--out", str(tmp_path / "d")]) == 2
    assert "pretrain.steps must be int" in capsys.readouterr().err
    bad.write_text("[pretrain\n")
    assert main(["data", "--preset", "tiny", "--config", str(bad), "--out", str(tmp_path / "d")]) == 2
    assert "malformed config file" in capsys.readouterr().err


def test_wrong_layout_unknown_domain_and_corrupt_image(tmp_path, tiny_data, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    assert main(["evaluate", "--preset", "tiny", "--data", str(flat), "--out", str(tmp_path / "e")]) == 2
    assert "wrong layout" in capsys.readouterr().err

    def evaluate_samples(domain, payload):
        folder = tmp_path / domain
        (folder / domain / "star").mkdir(parents=True)
        (folder / domain / "star" / "a.png").write_bytes(payload)
        return main(
            ["evaluate", "--preset", "tiny", "--data", str(tiny_data), "--samples", str(folder), "--out", str(tmp_path / "e")]
        )

    good_png = (tiny_data / "photo" / "star" / "00000.png").read_bytes()
    assert evaluate_samples("watercolor", good_png) == 2
    assert "unknown domain 'watercolor'" in capsys.readouterr().err
    assert evaluate_samples("photo", b"\x89PNG broken") == 2
    assert "corrupt image" in capsys.readouterr().err


def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    data, model = tmp_path / "data", tmp_path / "model"
    assert main(["data", "--preset", "tiny", "--out", str(data)]) == 0
    assert f"to {data}" in capsys.readouterr().out
    assert (data / "manifest.json").is_file() and (tmp_path / "data_preview.png").is_file()
    assert main(["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(model)]) == 0
    assert (model / "samples.png").is_file() and (model / "config.toml").is_file()
    png = tmp_path / "star.png"
    assert (
        main(
            [
                "generate",
                "--preset",
                "tiny",
                "--model",
                str(model),
                "--prompt",
                "a picture of a star",
                "--n",
                "2",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert png.is_file()
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--preset", "tiny", "--data", str(data), "--model", str(model), "--per-class", "2", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert str(out / "evaluation.json") in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert 0 <= result["base_model"]["class_acc"] <= 1 and result["base_model"]["samples"] == 12
    assert (out / "base_grid.png").is_file() and (out / "real_grid.png").is_file()


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[client]\ntransfer_dtype = "fp8"\n', "client.transfer_dtype must be one of float32, float16, bfloat16, got 'fp8'"),
        ("[federation]\nfraction = 0.0\n", "federation.fraction must be in (0, 1], got 0.0"),
        ("[client]\ntimestep_bias = 0.0\n", "client.timestep_bias must be > 0, got 0.0"),
        ('[federation]\nstrategy = "fedprox"\n', "federation.strategy must be one of cluster, fedavg"),
    ],
)
def test_a_bad_federation_config_fails_before_the_simulation_starts(toml, message, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    out = tmp_path / "run"
    assert main(["federate", "--preset", "tiny", "--config", str(bad), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "config.toml").exists()  # refused before anything was written or Ray started
