"""What the training edge server does with a round's uploads, one class per strategy, without Flower.

A `ServerStrategy` keeps the server's state (a `ClientState` per client, a `ClusterState` per
cluster, the global adapter), turns one round's uploads into the next state, and serialises that
state so a killed server resumes from the last finished round. `STRATEGIES` maps each
`federation.strategy` to its class (`make_strategy`). The Flower strategy (`server_app.py`) only
moves messages in and out of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from fedaigc.config import ClientConfig, Config, FederationConfig
from fedaigc.errors import UserError
from fedaigc.protocol.lora import Adapter, LoraSpec
from fedaigc.protocol.round import RoundPlan, Upload
from fedaigc.server import aggregation as agg
from fedaigc.server import defense
from fedaigc.server.clustering import (
    centroids,
    cluster,
    cluster_similarity,
    join_similarity,
    match_ids,
    normalize,
    place,
    reference_similarity,
)


def join_threshold(cfg: FederationConfig) -> float:
    """The similarity at which clients share a cluster by updates, and the one a newcomer needs to join
    a cluster between re-clusterings: by updates the mean noise-corrected cosine to its members
    (`merge_agreement`, with the profiling pass and its repeat) or the mean raw cosine (`merge_similarity`,
    without a pass; `clustering.join_similarity`), by embeddings the centred cosine to its centroid (`clustering.place`)."""
    if cfg.cluster_by == "embedding":
        return cfg.join_threshold
    return cfg.merge_agreement if cfg.profile_steps else cfg.merge_similarity


@dataclass
class RoundReport:
    round: int
    clusters: dict[int, int]  # client id -> cluster id
    rejected: dict[int, str] = field(default_factory=dict)  # client id -> reason
    fedit_error: float = float("nan")  # mean relative error of fedit vs exact, over clusters
    coefficients: dict[int, float] = field(default_factory=dict)  # cluster -> mean stacking coefficient
    ded: dict[int, float] = field(default_factory=dict)
    placed: dict[int, float] = field(default_factory=dict)  # newcomer -> similarity to its nearest cluster (place / join)


# the state ------------------------------------------------------------------------------------
def stored(key: str, kind: str, decode: Callable[[Any], Any] | None = None, rows_of: str | None = None) -> Any:
    """A state field (None until its strategy sets it) and where `ServerStrategy.state` puts it, per
    `kind`: "adapter" the tensors `key.<id>.<name>`, "tensor" the tensor `key.<id>`, "rows" one float32
    tensor `key` with a row per id, in the order of the sorted ids of the metadata field `rows_of`,
    "json" the metadata `key`: {<id>: value} (read back with `decode`)."""
    return field(default=None, metadata={"key": key, "kind": kind, "decode": decode, "rows_of": rows_of})


@dataclass
class ClientState:
    """What the server keeps of one client; each strategy sets the fields it needs."""

    cluster: int | None = stored("assignment", "json", int)  # the cluster it is in (`local`: its own id)
    # cluster-aware: its profile, the task embedding (and example count) of its first accepted round,
    # trained from the common start, so every client's is comparable with every other's. Stored in
    # float32, as uploaded (profiles are float64 copies of float32 embeddings: nothing is lost)
    profile: np.ndarray | None = stored("profiles", "rows", rows_of="profile_examples")
    examples: float | None = stored("profile_examples", "json", float)
    # cluster_by "update": the factors of what its first accepted round changed in the UNet,
    change: Adapter | None = stored("change", "adapter")
    repeat: Adapter | None = stored("repeat", "adapter")  # and of the repeat of its profiling pass (the noise reference)
    adapter: Adapter | None = stored("own", "adapter")  # `local`, `central`: its own adapter and token slot
    slot: torch.Tensor | None = stored("ownslot", "tensor")


@dataclass
class ClusterState:
    """What the server keeps of one cluster; each strategy sets the fields it needs."""

    centroid: np.ndarray | None = stored("centroids", "json", np.array)  # cluster-aware: the mean profile of its members
    adapter: Adapter | None = stored("cluster", "adapter")
    slot: torch.Tensor | None = stored("slot", "tensor")


def _save(cls: type, entries: dict[int, Any], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Add every field of `entries` (id -> a `cls`) to `tensors` and `meta`, where `stored` says."""
    for f in fields(cls):
        key, kind = f.metadata["key"], f.metadata["kind"]
        values = {i: v for i, e in sorted(entries.items()) if (v := getattr(e, f.name)) is not None}
        if kind == "adapter":
            tensors |= {f"{key}.{i}.{name}": t for i, adapter in values.items() for name, t in adapter.items()}
        elif kind == "tensor":
            tensors |= {f"{key}.{i}": t for i, t in values.items()}
        elif kind == "rows":
            if values:
                tensors[key] = torch.from_numpy(np.stack(list(values.values()))).float()
        else:
            meta[key] = {str(i): v.tolist() if isinstance(v, np.ndarray) else v for i, v in values.items()}


