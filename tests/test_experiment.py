"""`fedaigc experiment`: tiny aggregation and split experiments (1 round, 2 clients, few settings,
so few Ray start-ups) with their report's structure and the ranges of their numbers; the mean ±
std over seeds (the privacy experiment, and a rerun that reuses its runs: test_privacy.py)."""

import json
import math

from experiment_checks import check_numbers, check_report, experiment, read_results

from fedaigc.config import preset
from fedaigc.experiments.common import Plan, Result, Setting, write_results


def test_aggregation_strategies_and_an_ablation(tmp_path, tiny_data, tiny_model_dir):
    out = tmp_path / "agg"
    assert experiment("aggregation", out, tiny_data, tiny_model_dir, "--only", "central,cluster,no_ded") == 0
    report = check_report(
        out,
        ["## Strategies", "### Per domain", "## Ablations of cluster-aware aggregation", "## Convergence and communication"],
        [f"plots/{p}.png" for p in ("style_per_domain", "fid_per_domain", "global_lora_style", "train_loss", "bytes_per_round")],
    )
    assert "central (pooled data)" in report and "ours without DED" in report
    rows = read_results(out)
    assert list(rows) == ["cluster", "central", "no_ded"]  # the experiment's order, not --only's
    quality = ["style_acc", "style_top", "class_acc", "class_top", "fid", "kid", "alignment", "ari", "kib_up", "s_per_round"]
    for name, row in rows.items():
        assert row["seeds"] == "1" and row["style_acc_std"] == ""
        check_numbers(row, quality + [c for c in row if c.startswith(("style_acc_", "fid_")) and not c.endswith("_std")])
        if name != "central":
            check_numbers(row, ["global_style_acc", "global_class_acc", "global_fid", "global_alignment", "fedit_error"])
            assert float(row["kib_up"]) > 0
    assert rows["central"]["global_style_acc"] == "" and float(rows["central"]["kib_up"]) == 0
    # DED only shapes the global LoRA: the clients' own adapters and their scores do not move
    for col in ("style_acc", "class_acc", "fid", "alignment"):
        assert math.isclose(float(rows["no_ded"][col]), float(rows["cluster"][col]), rel_tol=1e-4, abs_tol=1e-4), col
    run = json.loads((out / "cluster_seed0" / "metrics.json").read_text())
    assert run["final"]["adapters"] == "own" and run["global"]["adapters"] == "global"
    assert (out / "cluster_seed0" / "samples" / "global" / "client_0" / "0000.png").is_file()


def test_split_through_a_real_service(tmp_path, tiny_data, tiny_model_dir):
    out = tmp_path / "split"
    assert experiment("split", out, tiny_data, tiny_model_dir, "--only", "0,0.3") == 0
    check_report(
        out,
        ["## Quality and device compute per server share s and mode"],
        [f"plots/{p}_vs_split.png" for p in ("style", "class", "alignment", "fid", "device_time")],
    )
    rows = read_results(out)
    modes = ["auto", "global", "base", "uniform"]
    assert list(rows) == ["s=0"] + [f"s=0.3/{m}" for m in modes]  # s = 0 once: it has no server steps
    assert [row["mode"] for row in rows.values()] == ["-", *modes]
    for row in rows.values():
        check_numbers(row, ["style_acc", "class_acc", "fid", "kid", "alignment", "device_s_per_image", "device_time_ratio"])
        assert 0 <= float(row["pixel_change"]) <= 1
    assert float(rows["s=0"]["server_steps"]) == 0 and float(rows["s=0"]["kib_sent_per_image"]) == 0
    assert float(rows["s=0"]["device_time_ratio"]) == 1
    for m in modes:
        assert float(rows[f"s=0.3/{m}"]["server_steps"]) == 2  # ceil(0.3 x 4 tiny steps)
        assert float(rows[f"s=0.3/{m}"]["kib_received_per_image"]) > 0
    sent = {m: float(rows[f"s=0.3/{m}"]["kib_sent_per_image"]) for m in modes}
    assert sent["auto"] > sent["global"] == sent["base"] == sent["uniform"] > 0  # only auto sends the task embedding
    run = json.loads((out / "cluster_seed0" / "metrics.json").read_text())
    assert not run["final"]["inference"]["hybrid"] and run["split_0.3"]["inference"]["split"] == 0.3
    assert run["split_0.3"]["inference"]["mix"] == "auto" and run["split_0.3_base"]["inference"]["mix"] == "base"
    for key in ("split_0.3", "split_0.3_global", "split_0.3_base", "split_0.3_uniform"):
        assert (out / "cluster_seed0" / "samples" / key / "client_1" / "0000.png").is_file()


def test_mean_and_std_over_seeds(tmp_path):
    result = Result(Setting("x", "setting x"), [tmp_path / "x_seed0", tmp_path / "x_seed1"], [{"fid": 10.0}, {"fid": 14.0}])
    assert result.cell("fid", 1) == "12.0 ± 2.8" and result.cell("alignment") == "-"
    write_results(Plan(preset("tiny"), tmp_path, None, None, [0, 1]), [result], 1.0)
    row = read_results(tmp_path)["x"]
    assert row["seeds"] == "2" and float(row["fid"]) == 12 and math.isclose(float(row["fid_std"]), 2 * math.sqrt(2), rel_tol=1e-5)


def test_unknown_settings_fail_before_any_run(tmp_path, tiny_data, tiny_model_dir, capsys):
    assert experiment("aggregation", tmp_path / "a", tiny_data, tiny_model_dir, "--only", "cluster,fedprox") == 2
    assert "fedprox" in capsys.readouterr().err
    assert experiment("split", tmp_path / "s", tiny_data, tiny_model_dir, "--only", "0.9") == 2
    assert "[0, 0.5]" in capsys.readouterr().err
    assert experiment("split", tmp_path / "s", tiny_data, tiny_model_dir, "--modes", "auto,cluster") == 2
    assert "--modes: unknown mode 'cluster'" in capsys.readouterr().err
    assert not list((tmp_path / "a").glob("*_seed*")) and not (tmp_path / "s").exists()
