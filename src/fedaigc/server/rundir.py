"""The run directory: everything a federated run writes, atomically, so a killed server resumes.

RUN/config.toml                       fully resolved config
RUN/sources.json                      the data and model folders it ran on ("" = the defaults)
RUN/metrics.json                      per-round metrics (+ `final` after evaluation)
RUN/rounds/round_003/state.*          the server's whole state after round 3, the round's metrics
                                      entry and the config it ran with, under one content hash
RUN/adapters/round_003/*.safetensors  that round's adapters
RUN/adapters/{client_<id>,cluster_<k>,global}.safetensors   the latest round's (diffusers format)
RUN/adapters/clusters.json            members, shares and domain embeddings (for the inference server)
RUN/devices/client_<id>/style_token.safetensors   a simulated device's private token (name + slot):
                                      in a deployment it never leaves the device

A round is finished when its `rounds/round_NNN/state.json` exists: each folder is written under a
temporary name and renamed, so a kill at any point leaves the last finished round whole, and a
leftover `*.tmp` is ignored (the next write of that round replaces it). metrics.json's rounds are
rebuilt from the round folders, so a kill between the state and the metrics writes, or a deleted
metrics.json, loses nothing. docs/method.md ("Run directory") has the rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import tomllib
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from fedaigc import config
from fedaigc.errors import UserError
from fedaigc.paths import replacing
from fedaigc.protocol.adapter_files import save_adapter
from fedaigc.protocol.lora import LoraSpec
from fedaigc.server.strategies import ServerStrategy, make_strategy

log = logging.getLogger(__name__)

ROUND_DIR = re.compile(r"round_(\d{3,})")  # round_003; not round_003.tmp
STATE_FORMAT = 2  # state.json: {"format", "config", "entry", "meta", "sha256"}
FREE_KEYS = {"federation.rounds"}  # may change between a run's rounds without --allow-config-change


def write_json(path: Path, obj) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path):
    """A JSON file's content, or a UserError naming the file (unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is corrupt or unreadable: {e}") from None


