"""What the training edge server does with a round's uploads, for each strategy, without Flower.

An `Aggregator` keeps the server's state (cluster ids and centroids, the adapter and token slot
each client gets next, the global adapter), turns one round's uploads into the next state, and
serialises that state so a killed server resumes from the last finished round. The Flower
strategy (`server_app.py`) only moves messages in and out of it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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


class Aggregator:
    def __init__(self, cfg: FederationConfig, scale: float):
        """`scale` = alpha / rank of the clients' LoRA (ΔW = scale · B A); `cfg` is a validated
        config's (`config.validate`)."""
        self.cfg, self.scale = cfg, scale
        self.assignment: dict[int, int] = {}
        # each client's profile: the task embedding (and example count) of its first accepted round,
        # trained from the common start, so every client's is comparable with every other's
        self.profiles: dict[int, np.ndarray] = {}
        self.profile_examples: dict[int, float] = {}
        # cluster_by "update": the factors of what each client's first accepted round changed in the UNet
        self.changes: dict[int, Adapter] = {}
        self.repeats: dict[int, Adapter] = {}  # and of the repeat of its profiling pass (the noise reference)
        self.centroids: dict[int, np.ndarray] = {}  # cluster -> mean profile of its members
        self.cluster_adapters: dict[int, Adapter] = {}
        self.cluster_slots: dict[int, torch.Tensor] = {}
        self.own: dict[int, tuple[Adapter, torch.Tensor]] = {}  # the `local` and `central` strategies
        self.global_adapter: Adapter | None = None  # `flora`: the stack of every round so far
        self.global_scale = 1.0
        self.reference: Adapter | None = None  # a zero adapter of the right shapes, for screening

    @classmethod
    def from_config(cls, cfg: Config) -> Aggregator:
        """The server of a (validated) config's federation, for its clients' LoRA."""
        return cls(cfg.federation, LoraSpec.of(cfg.client).scale)

    # what each client starts the next round from -------------------------------------------
    def model_for(self, cid: int) -> tuple[Adapter | None, torch.Tensor | None]:
        if self.cfg.strategy in ("local", "central"):
            return self.own.get(cid, (None, None))
        if self.cfg.strategy == "cluster" and cid not in self.assignment:
            if self.cfg.newcomer_start == "global" and self.global_adapter is not None:
                return self.warm_start()
            return None, None  # the common start: the initial LoRA and neutral slot every client began from
        k = self.assignment.get(cid, 0 if self.cfg.strategy != "cluster" else None)
        return self.cluster_adapters.get(k), self.cluster_slots.get(k)  # flora: no adapter, a fresh LoRA

    def plan_for(self, server_round: int, cid: int, client: ClientConfig) -> RoundPlan:
        """What client `cid` trains in `server_round` (the clients' config section `client`): from
        `model_for`, with `timestep_bias`, `profile_steps` and FLoRA's `base_delta`."""
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

    def profiling(self, cid: int) -> bool:
        """Whether the client's next upload makes its profile (cluster strategy, first round)."""
        return self.cfg.strategy == "cluster" and cid not in self.profiles

    def profile_steps(self, cid: int) -> int:
        """Steps of the profiling pass the client runs before its round (`Upload.profile`): by
        updates, in its profiling round, if `profile_steps` asks for one."""
        return self.cfg.profile_steps if self.profiling(cid) and self.cfg.cluster_by == "update" else 0

    def timestep_bias(self, cid: int, configured: float) -> float:
        """The timestep bias the client trains its next round with: uniform in a profiling round,
        `configured` otherwise. A first round with uniform timesteps trains better adapters than one
        with the bias, but what it learns separates the styles worse (docs/method.md): so by
        updates the profile comes from a separate pass at the configured bias (without one, the
        round itself keeps the bias), and by embeddings the slot of the uniform round is the profile."""
        uniform = self.profiling(cid) and (self.cfg.cluster_by == "embedding" or self.profile_steps(cid) > 0)
        return 1.0 if uniform else configured

    def warm_start(self) -> tuple[Adapter, torch.Tensor]:
        """A newcomer's first round with `newcomer_start = "global"`: per layer, the best rank-r
        approximation (truncated SVD) of the global LoRA Σ c_k ΔW_k, rescaled to the clients'
        alpha / r, and the clusters' token slots averaged by their shares of the clients."""
        some = next(iter(self.cluster_adapters.values()))
        rank = next(v.shape[0] for name, v in some.items() if name.endswith(agg.A_SUFFIX))
        ks, shares = sorted(self.cluster_slots), self._shares()
        slot = _weighted_mean([self.cluster_slots[k] for k in ks], [shares.get(k, 0.0) for k in ks])
        return agg.stack([self.global_adapter], [1 / self.scale], [1.0], rank), slot

    def base_delta(self) -> Adapter | None:
        """What every client merges into its base weights under its LoRA: FLoRA's global stack
        (scale 1; rank = clients x rank x rounds), None for the other strategies."""
        return self.global_adapter if self.cfg.strategy == "flora" else None

    # one round --------------------------------------------------------------------------------
    def aggregate(self, server_round: int, uploads: dict[int, Upload], weights: dict[int, float] | None = None) -> RoundReport:
        """`weights` multiply the clients' example counts in every weighted average (network-aware
        weighting: the inverse of their estimated participation rates, server/participation.py)."""
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
            rejected |= self._screen_profiles(cids, uploads)
            cids = [c for c in cids if c not in rejected]
        report = RoundReport(server_round, {}, rejected)
        if not cids:
            report.clusters = dict(self.assignment)
            return report
        examples = {c: uploads[c].num_examples * (weights or {}).get(c, 1.0) for c in cids}
        if self.cfg.strategy == "local":
            for c in cids:
                self.own[c] = (uploads[c].lora, uploads[c].slot)
                self.assignment[c] = c
        elif self.cfg.strategy in ("fedavg", "fedgeomed"):
            self._one_cluster(cids, uploads, examples)
        elif self.cfg.strategy == "flora":
            self._flora(cids, uploads, examples)
        else:
            self._cluster_round(server_round, cids, uploads, report, examples)
        report.clusters = {c: self.assignment[c] for c in sorted(self.assignment)}
        return report

    def _screen_profiles(self, cids: list[int], uploads: dict[int, Upload]) -> dict[int, str]:
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

    def _one_cluster(self, cids: list[int], uploads: dict[int, Upload], examples: dict[int, float]) -> None:
        weights = [examples[c] for c in cids]
        adapters = [uploads[c].lora for c in cids]
        merged = agg.geomed(adapters, weights) if self.cfg.strategy == "fedgeomed" else agg.average(adapters, weights)
        self.cluster_adapters = {0: merged}
        self.cluster_slots = {0: _weighted_mean([uploads[c].slot for c in cids], weights)}
        self.assignment.update(dict.fromkeys(cids, 0))
        self.global_adapter, self.global_scale = merged, self.scale

    def _flora(self, cids: list[int], uploads: dict[int, Upload], examples: dict[int, float]) -> None:
        """FLoRA: this round's adapters stacked exactly (weights ∝ examples), appended to the stack
        of the earlier rounds; each client merges the whole stack and trains a fresh LoRA on it."""
        total = sum(examples[c] for c in cids)
        weights = [examples[c] / total for c in cids]
        earlier = [self.global_adapter] if self.global_adapter is not None else []
        self.global_adapter = agg.stack(
            earlier + [uploads[c].lora for c in cids],
            [1.0] * len(earlier) + [self.scale] * len(cids),
            [1.0] * len(earlier) + weights,
            self.cfg.max_rank or None,
        )
        self.global_scale = 1.0
        self.cluster_slots = {0: _weighted_mean([uploads[c].slot for c in cids], weights)}
        self.assignment.update(dict.fromkeys(cids, 0))

    def set_pooled(self, domain: int, members: list[int], upload: Upload) -> None:
        """`central` (no federation): every client of a domain gets the adapter and slot trained on
        the pooled images of all of them."""
        for c in members:
            self.own[c] = (upload.lora, upload.slot)
            self.assignment[c] = domain

    def _cluster_round(
        self, server_round: int, cids: list[int], uploads: dict[int, Upload], report: RoundReport, examples: dict[int, float]
    ) -> None:
        """Cluster every client seen so far by its profile, every `recluster_every` rounds (ids
        kept); in between, place the clients seen for the first time without moving anyone else.
        Then average, per cluster, the members that trained from its adapter.

        Profiles, not this round's embeddings: a client that trained from its cluster's token slot
        uploads an embedding pulled towards that slot, so this round's embeddings of clients that
        started from different clusters (or from the common start) are not comparable; and with
        partial participation this round's clients are a few, while the profiles are everyone seen."""
        sent = {c: self.model_for(c)[0] for c in cids}  # what each client trained from, before re-clustering
        first = [c for c in cids if c not in self.profiles]
        for c in first:
            self.profiles[c] = uploads[c].embedding.double().numpy()
            self.profile_examples[c] = float(uploads[c].num_examples)
            if self.cfg.cluster_by == "update":
                profile = uploads[c].profile if uploads[c].profile is not None else uploads[c].lora
                self.changes[c] = agg.change(profile, sent[c])
                if uploads[c].profile_repeat is not None:
                    self.repeats[c] = agg.change(uploads[c].profile_repeat, sent[c])
        if not self.assignment or (server_round - 1) % max(1, self.cfg.recluster_every) == 0:
            known = sorted(self.profiles)
            labels = dict(zip(known, (int(x) for x in self._cluster(known)), strict=True))
            mapping, parents = match_ids(self.assignment, labels)
            self.assignment = {c: mapping[x] for c, x in labels.items()}
            for k, parent in parents.items():  # a split cluster's other half starts from its adapter too
                if parent in self.cluster_adapters:
                    self.cluster_adapters[k], self.cluster_slots[k] = self.cluster_adapters[parent], self.cluster_slots[parent]
        else:
            self._place(first, report)
        self._refresh_clusters()
        existing = dict(self.cluster_adapters)
        errors = []
        for k in sorted({self.assignment[c] for c in cids}):
            # a member that trained from another start (the common start, or another cluster's adapter
            # before a re-clustering moved it) only counts from its next round on: averaging the A and
            # B factors of unrelated starts would mix two factorizations
            members = [c for c in cids if self.assignment[c] == k and (k not in existing or sent[c] is existing[k])]
            if self.cfg.defense == "robust":
                ups, refs = {c: uploads[c].lora for c in members}, {c: sent[c] for c in members}
                members, bad = defense.screen_cluster(ups, refs, self.scale, self.cfg.defense_norm, self.cfg.defense_cos)
                report.rejected.update(bad)
            if not members:  # nobody to count (or to trust): the cluster keeps last round's adapter
                continue
            emb, _ = self._profiles(members)
            w = agg.member_weights([examples[c] for c in members], torch.from_numpy(emb), torch.from_numpy(self.centroids[k]))
            adapters, slots = [uploads[c].lora for c in members], [uploads[c].slot for c in members]
            if len(members) > 1:
                errors.append(agg.fedit_error(adapters, w))
            if k in existing and self.cfg.server_lr != 1.0:
                # start + lr x (average - start) is a weighted average with the start weighted 1 - lr
                w = [self.cfg.server_lr * x / sum(w) for x in w] + [1.0 - self.cfg.server_lr]
                adapters, slots = adapters + [existing[k]], slots + [self.cluster_slots[k]]
            if self.cfg.intra == "exact":
                self.cluster_adapters[k] = agg.exact_average(adapters, w)
            else:
                self.cluster_adapters[k] = agg.average(adapters, w)
            self.cluster_slots[k] = _weighted_mean(slots, w)
        report.fedit_error = float(np.mean(errors)) if errors else 0.0
        self._stack(report)

    def _features(self, cids: list[int]) -> np.ndarray:
        """What the clients are clustered by, one row each: their task embeddings, or points with
        the inner products of their first rounds' UNet changes (`agg.gram_points`)."""
        if self.cfg.cluster_by == "embedding":
            return self._profiles(cids)[0]
        return agg.gram_points(agg.gram([self.changes[c] for c in cids])).numpy()

    def _similarity(self, cids: list[int]) -> np.ndarray:
        """By updates, between the clients' first rounds' UNet changes: noise-corrected cosines of
        their profiling passes and repeats (`clustering.reference_similarity`) when every one sent a
        repeat, else raw cosines. Never centred: an update's direction means the same whoever else is
        in the federation."""
        if all(c in self.repeats for c in cids):
            return reference_similarity(agg.gram([self.changes[c] for c in cids] + [self.repeats[c] for c in cids]).numpy())
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
        fresh = max([*self.assignment.values(), *self.centroids]) + 1
        if self.cfg.cluster_by == "embedding":
            shares = {k: n / len(self.assignment) for k, n in Counter(self.assignment.values()).items()}
            placed = place([self.profiles[c] for c in first], self.centroids, shares, join_threshold(self.cfg), fresh)
        else:
            known = sorted(self.assignment)
            labels = np.array([self.assignment[c] for c in known])
            placed = join_similarity(self._similarity(known + first), labels, join_threshold(self.cfg), fresh)
        for c, (k, similarity) in zip(first, placed, strict=True):
            self.assignment[c], report.placed[c] = k, similarity

    def _profiles(self, cids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([self.profiles[c] for c in cids]), np.array([self.profile_examples[c] for c in cids])

    def _refresh_clusters(self) -> None:
        """Every cluster's centroid (the example-weighted mean profile of its members); a cluster
        that re-clustering left without members is dropped with its adapter and slot."""
        known = sorted(self.assignment)
        emb, counts = self._profiles(known)
        self.centroids = centroids(emb, np.array([self.assignment[c] for c in known]), counts)
        for k in set(self.cluster_adapters) - set(self.centroids):
            del self.cluster_adapters[k], self.cluster_slots[k]

    def _shares(self) -> dict[int, float]:
        """Each cluster's share of the clients assigned to clusters that have an adapter."""
        ks = sorted(self.cluster_adapters)
        members = Counter(self.assignment.values())
        total = sum(members[k] for k in ks)
        return {k: members[k] / total for k in ks}

    def _stack(self, report: RoundReport) -> None:
        """The global adapter: every cluster's adapter stacked with its DED/SNT coefficient."""
        ks = sorted(self.cluster_adapters)
        shares = self._shares()
        d = agg.ded({k: torch.from_numpy(self.centroids[k]) for k in ks}, shares) if self.cfg.use_ded else None
        s = agg.snt(self.cluster_adapters, dict.fromkeys(ks, self.scale)) if self.cfg.use_snt else None
        coeffs = agg.stacking_coefficients(shares, d, s, self.cfg.tau)
        self.global_adapter = agg.stack(
            [self.cluster_adapters[k] for k in ks], [self.scale] * len(ks), [coeffs[k] for k in ks], self.cfg.max_rank or None
        )
        self.global_scale = 1.0
        report.ded = d or {}
        report.coefficients = {
            k: float(np.mean(list(c.values()))) if isinstance(c, dict) else float(c) for k, c in coeffs.items()
        }

    # persistence -------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (for safetensors) and JSON-able metadata that `restore` turns back into this state."""
        tensors: dict[str, torch.Tensor] = {}
        for k, ad in self.cluster_adapters.items():
            tensors |= {f"cluster.{k}.{name}": t for name, t in ad.items()}
        for k, slot in self.cluster_slots.items():
            tensors[f"slot.{k}"] = slot
        for c, (ad, slot) in self.own.items():
            tensors |= {f"own.{c}.{name}": t for name, t in ad.items()}
            tensors[f"ownslot.{c}"] = slot
        if self.global_adapter is not None:
            tensors |= {f"global.{name}": t for name, t in self.global_adapter.items()}
        if self.profiles:
            # float32, as uploaded (profiles are float64 copies of float32 embeddings: nothing is lost)
            tensors["profiles"] = torch.from_numpy(np.stack([self.profiles[c] for c in sorted(self.profiles)])).float()
        for c, ad in self.changes.items():
            tensors |= {f"change.{c}.{name}": t for name, t in ad.items()}
        for c, ad in self.repeats.items():
            tensors |= {f"repeat.{c}.{name}": t for name, t in ad.items()}
        meta = {
            "assignment": {str(c): k for c, k in self.assignment.items()},
            "profile_examples": {str(c): n for c, n in sorted(self.profile_examples.items())},
            "centroids": {str(k): v.tolist() for k, v in self.centroids.items()},
            "global_scale": self.global_scale,
        }
        return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, meta  # clones: no shared storage

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.assignment = {int(c): int(k) for c, k in meta["assignment"].items()}
        self.centroids = {int(k): np.array(v) for k, v in meta["centroids"].items()}
        self.global_scale = meta["global_scale"]
        self.profile_examples = {int(c): float(n) for c, n in meta.get("profile_examples", {}).items()}
        rows = tensors["profiles"].double().numpy() if "profiles" in tensors else np.zeros((0, 0))
        self.profiles = dict(zip(sorted(self.profile_examples), rows, strict=True))
        self.cluster_adapters, self.cluster_slots, self.own, self.global_adapter = {}, {}, {}, None
        self.changes, self.repeats = {}, {}
        own_slots: dict[int, torch.Tensor] = {}
        own: dict[int, Adapter] = {}
        for key, t in tensors.items():
            if key == "profiles":
                continue
            kind, rest = key.split(".", 1)
            if kind == "cluster":
                k, name = rest.split(".", 1)
                self.cluster_adapters.setdefault(int(k), {})[name] = t
            elif kind == "slot":
                self.cluster_slots[int(rest)] = t
            elif kind == "own":
                c, name = rest.split(".", 1)
                own.setdefault(int(c), {})[name] = t
            elif kind == "ownslot":
                own_slots[int(rest)] = t
            elif kind in ("change", "repeat"):
                c, name = rest.split(".", 1)
                (self.changes if kind == "change" else self.repeats).setdefault(int(c), {})[name] = t
            elif kind == "global":
                self.global_adapter = self.global_adapter or {}
                self.global_adapter[rest] = t
        self.own = {c: (ad, own_slots[c]) for c, ad in own.items()}
        if self.cfg.strategy == "cluster" and self.cfg.cluster_by == "update" and set(self.profiles) - set(self.changes):
            raise UserError(
                "this run's state holds no first updates to cluster by: it was clustered by task embeddings "
                '(fedaigc before 2026-11-24). Set federation.cluster_by = "embedding" to go on with it, or start a new run'
            )
        any_adapter = next(iter(self.cluster_adapters.values()), None) or next((a for a, _ in self.own.values()), None)
        if any_adapter is not None:
            self.reference = {k: torch.zeros_like(v) for k, v in any_adapter.items()}


def _weighted_mean(vectors: list[torch.Tensor], weights) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    return (torch.stack([v.double() for v in vectors]) * w[:, None]).sum(0).to(vectors[0].dtype)
