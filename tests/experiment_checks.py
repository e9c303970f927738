"""Checks shared by the tiny experiment tests: run one, read its results.csv, check its report
(sections, plots, no NaN) and the ranges of its numbers."""

import csv
import math
import re
from pathlib import Path

from fedaigc.cli import main

IN_UNIT_RANGE = ("style_acc", "style_top", "class_acc", "class_top", "global_style_acc", "global_class_acc")


def experiment(name, out, data, model, *extra):
    args = ["experiment", name, "--preset", "tiny", "--data", str(data), "--model", str(model), "--out", str(out)]
    return main([*args, "--rounds", "1", "--num-clients", "2", *extra])


def read_results(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {row["setting"]: row for row in csv.DictReader(f)}


def check_report(out: Path, sections: list[str], plots: list[str]) -> str:
    report = (out / "report.md").read_text()
    for section in sections + ["## Samples", "## Runs"]:
        assert f"\n{section}\n" in report, section
    for png in plots + ["samples_grid.png"]:
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in report, png
    assert not re.search(r"\bnan\b", report)
    return report


def check_numbers(row: dict[str, str], columns) -> None:
    for col in columns:
        value = float(row[col])
        assert math.isfinite(value), (row["setting"], col)
        if col in IN_UNIT_RANGE or col.startswith("style_acc_"):
            assert 0 <= value <= 1, (row["setting"], col, value)
        if col in ("fid", "global_fid") or col.startswith("fid_"):
            assert value >= 0, (row["setting"], col, value)
        if col in ("alignment", "global_alignment", "ari"):
            assert -1 <= value <= 1, (row["setting"], col, value)