def _load(cls: type, tensors: dict[str, torch.Tensor], groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> dict:
    """What `_save` wrote of `cls` entries, back as {id: cls}; `groups` are the tensors by their key's
    first part (`key.<rest>`: {rest: tensor})."""
    entries: dict[int, Any] = {}

    def put(i: int, name: str, value) -> None:
        setattr(entries.setdefault(i, cls()), name, value)

    for f in fields(cls):
        key, kind = f.metadata["key"], f.metadata["kind"]
        if kind == "adapter":
            adapters: dict[int, Adapter] = {}
            for rest, t in groups.get(key, {}).items():
                i, name = rest.split(".", 1)
                adapters.setdefault(int(i), {})[name] = t
            for i, adapter in adapters.items():
                put(i, f.name, adapter)
        elif kind == "tensor":
            for i, t in groups.get(key, {}).items():
                put(int(i), f.name, t)
        elif kind == "rows":
            rows = tensors[key].double().numpy() if key in tensors else np.zeros((0, 0))
            for i, row in zip(sorted(int(i) for i in meta[f.metadata["rows_of"]]), rows, strict=True):
                put(i, f.name, row)
        else:
            for i, value in meta[key].items():
                put(int(i), f.name, f.metadata["decode"](value))
    return dict(sorted(entries.items()))


def _weighted_mean(vectors: list[torch.Tensor], weights) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    return (torch.stack([v.double() for v in vectors]) * w[:, None]).sum(0).to(vectors[0].dtype)


# the strategies -------------------------------------------------------------------------------
class ServerStrategy(ABC):
    """One strategy's server. A subclass says what a client starts its next round from (`model_for`)
    and what a round's accepted uploads make of the state (`combine`); screening the uploads, the
    round plan and the state on disk are shared."""

    def __init__(self, cfg: FederationConfig, scale: float):
        """`scale` = alpha / rank of the clients' LoRA (ΔW = scale · B A); `cfg` is a validated
        config's (`config.validate`)."""
        self.cfg, self.scale = cfg, scale
        self.clients: dict[int, ClientState] = {}
        self.clusters: dict[int, ClusterState] = {}
        self.global_adapter: Adapter | None = None  # what global.safetensors holds (ΔW = global_scale · B A)
        self.global_scale = 1.0
        self.reference: Adapter | None = None  # a zero adapter of the right shapes, for screening

    @property
    def assignment(self) -> dict[int, int]:
        """Client -> cluster, for the clients in one."""
        return {c: s.cluster for c, s in sorted(self.clients.items()) if s.cluster is not None}

    def trained(self) -> dict[int, Adapter]:
        """Cluster -> adapter, for the clusters that have one, by id."""
        return {k: s.adapter for k, s in sorted(self.clusters.items()) if s.adapter is not None}

    # what each client starts the next round from -------------------------------------------
    @abstractmethod
    def model_for(self, cid: int) -> tuple[Adapter | None, torch.Tensor | None]:
        """The adapter and token slot client `cid` starts its next round from; None: the initial LoRA
        and the neutral slot every client began with."""

    def profile_steps(self, cid: int) -> int:
        """Steps of the profiling pass the client runs before its round (`Upload.profile`); 0 = none."""
        return 0

    def timestep_bias(self, cid: int, configured: float) -> float:
        """The timestep bias the client trains its next round with (`configured`: the config's)."""
        return configured

    def base_delta(self) -> Adapter | None:
        """What every client merges into its base weights under its LoRA; None = nothing."""
        return None

    def plan_for(self, server_round: int, cid: int, client: ClientConfig) -> RoundPlan:
        """What client `cid` trains in `server_round` (the clients' config section `client`): from
        `model_for`, with `timestep_bias`, `profile_steps` and `base_delta`."""
        adapter, slot = self.model_for(cid)
        return RoundPlan(
            server_round=server_round,
            seed=self.cfg.seed,
            steps=client.steps,
            timestep_bias=self.timestep_bias(cid, client.timestep_bias),
            profile_steps=self.profile_steps(cid),
            profile_bias=client.timestep_bias,
            adapter=adapter,
            slot=slot,
            merged=self.base_delta(),
        )

    # one round --------------------------------------------------------------------------------
    def aggregate(self, server_round: int, uploads: dict[int, Upload], weights: dict[int, float] | None = None) -> RoundReport:
        """Screen the uploads (names, shapes, finite, norm: `aggregation.screen`; and what `_screen`
        adds), then `combine` the accepted ones. `weights` multiply the clients' example counts in
        every weighted average (network-aware weighting: the inverse of their estimated
        participation rates, server/participation.py)."""
        cids = sorted(uploads)
        if self.reference is None and cids:
            self.reference = {k: torch.zeros_like(v) for k, v in uploads[cids[0]].lora.items()}
        rejected: dict[int, str] = {}
        if self.reference is not None:
            ok, bad = agg.screen({str(c): uploads[c].lora for c in cids}, self.reference, self.cfg.norm_factor)
            rejected = {int(c): r for c, r in bad.items()}
            cids = [int(c) for c in ok]
            for c in list(cids):
                if not (torch.isfinite(uploads[c].embedding).all() and torch.isfinite(uploads[c].slot).all()):
                    rejected[c] = "NaN or Inf in embedding or token slot"
                    cids.remove(c)
            rejected |= self._screen(cids, uploads)
            cids = [c for c in cids if c not in rejected]
        report = RoundReport(server_round, {}, rejected)
        if cids:
            examples = {c: uploads[c].num_examples * (weights or {}).get(c, 1.0) for c in cids}
            self.combine({c: uploads[c] for c in cids}, examples, report)
        report.clusters = self.assignment
        return report

    def _screen(self, cids: list[int], uploads: dict[int, Upload]) -> dict[int, str]:
        """{client: reason} for what this strategy refuses beyond the shared checks: nothing."""
        return {}

    @abstractmethod
    def combine(self, accepted: dict[int, Upload], examples: dict[int, float], report: RoundReport) -> None:
        """The next state from round `report.round`'s accepted uploads (by client id, sorted) and the
        clients' weights (`examples`); what a strategy reports goes into `report`."""

    # persistence -------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (for safetensors) and JSON-able metadata that `restore` turns back into this state:
        the fields of every `ClientState` and `ClusterState` (where `stored` says), the global adapter
        (`global.<name>`) and its scale."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {}
        _save(ClientState, self.clients, tensors, meta)
        _save(ClusterState, self.clusters, tensors, meta)
        if self.global_adapter is not None:
            tensors |= {f"global.{name}": t for name, t in self.global_adapter.items()}
        meta["global_scale"] = self.global_scale
        return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, meta  # clones: no shared storage

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if "." in key:
                kind, rest = key.split(".", 1)
                groups.setdefault(kind, {})[rest] = t
        self.clients = _load(ClientState, tensors, groups, meta)
        self.clusters = _load(ClusterState, tensors, groups, meta)
        self.global_adapter = groups.get("global")
        self.global_scale = meta["global_scale"]
        adapters = [s.adapter for s in [*self.clusters.values(), *self.clients.values()] if s.adapter is not None]
        if adapters:
            self.reference = {k: torch.zeros_like(v) for k, v in adapters[0].items()}


class OneCluster(ServerStrategy):
    """The baselines that train one model for everyone: every client is in cluster 0."""

    def model_for(self, cid: int) -> tuple[Adapter | None, torch.Tensor | None]:
        shared = self.clusters.get(0, ClusterState())
        return shared.adapter, shared.slot

    def _join(self, cids: list[int]) -> None:
        for c in cids:
            self.clients.setdefault(c, ClientState()).cluster = 0


class FedAvg(OneCluster):
    """FedAvg: the clients' adapters (their A and B factors) and token slots averaged, weights ∝ examples."""

    average: ClassVar[Callable[[list[Adapter], list[float]], Adapter]] = staticmethod(agg.average)

    def combine(self, accepted: dict[int, Upload], examples: dict[int, float], report: RoundReport) -> None:
        cids = list(accepted)
        weights = [examples[c] for c in cids]
        merged = self.average([accepted[c].lora for c in cids], weights)
        self.clusters = {0: ClusterState(adapter=merged, slot=_weighted_mean([accepted[c].slot for c in cids], weights))}
        self._join(cids)
        self.global_adapter, self.global_scale = merged, self.scale


class FedGeoMed(FedAvg):
    """FedAvg with the weighted geometric median of the adapters instead of their mean (robust to outliers)."""

    average = staticmethod(agg.geomed)


class FLoRA(OneCluster):
    """FLoRA: this round's adapters stacked exactly (weights ∝ examples), appended to the stack of the
    earlier rounds; each client merges the whole stack into its base weights and trains a fresh LoRA on it."""

    def base_delta(self) -> Adapter | None:
        """The global stack (scale 1; rank = clients x rank x rounds)."""
        return self.global_adapter

    def combine(self, accepted: dict[int, Upload], examples: dict[int, float], report: RoundReport) -> None:
        cids = list(accepted)
        total = sum(examples[c] for c in cids)
        weights = [examples[c] / total for c in cids]
        earlier = [self.global_adapter] if self.global_adapter is not None else []
        self.global_adapter = agg.stack(
            earlier + [accepted[c].lora for c in cids],
            [1.0] * len(earlier) + [self.scale] * len(cids),
            [1.0] * len(earlier) + weights,
            self.cfg.max_rank or None,
        )
        self.global_scale = 1.0
        self.clusters = {0: ClusterState(slot=_weighted_mean([accepted[c].slot for c in cids], weights))}
        self._join(cids)


class Local(ServerStrategy):
    """No federation: every client goes on from its own last adapter and slot, in a cluster of its own."""

    def model_for(self, cid: int) -> tuple[Adapter | None, torch.Tensor | None]:
        own = self.clients.get(cid, ClientState())
        return own.adapter, own.slot

    def combine(self, accepted: dict[int, Upload], examples: dict[int, float], report: RoundReport) -> None:
        for c, upload in accepted.items():
            self.clients[c] = ClientState(cluster=c, adapter=upload.lora, slot=upload.slot)


class Central(Local):
    """No federation, pooled data (the upper bound): simulation/central.py trains one adapter per domain
    on the pooled images of its clients and hands it to `set_pooled`; each client goes on from its own."""

    def set_pooled(self, domain: int, members: list[int], upload: Upload) -> None:
        """Every client of a domain gets the adapter and slot trained on the pooled images of all of them."""
        for c in members:
            self.clients[c] = ClientState(cluster=domain, adapter=upload.lora, slot=upload.slot)


class ClusterAware(ServerStrategy):
    """The paper's method: clients clustered by their profiles, one adapter and token slot per cluster
    (its members' weighted average), and every cluster's adapter stacked into the global one with its
    DED/SNT coefficient."""

    def model_for(self, cid: int) -> tuple[Adapter | None, torch.Tensor | None]:
        client = self.clients.get(cid)
        if client is None or client.cluster is None:
            if self.cfg.newcomer_start == "global" and self.global_adapter is not None:
                return self.warm_start()
            return None, None  # the common start: the initial LoRA and neutral slot every client began from
        own = self.clusters.get(client.cluster, ClusterState())
        return own.adapter, own.slot

    def profiling(self, cid: int) -> bool:
        """Whether the client's next upload makes its profile (its first accepted round)."""
        return cid not in self.clients

    def profile_steps(self, cid: int) -> int:
        """By updates, in its profiling round, if `profile_steps` asks for one."""
        return self.cfg.profile_steps if self.profiling(cid) and self.cfg.cluster_by == "update" else 0

    def timestep_bias(self, cid: int, configured: float) -> float:
        """Uniform in a profiling round, `configured` otherwise. A first round with uniform timesteps
        trains better adapters than one with the bias, but what it learns separates the styles worse
        (docs/method.md): so by updates the profile comes from a separate pass at the configured bias
        (without one, the round itself keeps the bias), and by embeddings the slot of the uniform
        round is the profile."""
        uniform = self.profiling(cid) and (self.cfg.cluster_by == "embedding" or self.profile_steps(cid) > 0)
        return 1.0 if uniform else configured

    def warm_start(self) -> tuple[Adapter, torch.Tensor]:
        """A newcomer's first round with `newcomer_start = "global"`: per layer, the best rank-r
        approximation (truncated SVD) of the global LoRA Σ c_k ΔW_k, rescaled to the clients'
        alpha / r, and the clusters' token slots averaged by their shares of the clients."""
        some = next(iter(self.trained().values()))
        rank = next(v.shape[0] for name, v in some.items() if name.endswith(agg.A_SUFFIX))
        ks, shares = [k for k, s in sorted(self.clusters.items()) if s.slot is not None], self._shares()
        slot = _weighted_mean([self.clusters[k].slot for k in ks], [shares.get(k, 0.0) for k in ks])
        return agg.stack([self.global_adapter], [1 / self.scale], [1.0], rank), slot

    def _screen(self, cids: list[int], uploads: dict[int, Upload]) -> dict[int, str]:
        """{client: reason} for the clients asked for a profiling pass whose profile is missing or
        malformed (the names and shapes of the UNet part of the adapter, finite, norm as `screen`)."""
        asked = [c for c in cids if self.profile_steps(c)]
        missing = {
            c: "no profile (the server asked for a profiling pass and its repeat)"
            for c in asked
            if uploads[c].profile is None or uploads[c].profile_repeat is None
        }
        unet = {k: v for k, v in self.reference.items() if k.startswith("unet.")}
        bad: dict[str, str] = {}
        for name in ("profile", "profile_repeat"):
            profiles = {str(c): getattr(uploads[c], name) for c in asked if c not in missing and str(c) not in bad}
            bad |= {c: f"{name}: {reason}" for c, reason in agg.screen(profiles, unet, self.cfg.norm_factor)[1].items()}
        return missing | {int(c): reason for c, reason in bad.items()}

    def combine(self, accepted: dict[int, Upload], examples: dict[int, float], report: RoundReport) -> None:
        """Cluster every client seen so far by its profile, every `recluster_every` rounds (ids
        kept); in between, place the clients seen for the first time without moving anyone else.
        Then average, per cluster, the members that trained from its adapter.

        Profiles, not this round's embeddings: a client that trained from its cluster's token slot
        uploads an embedding pulled towards that slot, so this round's embeddings of clients that
        started from different clusters (or from the common start) are not comparable; and with
        partial participation this round's clients are a few, while the profiles are everyone seen."""
        cids, uploads = list(accepted), accepted
        sent = {c: self.model_for(c)[0] for c in cids}  # what each client trained from, before re-clustering
        first = [c for c in cids if c not in self.clients]
        for c in first:
            up = uploads[c]
            client = self.clients[c] = ClientState(profile=up.embedding.double().numpy(), examples=float(up.num_examples))
            if self.cfg.cluster_by == "update":
                client.change = agg.change(up.profile if up.profile is not None else up.lora, sent[c])
                if up.profile_repeat is not None:
                    client.repeat = agg.change(up.profile_repeat, sent[c])
        previous = self.assignment
        if not previous or (report.round - 1) % max(1, self.cfg.recluster_every) == 0:
            known = sorted(self.clients)
            labels = dict(zip(known, (int(x) for x in self._cluster(known)), strict=True))
            mapping, parents = match_ids(previous, labels)
            for c, x in labels.items():
                self.clients[c].cluster = mapping[x]
            for k, parent in parents.items():  # a split cluster's other half starts from its adapter too
                if parent in self.clusters and self.clusters[parent].adapter is not None:
                    half = self.clusters.setdefault(k, ClusterState())
                    half.adapter, half.slot = self.clusters[parent].adapter, self.clusters[parent].slot
        else:
            self._place(first, report)
        self._refresh_clusters()
        existing = self.trained()
        errors = []
        for k in sorted({self.clients[c].cluster for c in cids}):
            # a member that trained from another start (the common start, or another cluster's adapter
            # before a re-clustering moved it) only counts from its next round on: averaging the A and
            # B factors of unrelated starts would mix two factorizations
            members = [c for c in cids if self.clients[c].cluster == k and (k not in existing or sent[c] is existing[k])]
            if self.cfg.defense == "robust":
                ups, refs = {c: uploads[c].lora for c in members}, {c: sent[c] for c in members}
                members, bad = defense.screen_cluster(ups, refs, self.scale, self.cfg.defense_norm, self.cfg.defense_cos)
                report.rejected.update(bad)
            if not members:  # nobody to count (or to trust): the cluster keeps last round's adapter
                continue
            own = self.clusters[k]
            emb, _ = self._profiles(members)
            w = agg.member_weights([examples[c] for c in members], torch.from_numpy(emb), torch.from_numpy(own.centroid))
            adapters, slots = [uploads[c].lora for c in members], [uploads[c].slot for c in members]
            if len(members) > 1:
                errors.append(agg.fedit_error(adapters, w))
            if k in existing and self.cfg.server_lr != 1.0:
                # start + lr x (average - start) is a weighted average with the start weighted 1 - lr
                w = [self.cfg.server_lr * x / sum(w) for x in w] + [1.0 - self.cfg.server_lr]
                adapters, slots = adapters + [existing[k]], slots + [own.slot]
            own.adapter = agg.exact_average(adapters, w) if self.cfg.intra == "exact" else agg.average(adapters, w)
            own.slot = _weighted_mean(slots, w)
        report.fedit_error = float(np.mean(errors)) if errors else 0.0
        self._stack(report)

    def _features(self, cids: list[int]) -> np.ndarray:
        """What the clients are clustered by, one row each: their task embeddings, or points with
        the inner products of their first rounds' UNet changes (`agg.gram_points`)."""
        if self.cfg.cluster_by == "embedding":
            return self._profiles(cids)[0]
        return agg.gram_points(agg.gram([self.clients[c].change for c in cids])).numpy()

    def _similarity(self, cids: list[int]) -> np.ndarray:
        """By updates, between the clients' first rounds' UNet changes: noise-corrected cosines of
        their profiling passes and repeats (`clustering.reference_similarity`) when every one sent a
        repeat, else raw cosines. Never centred: an update's direction means the same whoever else is
        in the federation."""
        if all(self.clients[c].repeat is not None for c in cids):
            changes = [self.clients[c].change for c in cids] + [self.clients[c].repeat for c in cids]
            return reference_similarity(agg.gram(changes).numpy())
        x = normalize(self._features(cids))
        return x @ x.T

    def _cluster(self, cids: list[int]) -> np.ndarray:
        """By updates: average linkage on `_similarity`, K fixed or cut where it reaches `join_threshold`.
        By embeddings: centred cosines (every slot starts from the same word), K fixed or silhouette-best."""
        k = self.cfg.k or None
        if self.cfg.cluster_by == "embedding":
            return cluster(self._features(cids), k=k)
        return cluster_similarity(self._similarity(cids), None if k else join_threshold(self.cfg), k)

    def _place(self, first: list[int], report: RoundReport) -> None:
        """Between re-clusterings: the clients seen for the first time join the cluster nearest their
        feature (or a new one), and nobody else moves. By embeddings: the nearest centroid at centred
        cosine >= `join_threshold`; by updates: the clustering's own average-linkage rule (`join`)."""
        assignment = self.assignment
        centres = {k: s.centroid for k, s in sorted(self.clusters.items()) if s.centroid is not None}
        fresh = max([*assignment.values(), *centres]) + 1
        if self.cfg.cluster_by == "embedding":
            shares = {k: n / len(assignment) for k, n in Counter(assignment.values()).items()}
            placed = place([self.clients[c].profile for c in first], centres, shares, join_threshold(self.cfg), fresh)
        else:
            known = sorted(assignment)
            labels = np.array([assignment[c] for c in known])
            placed = join_similarity(self._similarity(known + first), labels, join_threshold(self.cfg), fresh)
        for c, (k, similarity) in zip(first, placed, strict=True):
            self.clients[c].cluster, report.placed[c] = k, similarity

    def _profiles(self, cids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([self.clients[c].profile for c in cids]), np.array([self.clients[c].examples for c in cids])

    def _refresh_clusters(self) -> None:
        """Every cluster's centroid (the example-weighted mean profile of its members); a cluster
        that re-clustering left without members is dropped with its adapter and slot."""
        assignment = self.assignment
        known = sorted(assignment)
        emb, counts = self._profiles(known)
        fresh = centroids(emb, np.array([assignment[c] for c in known]), counts)
        self.clusters = {k: self.clusters.get(k, ClusterState()) for k in sorted(fresh)}
        for k, centroid in fresh.items():
            self.clusters[k].centroid = centroid

    def _shares(self) -> dict[int, float]:
        """Each cluster's share of the clients assigned to clusters that have an adapter."""
        ks = list(self.trained())
        members = Counter(self.assignment.values())
        total = sum(members[k] for k in ks)
        return {k: members[k] / total for k in ks}

    def _stack(self, report: RoundReport) -> None:
        """The global adapter: every cluster's adapter stacked with its DED/SNT coefficient."""
        adapters = self.trained()
        ks = list(adapters)
        shares = self._shares()
        d = agg.ded({k: torch.from_numpy(self.clusters[k].centroid) for k in ks}, shares) if self.cfg.use_ded else None
        s = agg.snt(adapters, dict.fromkeys(ks, self.scale)) if self.cfg.use_snt else None
        coeffs = agg.stacking_coefficients(shares, d, s, self.cfg.tau)
        self.global_adapter = agg.stack(
            list(adapters.values()), [self.scale] * len(ks), [coeffs[k] for k in ks], self.cfg.max_rank or None
        )
        self.global_scale = 1.0
        report.ded = d or {}
        report.coefficients = {
            k: float(np.mean(list(c.values()))) if isinstance(c, dict) else float(c) for k, c in coeffs.items()
        }

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().restore(tensors, meta)
        if self.cfg.cluster_by == "update" and any(s.profile is not None and s.change is None for s in self.clients.values()):
            raise UserError(
                "this run's state holds no first updates to cluster by: it was clustered by task embeddings. "
                'Set federation.cluster_by = "embedding" to go on with it, or start a new run'
            )


STRATEGIES: dict[str, type[ServerStrategy]] = {
    "cluster": ClusterAware,
    "fedavg": FedAvg,
    "fedgeomed": FedGeoMed,
    "flora": FLoRA,
    "local": Local,
    "central": Central,
}  # the names are config.STRATEGY_NAMES, which the config's validation and the CLI read without importing torch


def make_strategy(cfg: Config) -> ServerStrategy:
    """The server of a (validated) config's federation, for its clients' LoRA."""
    return STRATEGIES[cfg.federation.strategy](cfg.federation, LoraSpec.of(cfg.client).scale)
