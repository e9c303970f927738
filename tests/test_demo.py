"""`fedaigc demo`, the README's main job, end to end on the tiny preset: both federations, hybrid
inference through a real local inference server, the report with its tables, plots and grids,
and the headline printed last."""

import json
import math

from PIL import Image

from fedaigc.cli import main


def test_tiny_demo_writes_the_report_and_prints_the_headline(tmp_path, tiny_data, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    args = ["-q", "demo", "--preset", "tiny", "--data", str(tiny_data), "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith(f"report: {out / 'report.md'}") and printed[-1].startswith("style accuracy: cluster-aware")

    summary = json.loads((out / "metrics.json").read_text())
    for strategy in ("fedavg", "cluster"):
        final = summary["strategies"][strategy]["final"]
        assert len(final["per_client"]) == 4 and final["samples_per_client"] == 4
        for key in ("style_acc", "class_acc", "alignment"):
            assert 0 <= final["mean"][key] <= 1, (strategy, key)
        assert math.isfinite(final["mean"]["fid"]) and final["mean"]["fid"] >= 0
        assert (out / strategy / "report.md").is_file()
    hybrid = summary["strategies"]["cluster"]["final"]["inference"]
    assert hybrid["hybrid"] and hybrid["server_steps"] > 0 and hybrid["bytes_sent"] > 0 and hybrid["bytes_received"] > 0
    assert not summary["strategies"]["fedavg"]["final"]["inference"]["hybrid"]

    report = (out / "report.md").read_text()
    headings = ["## Cluster-aware aggregation vs FedAvg", "## Hybrid inference", "### Per client", "## Evaluator and base model"]
    assert all(heading in report for heading in headings)
    assert "| FedAvg |" in report and "| cluster-aware (ours, hybrid inference) |" in report
    assert f"mix = `{hybrid['mix']}`" in report and hybrid["mix"] == "auto"  # the server's mode, as the service ran it
    images = ["plots/style_per_client.png", "plots/fid_per_client.png", "plots/train_loss.png"]
    images += ["samples_grid.png", "real_grid.png", "base_grid.png"]
    for name in images:
        assert f"({name})" in report, name
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 50
