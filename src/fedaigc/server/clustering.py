"""Clustering clients by their uploaded task embeddings (cosine geometry), with cluster ids that
stay stable across rounds."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# Above this many clients the O(n^2) tree is built on a seeded subsample of this size only.
MAX_EXACT = 500


def cluster(
    embeddings: np.ndarray,
    k: int | None = None,
    max_k: int = 8,
    distance_threshold: float | None = None,
    min_silhouette: float = 0.1,
    center: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Labels 0..K-1 by average-linkage agglomerative clustering on cosine distance.

    `k` fixes the number of clusters; else `distance_threshold` cuts the tree at that cosine
    distance; else K is the silhouette-best in 2..max_k (1 when no split reaches `min_silhouette`).
    With `center`, the federation's mean embedding is subtracted first, so the clustering sees how
    clients differ rather than what they all share.

    Average linkage and the silhouette need all pairwise distances: O(n^2) time and memory. Up
    to `MAX_EXACT` clients that is what runs. Above it, the same method (same `k`, threshold or
    silhouette choice) runs on a `seed`ed subsample of `MAX_EXACT` clients, so the silhouette of
    each candidate K is a sampled one (what sklearn's `silhouette_score(sample_size=...)`
    estimates), and every client joins the subsample cluster with the nearest centroid (cosine):
    O(n) beyond a fixed cost. A cluster smaller than about n / MAX_EXACT clients may be missed
    (it joins its nearest neighbour); it would be too small to matter for a cluster's adapter.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if center and len(x) > 2:
        x = x - x.mean(0)  # drop what every client shares (the common starting slot or template)
    x = normalize(x)
    n = len(x)
    if n == 1 or k == 1:
        return np.zeros(n, dtype=int)
    if n > MAX_EXACT:
        sample = np.sort(np.random.default_rng(seed).choice(n, MAX_EXACT, replace=False))
        labels = cluster(x[sample], k, max_k, distance_threshold, min_silhouette, center=False)
        means = centroids(x[sample], labels)
        nearest = np.argmax(x @ np.stack([means[c] for c in sorted(means)]).T, axis=1)
        return np.unique(nearest, return_inverse=True)[1]  # labels 0..K-1 even if a centroid wins no one
    if k is not None:
        return AgglomerativeClustering(n_clusters=min(k, n), metric="cosine", linkage="average").fit_predict(x)
    if distance_threshold is not None:
        model = AgglomerativeClustering(
            n_clusters=None, distance_threshold=distance_threshold, metric="cosine", linkage="average"
        )
        return model.fit_predict(x)
    best, best_score = np.zeros(n, dtype=int), min_silhouette
    for kk in range(2, min(max_k, n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=kk, metric="cosine", linkage="average").fit_predict(x)
        s = silhouette_score(x, labels, metric="cosine")
        if s > best_score:
            best, best_score = labels, s
    return best


def reference_similarity(gram: np.ndarray) -> np.ndarray:
    """Noise-corrected cosines between n clients from the 2n x 2n Gram matrix of two profiling passes
    per client (rows 0..n-1 the first passes, n..2n-1 the second, same start, independent noise).

    With pass = m_i + noise, the mean of a client's two passes P_i gives E⟨P_i, P_j⟩ = ⟨m_i, m_j⟩ and
    its two passes E⟨A_i, B_i⟩ = ‖m_i‖²: so ρ_ij = ⟨P_i, P_j⟩ / √(⟨A_i, B_i⟩⟨A_j, B_j⟩) estimates the
    cosine between what the two clients' data teach, with the training noise taken out, on a scale
    where a client's agreement with itself is 1 (Spearman's correction for attenuation). A raw cosine's
    scale moves with how noisy a data set's updates are; this one does not. Clipped to [-1, 1]; a
    client whose two passes do not agree at all (⟨A_i, B_i⟩ <= 0) has no reproducible direction and
    gets -1 to everyone (a cluster of its own)."""
    g = np.asarray(gram, dtype=np.float64)
    n = len(g) // 2
    if g.shape != (2 * n, 2 * n):
        raise ValueError(f"reference_similarity: expected the Gram matrix of two passes per client, got shape {g.shape}")
    a, ab, b = g[:n, :n], g[:n, n:], g[n:, n:]
    mean = (a + b + ab + ab.T) / 4  # Gram of the clients' mean passes
    signal = np.diag(ab)
    rho = np.full((n, n), -1.0)
    ok = signal > 0
    rho[np.ix_(ok, ok)] = mean[np.ix_(ok, ok)] / np.sqrt(np.outer(signal[ok], signal[ok]))
    np.fill_diagonal(rho, 1.0)
    return np.clip(rho, -1.0, 1.0)


def cluster_similarity(similarity: np.ndarray, threshold: float | None = None, k: int | None = None) -> np.ndarray:
    """Labels 0..K-1 by average linkage on a precomputed similarity: `k` clusters, or clusters merge
    while the mean similarity between their members reaches `threshold`."""
    s = np.asarray(similarity, dtype=np.float64)
    if len(s) == 1 or k == 1:
        return np.zeros(len(s), dtype=int)
    cut = {"n_clusters": min(k, len(s))} if k is not None else {"n_clusters": None, "distance_threshold": 1.0 - threshold}
    return AgglomerativeClustering(metric="precomputed", linkage="average", **cut).fit_predict(1.0 - s)


def join(newcomers: np.ndarray, members: np.ndarray, labels: np.ndarray, threshold: float, fresh: int) -> list[tuple[int, float]]:
    """`join_similarity` on raw cosines between the members' and the newcomers' vectors."""
    x = normalize(np.concatenate([np.asarray(members, dtype=np.float64), np.asarray(newcomers, dtype=np.float64)]))
    return join_similarity(x @ x.T, labels, threshold, fresh)


def join_similarity(similarity: np.ndarray, labels: np.ndarray, threshold: float, fresh: int) -> list[tuple[int, float]]:
    """Newcomers' clusters by `cluster`'s own rule, average linkage, without moving anyone else:
    `similarity` is over the n clustered clients (`labels`) then the newcomers. One after the other,
    a newcomer joins the cluster whose members it is most similar to on average if that mean is at
    least `threshold` (the similarity at which the clustering would merge it), else it starts a new
    cluster (ids from `fresh` on), and later newcomers count it as a member. The mean of cosines, not
    the cosine to the centroid: that one is the mean divided by the centroid's length (< 1), so it
    grows with how spread a cluster is and lets in newcomers that the clustering would have kept
    apart. Returns (cluster id, mean similarity to the most similar cluster) per newcomer."""
    s = np.asarray(similarity, dtype=np.float64)
    groups = {int(k): list(np.flatnonzero(labels == k)) for k in np.unique(labels)}
    out = []
    for v in range(len(labels), len(s)):
        mean = {k: float(np.mean(s[v, m])) for k, m in groups.items()}
        nearest = max(mean, key=mean.get)
        best = mean[nearest]
        if best < threshold:
            nearest, fresh = fresh, fresh + 1
        groups.setdefault(nearest, []).append(v)
        out.append((nearest, best))
    return out


def place(
    embeddings: list[np.ndarray],
    centres: dict[int, np.ndarray],
    shares: dict[int, float],
    threshold: float,
    fresh: int,
) -> list[tuple[int, float]]:
    """Newcomers' clusters, one after the other, without moving anyone else: the cluster whose
    centroid is most similar, if the cosine is at least `threshold`, else a new cluster (ids from
    `fresh` on) whose centroid is the newcomer's, so a later newcomer like it joins it. Cosines are
    taken after subtracting the share-weighted mean of the existing centroids (what every profile
    shares, as in `cluster`'s centring): raw cosines between private-token slots all exceed 0.9.
    With one existing cluster that mean is its centroid, so every newcomer gets a new cluster.
    (Clustering by task embeddings; by updates, newcomers `join` by average linkage.) Returns
    (cluster id, cosine to the nearest centroid) per newcomer."""
    centres = {k: normalize(np.asarray(v, dtype=np.float64)) for k, v in centres.items()}
    mean = sum(shares.get(k, 0.0) * v for k, v in centres.items())
    directions = {k: normalize(v - mean) for k, v in centres.items()}
    out = []
    for e in embeddings:
        d = normalize(normalize(np.asarray(e, dtype=np.float64)) - mean)
        nearest = max(directions, key=lambda k: float(directions[k] @ d))
        similarity = float(directions[nearest] @ d)
        if similarity < threshold:
            nearest, fresh = fresh, fresh + 1
            directions[nearest] = d
        out.append((nearest, similarity))
    return out


def centroids(embeddings: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Normalized (example-weighted) mean embedding of each cluster."""
    x = normalize(np.asarray(embeddings, dtype=np.float64))
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    return {int(c): normalize((x[labels == c] * w[labels == c, None]).sum(0)) for c in np.unique(labels)}


def match_ids(previous: dict[int, int], labels: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """Map a re-clustering's labels (client -> label) to the ids of the clusters before it
    (client -> id), so a cluster's adapter follows its members: one-to-one, maximizing the members
    each label shares with the id it takes (Hungarian). A label that shares no members with the id
    it would take gets a fresh id. Returns (label -> id, fresh id -> parent): a fresh cluster's
    parent is the old cluster most of its members come from (a split cluster's other half),
    absent when none of its members was in a cluster (all newcomers)."""
    new, old = sorted(set(labels.values())), sorted(set(previous.values()))
    shared = np.zeros((len(new), len(old)))
    for c, label in labels.items():
        if c in previous:
            shared[new.index(label), old.index(previous[c])] += 1
    rows, cols = linear_sum_assignment(shared, maximize=True) if old else ([], [])
    mapping = {new[r]: old[c] for r, c in zip(rows, cols, strict=True) if shared[r, c] > 0}
    fresh = max([*old, -1]) + 1
    parents = {}
    for r, label in enumerate(new):
        if label not in mapping:
            mapping[label], fresh = fresh, fresh + 1
            if shared[r].any():
                parents[mapping[label]] = old[int(shared[r].argmax())]
    return mapping, parents
