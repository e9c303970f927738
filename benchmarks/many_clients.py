"""Many clients on one machine: the tiny preset with 100 simulated clients, 10 % of them sampled
per round, 5 rounds on Flower's simulation engine (one Ray worker per core). Wall time, peak RSS
of the Ray workers and of the server process, and the workers' RSS after every round: memory
must not grow with the number of rounds.

    python benchmarks/many_clients.py [--clients 100] [--fraction 0.1] [--rounds 5] [--quick] [--out DIR]

Linux only (RSS and its peak come from /proc/<pid>/status). Prints `name: value (target)` lines.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedaigc.config import preset
from fedaigc.eval.plots import curves
from fedaigc.server.rundir import RunDir
from fedaigc.simulation.federate import simulate

MIB = 2**20


def proc_memory(pid: int) -> dict[str, int]:
    """A process's memory in bytes from /proc (psutil has no peak): `VmRSS`, its peak `VmHWM`, and
    the RSS split into `RssAnon` (allocated) and `RssFile` (mapped files: libraries, weights)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


@dataclass
class Snapshot:
    """The run's processes right after a round was saved."""

    rss: dict[int, int]  # pid -> RSS of each ClientApp worker
    others: int  # RSS of the other processes this one started (Ray's services)
    cpu: float  # CPU seconds so far of this process and all it started (Ray's too) but the watch itself


@dataclass
class RunWatch:
    """Samples the processes of a run that writes `run_dir` every `every` s: a `Snapshot` right
    after each round is saved, and the peak RSS of each ClientApp worker (Ray names its process
    after the actor: `ray::ClientAppActor...`)."""

    run_dir: Path
    every: float = 0.25
    after_round: dict[int, Snapshot] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)  # pid -> peak RSS
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        me = psutil.Process()
        rss, others, cpu = {}, 0, cpu_seconds(me)
        for p in me.children(recursive=True):
            try:
                cpu += cpu_seconds(p)
                if "ClientAppActor" in " ".join(p.cmdline()):
                    memory = proc_memory(p.pid)
                    rss[p.pid], self.peak[p.pid] = memory["VmRSS"], memory["VmHWM"]
                else:
                    others += p.memory_info().rss
            except (psutil.Error, OSError):  # gone between listing and reading
                continue
        done = RunDir(self.run_dir).last_round()
        if done and done not in self.after_round and rss:
            self.after_round[done] = Snapshot(rss, others, cpu - time.thread_time())  # sample() runs in the watch's thread

    def watch(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> RunWatch:
        self._thread = threading.Thread(target=self.watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the clients sampled per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="20 clients, 2 rounds: a smoke run")
    ap.add_argument("--out", type=Path, help="keep the run directory here (default: a temporary one)")
    ap.add_argument("--plot", type=Path, help="RSS per round (default: docs/img/many_clients_rss.png; none with --quick)")
    args = ap.parse_args()
    plot_path = args.plot or (None if args.quick else Path("docs/img/many_clients_rss.png"))
    if args.quick:
        args.clients, args.rounds = 20, 2
    logging.basicConfig(level=logging.WARNING)
    cfg = preset("tiny")
    cfg.federation.num_clients, cfg.federation.fraction, cfg.federation.rounds = args.clients, args.fraction, args.rounds
    with tempfile.TemporaryDirectory(prefix="fedaigc-many-") as tmp:
        out = args.out or Path(tmp) / "run"
        t0 = time.perf_counter()
        with RunWatch(out) as watch:
            simulate(cfg, out, None, None)
        wall = time.perf_counter() - t0
        rounds = RunDir(out).metrics()["rounds"]
    sampled = {c for r in rounds for c in r["sampled"]}
    after = watch.after_round
    per_round = [sum(after[r].rss.values()) / MIB if r in after else math.nan for r in range(1, args.rounds + 1)]
    server_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB
    name = "many_clients"
    workers = len(watch.peak)
    print(f"{name}_wall_s: {wall:.1f} ({args.clients} clients, {args.fraction:.0%} per round, {args.rounds} rounds: completes)")
    for r in rounds:
        print(f"{name}_round_{r['round']}_s: {r['seconds']:.1f} ({len(r['sampled'])} clients trained)")
    for r in range(2, args.rounds + 1):
        if r in after and r - 1 in after:
            print(f"{name}_round_{r}_cpu_s: {after[r].cpu - after[r - 1].cpu:.1f} (CPU s of all the run's processes)")
    print(f"{name}_distinct_clients_trained: {len(sampled)} (of {args.clients}, over {args.rounds} rounds)")
    print(f"{name}_workers: {workers} (one Ray worker per core: {os.cpu_count()})")
    print(f"{name}_worker_peak_rss_mib: {max(watch.peak.values(), default=math.nan) / MIB:.0f} (one base model per worker)")
    print(f"{name}_workers_peak_rss_total_mib: {sum(watch.peak.values()) / MIB:.0f} (all workers)")
    print(f"{name}_server_peak_rss_mib: {server_peak:.0f} (driver: ServerApp and Ray client)")
    ray_services = max((s.others for s in after.values()), default=math.nan) / MIB
    print(f"{name}_ray_services_rss_mib: {ray_services:.0f} (raylet, GCS, agents, log monitor: once per machine)")
    for r, mib in enumerate(per_round, 1):
        print(f"{name}_workers_rss_after_round_{r}_mib: {mib:.0f} (flat across rounds)")
    growth = per_round[-1] - per_round[0] if len(per_round) > 1 else math.nan
    if plot_path is not None:
        xs = list(range(1, args.rounds + 1))
        series = {"all workers": (xs, per_round)}
        for i, pid in enumerate(sorted(watch.peak), 1):
            series[f"worker {i}"] = (xs, [after[r].rss.get(pid, math.nan) / MIB if r in after else math.nan for r in xs])
        title = f"Ray workers' RSS after each round ({args.clients} clients, {args.fraction:.0%} sampled)"
        curves(series, title, "round", "RSS (MiB)", plot_path)
    print(f"{name}_workers_rss_growth_round_1_to_{args.rounds}_mib: {growth:.0f} (~0: no growth with rounds)")


if __name__ == "__main__":
    main()
