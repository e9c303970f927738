"""Runs the performance benchmarks, each as a subprocess, and prints every figure they report: one
line `name: value (target)` per figure (`name: missing` for a script that is not there).

    python benchmarks/run_all.py            # quick mode: each benchmark's --quick (smoke sizes)
    python benchmarks/run_all.py --full     # the recorded settings (about 15 min on 2 cores)
    python benchmarks/run_all.py --only client_cost,many_clients

Exit status 0 when every benchmark that exists ran; 1 when one failed (its stderr tail is shown).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("federation_overhead", "many_clients", "client_cost", "server_scale", "communication")
FIGURE = re.compile(r"^[A-Za-z][\w.\-]*: \S.*\(.*\)$")  # name without spaces: log lines do not match


def figures(name: str, quick: bool) -> tuple[list[str], str | None]:
    """The figure lines of benchmarks/<name>.py, and its stderr tail if it failed."""
    script = HERE / f"{name}.py"
    if not script.is_file():
        return [f"{name}: missing"], None
    proc = subprocess.run([sys.executable, str(script), *(["--quick"] if quick else [])], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if FIGURE.match(line)]
    if proc.returncode:
        return [*lines, f"{name}: failed (exit {proc.returncode})"], "\n".join(proc.stderr.splitlines()[-20:])
    return lines, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the recorded settings instead of the quick ones")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    failed = False
    for name in names:
        lines, error = figures(name, quick=not args.full)
        print("\n".join(lines), flush=True)
        if error is not None:
            failed = True
            print(f"--- {name} stderr (last lines) ---\n{error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