@contextmanager
def _replaced_atomically(folder: Path):
    """Yield an empty temporary folder; on success it replaces `folder` in one rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _digest(tensors: bytes, record: dict) -> str:
    """The content hash of a round's state: its safetensors bytes and the rest of state.json."""
    h = hashlib.sha256(tensors)
    h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def _flat(tree: dict, where: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{where}{key}.") if isinstance(value, dict) else {where + key: value}
    return out


class RunDir:
    """A run directory; nothing is created until something is written."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"round_{r:03d}"

    def device_dir(self, cid: int) -> Path:
        return self.root / "devices" / f"client_{cid}"

    def finished_rounds(self) -> list[int]:
        """The rounds whose state was written whole (a `.tmp` folder is a write a kill interrupted)."""
        done = []
        for p in (self.root / "rounds").glob("round_*"):
            m = ROUND_DIR.fullmatch(p.name)
            if m and (p / "state.json").is_file():
                done.append(int(m.group(1)))
        return sorted(done)

    def last_round(self) -> int:
        return max(self.finished_rounds(), default=0)

    # metrics ----------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """metrics.json, its `rounds` rebuilt from the round folders: every finished round's entry
        (with what evaluation added to it, e.g. `ari`), none of a round whose state is not there."""
        metrics = {"rounds": []}
        if self.metrics_file.exists():
            metrics = read_json(self.metrics_file)
            rounds = metrics.get("rounds") if isinstance(metrics, dict) else None
            if not isinstance(rounds, list) or not all(isinstance(e, dict) and isinstance(e.get("round"), int) for e in rounds):
                raise UserError(
                    f"{self.metrics_file} is not a run's metrics (an object whose 'rounds' lists per-round objects): "
                    "remove it and its rounds are rebuilt from the run's saved rounds"
                )
        written = {e["round"]: e for e in metrics["rounds"]}
        metrics["rounds"] = [{**self._record(r)["entry"], **written.get(r, {})} for r in self.finished_rounds()]
        return metrics

    # one round --------------------------------------------------------------------------------
    def save_round(self, aggregator: ServerStrategy, entry: dict, spec: LoraSpec, cfg: config.Config) -> None:
        """Write one finished round: its adapters, then its state (with `entry` and the config `cfg`
        it ran with; the state's presence marks the round as finished), then metrics.json, then the
        latest adapters' copies. A kill between any two steps leaves the last finished round whole."""
        r = entry["round"]
        with _replaced_atomically(self.root / "adapters" / f"round_{r:03d}") as tmp:
            self._write_adapters(tmp, aggregator, spec)
        tensors, meta = aggregator.state()
        data = save_safetensors(tensors)
        record = {"format": STATE_FORMAT, "config": config.to_toml(cfg), "entry": entry, "meta": meta}
        with _replaced_atomically(self.round_dir(r)) as tmp:
            (tmp / "state.safetensors").write_bytes(data)
            (tmp / "state.json").write_text(json.dumps({**record, "sha256": _digest(data, record)}) + "\n")
        write_json(self.metrics_file, self.metrics())
        self.publish(r)

    def publish(self, r: int) -> None:
        """Round `r`'s adapters as the latest ones (RUN/adapters/*), where users and the inference
        server look: each file replaced in one rename, and those round `r` has not removed."""
        folder = self.root / "adapters"
        names = {f.name for f in (folder / f"round_{r:03d}").iterdir()}
        for f in folder.iterdir():
            if f.is_file() and f.name not in names:
                f.unlink()
        for name in sorted(names):
            with replacing(folder / name) as tmp:
                shutil.copyfile(folder / f"round_{r:03d}" / name, tmp)

    def _write_adapters(self, folder: Path, aggregator: ServerStrategy, spec: LoraSpec) -> None:
        for cid in sorted(aggregator.assignment):
            adapter, slot = aggregator.model_for(cid)
            if adapter is not None:
                save_adapter(folder / f"client_{cid}.safetensors", adapter, spec)
        for k, adapter in aggregator.trained().items():
            save_adapter(folder / f"cluster_{k}.safetensors", adapter, spec)
            save_file({"slot": aggregator.clusters[k].slot.contiguous()}, str(folder / f"cluster_{k}.slot.safetensors"))
        write_json(folder / "clusters.json", cluster_info(aggregator))
        g = aggregator.global_adapter
        if g is not None:
            rank = next(v.shape[0] for k, v in g.items() if k.endswith(".lora_A.weight"))
            scale = aggregator.global_scale
            save_adapter(folder / "global.safetensors", g, LoraSpec(rank, scale * rank, spec.text_encoder, spec.convs))

    def check(self, cfg: config.Config, allow_change: bool = False) -> None:
        """Everything `start` and evaluation read, checked before any work: the config against the
        saved rounds (`check_config`), the last round's state (its content hash, then restored into a
        scratch server) and metrics.json."""
        self.check_config(cfg, allow_change)
        if self.last_round():
            self.restore(make_strategy(cfg), self.last_round())
        self.metrics()

    def start(self, cfg: config.Config, aggregator: ServerStrategy) -> int:
        """Begin or resume a run of `cfg` (checked with `check_config` first): the last finished
        round restored into `aggregator` and its adapters published again (a kill may have stopped
        their copying), config.toml and metrics.json written. Returns the rounds done."""
        done = self.last_round()
        if done:
            self.restore(aggregator, done)
            self.publish(done)
            log.info("resuming %s after round %d", self.root, done)
        self.root.mkdir(parents=True, exist_ok=True)
        config.save(cfg, self.root / "config.toml")
        metrics = self.metrics()
        metrics["strategy"] = cfg.federation.strategy
        write_json(self.metrics_file, metrics)
        return done

    # reading a round back ---------------------------------------------------------------------
    def _record(self, r: int) -> dict:
        """Round `r`'s state.json, checked for its shape (not its hash: `state` does that)."""
        path = self.round_dir(r) / "state.json"
        record = read_json(path)
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            raise UserError(f"{path} is not a round state of this fedaigc (no format {STATE_FORMAT} record): start a new run")
        entry, meta = record.get("entry"), record.get("meta")
        if not (isinstance(entry, dict) and entry.get("round") == r and isinstance(meta, dict)):
            raise UserError(f"{path} is corrupt: no metrics entry of round {r} or no server state")
        if not isinstance(record.get("config"), str) or not isinstance(record.get("sha256"), str):
            raise UserError(f"{path} is corrupt: no config or content hash")
        return record

    def state(self, r: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Round `r`'s server state (tensors, metadata), refused unless it matches its content hash."""
        record = self._record(r)
        path = self.round_dir(r) / "state.safetensors"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        digest = record.pop("sha256")
        if _digest(data, record) != digest:
            raise UserError(
                f"{self.round_dir(r)}: state.safetensors and state.json do not match their content hash (truncated or "
                "altered): remove the folder to go on from the round before"
            )
        try:
            return load_safetensors(data), record["meta"]
        except SafetensorError as e:
            raise UserError(f"{path} is corrupt: {e}") from None

    def restore(self, aggregator: ServerStrategy, r: int) -> None:
        tensors, meta = self.state(r)
        try:
            aggregator.restore(tensors, meta)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{self.round_dir(r)}: the saved state does not fit this run's config ({e!r})") from None

    def check_config(self, cfg: config.Config, allow_change: bool = False) -> None:
        """Refuse to go on with a config other than the one the last finished round ran with
        (other than `FREE_KEYS`), naming the first key that differs, unless `allow_change`."""
        done = self.last_round()
        if not done:
            return
        if cfg.federation.rounds < done:
            raise UserError(
                f"{self.root} has {done} rounds done: federation.rounds must be >= {done}, got {cfg.federation.rounds}"
            )
        if allow_change:
            return
        before = _flat(tomllib.loads(self._record(done)["config"]))
        now = _flat(tomllib.loads(config.to_toml(cfg)))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in FREE_KEYS)
        if changed:
            key = changed[0]
            raise UserError(
                f"{self.root} ran round {done} with {key} = {before.get(key)!r}, now {now.get(key)!r} "
                f"({len(changed)} key(s) differ): restore its config, or pass --allow-config-change to go on with this one"
            )


def cluster_info(aggregator: ServerStrategy) -> dict:
    """What the inference server needs to weight clusters per request: members, shares, domain
    embeddings (the clustering centroids) and the DED temperature."""
    ks = list(aggregator.trained())
    members = {k: sorted(c for c, kk in aggregator.assignment.items() if kk == k) for k in ks}
    total = max(1, sum(len(m) for m in members.values()))
    clusters = {
        str(k): {
            "members": members[k],
            "share": len(members[k]) / total,
            "embedding": None if (centroid := aggregator.clusters[k].centroid) is None else centroid.tolist(),
        }
        for k in ks
    }
    return {"strategy": aggregator.cfg.strategy, "tau": aggregator.cfg.tau, "clusters": clusters}


def bytes_of(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
