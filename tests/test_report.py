"""The report templates: each one ships with the package, is rendered by some report writer, and a
key it uses that the writer does not give fails the report instead of leaving a blank."""

import fnmatch
import re
from pathlib import Path

import jinja2
import pytest
import tomllib

from fedaigc.config import preset
from fedaigc.eval.report import render_report

SRC = Path(__file__).parents[1] / "src" / "fedaigc"
TEMPLATES = SRC / "eval" / "templates"


def test_every_template_ships_and_is_used():
    names = sorted(p.name for p in TEMPLATES.glob("*.j2"))
    globs = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fedaigc.eval"]
    assert [n for n in names if not any(fnmatch.fnmatch(f"templates/{n}", g) for g in globs)] == []
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    used = {f"{n}.md.j2" for n in re.findall(r'render_report\(\s*"(\w+)"', code)}
    used |= {n for p in TEMPLATES.glob("*.j2") for n in re.findall(r'{% extends "([\w.]+)" %}', p.read_text())}
    assert used == set(names)


def test_a_key_the_data_lacks_fails_the_report(tmp_path):
    with pytest.raises(jinja2.UndefinedError, match="'threshold' is undefined"):  # a lenient template would print ""
        render_report("demo", {"cfg": preset("tiny"), "seconds": 60.0}, tmp_path / "report.md")
    assert not (tmp_path / "report.md").exists()
