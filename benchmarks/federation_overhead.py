"""Federation overhead: the wall time of a federated round on Flower's simulation engine over the
bare time of the same local training in one plain loop (the same clients, data, steps and
seeds, one after the other in this process with all cores; no Flower, no Ray), and where the
difference goes.

    python benchmarks/federation_overhead.py [--preset demo] [--rounds 3] [--quick] [--out DIR]

Round 1 of the federation also starts the Ray workers and builds their clients (one base model
per worker); the ratio is about the later, steady rounds. The parts of the difference measured
here, in this process: one client's steps on one thread (the workers have one core each), the
arrays' serialisation (ArrayRecord and pickling, both ways, every sampled client) and the
server's aggregation plus writing the round. Prints `name: value (target)` lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from many_clients import RunWatch  # benchmarks/ is on the path when run as a script

from fedaigc.client.client_app import build_client
from fedaigc.config import Config, preset
from fedaigc.protocol.lora import Adapter
from fedaigc.protocol.round import Upload
from fedaigc.protocol.seeds import derived_seed
from fedaigc.server.participation import sample_clients
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import make_strategy
from fedaigc.simulation.federate import simulate

TARGET = 1.25


def local_round(cfg: Config, server_round: int, cids: list[int]) -> tuple[float, dict[int, Upload]]:
    """The local training of `server_round` for `cids` as their ClientApps run it (from the initial
    LoRA: a step costs the same from any), one client after the other; seconds and uploads.
    Clients are built before the clock starts, as the federation's workers keep theirs."""
    n = cfg.federation.num_clients
    clients = {cid: build_client(cfg, cid, n) for cid in cids}
    uploads, t0 = {}, time.perf_counter()
    for cid, client in clients.items():
        generator = torch.Generator().manual_seed(derived_seed(cfg.federation.seed, server_round, cid))
        uploads[cid] = client.train_round(None, None, cfg.client.steps, generator)
    return time.perf_counter() - t0, uploads


def round_trip(tensors: Adapter) -> None:
    """What Flower and Ray do to one message's arrays: an ArrayRecord, pickled and back to torch."""
    pickle.loads(pickle.dumps(ArrayRecord(tensors))).to_torch_state_dict()


def serialisation_seconds(uploads: dict[int, Upload]) -> float:
    """Every sampled client's download (its cluster LoRA and slot) and upload, as arrays travel."""
    t0 = time.perf_counter()
    for u in uploads.values():
        round_trip(u.lora)
        round_trip({"slot": u.slot})
        round_trip(u.lora)
        round_trip({"slot": u.slot, "embedding": u.embedding})
    return time.perf_counter() - t0


def server_seconds(cfg: Config, uploads: dict[int, Upload], spec) -> float:
    """The server's part of a round: aggregation and writing the round directory. The uploads come
    without a profiling pass, so they are their own profiles (else the server would reject them all)."""
    aggregator = make_strategy(dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, profile_steps=0)))
    with tempfile.TemporaryDirectory(prefix="fedaigc-overhead-") as tmp:
        t0 = time.perf_counter()
        aggregator.aggregate(1, uploads)
        RunDir(tmp).save_round(aggregator, {"round": 1}, spec, cfg)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--rounds", type=int, default=3, help="federated rounds (round 1 includes the workers' start)")
    ap.add_argument("--quick", action="store_true", help="tiny preset: a smoke run, not the target's setting")
    ap.add_argument("--out", type=Path, help="keep the federation's run directory here (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = preset("tiny" if args.quick else args.preset)
    cfg.federation.rounds = max(2, args.rounds)
    f, workers = cfg.federation, os.cpu_count() or 1  # `simulate` runs one Ray worker of one CPU per core
    with tempfile.TemporaryDirectory(prefix="fedaigc-overhead-") as tmp:
        out = args.out or Path(tmp) / "run"
        t0 = time.perf_counter()
        with RunWatch(out, every=1.0) as watch:
            simulate(cfg, out, None, None)
        wall = time.perf_counter() - t0
        rounds = RunDir(out).metrics()["rounds"]
    steady = [r["seconds"] for r in rounds[1:]]
    fed_round = sum(steady) / len(steady)
    seen = sorted(watch.after_round)  # the last round's snapshot can miss: Ray stops right after it
    fed_cpu = (watch.after_round[seen[-1]].cpu - watch.after_round[1].cpu) / (seen[-1] - 1) if seen[-1] > 1 else math.nan
    cids = sample_clients(list(range(f.num_clients)), f.fraction, f.seed, 2)

    torch.set_num_threads(workers)  # the plain loop gets the cores the federation's workers had
    bare, uploads = local_round(cfg, 2, cids)
    torch.set_num_threads(1)  # one worker's view: one core
    cpu0 = time.process_time()
    one_thread, _ = local_round(cfg, 2, cids[:1])
    one_cpu = (time.process_time() - cpu0) * len(cids)  # the round's steps on one thread, in CPU seconds
    torch.set_num_threads(workers)
    per_worker = math.ceil(len(cids) / workers)
    ideal = one_thread * per_worker  # the workers' share, no idle time, no messaging
    serial = serialisation_seconds(uploads)
    spec = build_client(cfg, cids[0], f.num_clients).spec
    server_seconds(cfg, uploads, spec)  # warm-up: the federation's server is warm after round 1
    server = server_seconds(cfg, uploads, spec)

    name = "federation_overhead"
    setting = f"{cfg.preset} preset, {len(cids)} clients x {cfg.client.steps} steps, batch {cfg.client.batch_size}"
    goal = f"target <= {TARGET}" if cfg.preset == "demo" else f"smoke run; the target <= {TARGET} is for the demo preset"
    print(f"{name}_ratio: {fed_round / bare:.2f} ({goal}; steady round / plain loop, {setting})")
    print(f"{name}_round_s: {fed_round:.1f} (federated round, rounds 2-{len(rounds)}, {workers} Ray workers of 1 core)")
    print(f"{name}_bare_s: {bare:.1f} (the same steps in one plain loop, {workers} threads)")
    print(f"{name}_cpu_ratio: {fed_cpu / one_cpu:.2f} (CPU s of a steady round, all processes / the same steps on 1 thread)")
    print(f"{name}_ideal_parallel_s: {ideal:.1f} (one client's steps on 1 thread x {per_worker} clients per worker)")
    print(f"{name}_vs_ideal_ratio: {fed_round / ideal:.2f} (steady round / ideal parallel: Flower, Ray, server, imbalance)")
    print(f"{name}_first_round_s: {rounds[0]['seconds']:.1f} (round 1: the workers also load the model and build their clients)")
    print(f"{name}_startup_s: {wall - sum(r['seconds'] for r in rounds):.1f} (Ray and Flower start and stop, once per run)")
    print(f"{name}_serialisation_s: {serial:.2f} (per round: ArrayRecord + pickle of every download and upload)")
    print(f"{name}_server_s: {server:.2f} (per round: aggregation and writing the round)")


if __name__ == "__main__":
    main()
