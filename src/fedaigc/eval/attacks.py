"""Attribute inference by a curious server: guess each client's style from what it uploads.

Pure functions on feature matrices (one row per client); the experiment (experiments/privacy.py)
decides what a row is (a task embedding, a token slot, a flattened LoRA update, the mean of the
text-encoder states of a client's inference requests). The attacker holds the public base model,
the list of candidate styles and images of each style of its own, never a client's data or key:

- `invert`: nearest candidate. Each row is compared (cosine) with what the public model makes of
  each candidate style word; with a `reference` (the public starting point, e.g. the slot's
  initial word) both sides are taken relative to it. `vocabulary_rank` does the same against the
  whole vocabulary and says how far down the true word comes.
- `probe`: a classifier trained on *shadow* rows that the attacker makes itself: shadow clients
  trained with the public model on its own images of each style, as a client would.
- `match_geometry`: rotation-invariant. Clusters the victims, then finds the assignment of
  clusters to styles whose matrix of inner products between cluster means best matches that of
  the shadow style means (exact search over assignments). A secret orthogonal transform of all
  uploads changes no inner product, so it does not stop this attack.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from fedaigc.server.clustering import cluster, normalize


def accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])) if truth else float("nan")


def chance(truth: Sequence[str]) -> float:
    """The accuracy of always guessing the most common style (0.25 for four balanced styles)."""
    return Counter(truth).most_common(1)[0][1] / len(truth) if truth else float("nan")


def invert(rows: np.ndarray, candidates: dict[str, np.ndarray], reference: np.ndarray | None = None) -> list[str]:
    """The candidate nearest (cosine) to each row, both relative to `reference` if given."""
    names = sorted(candidates)
    ref = 0 if reference is None else reference
    c = normalize(np.stack([candidates[n] for n in names]) - ref)
    sims = normalize(np.asarray(rows, dtype=np.float64) - ref) @ c.T
    return [names[i] for i in sims.argmax(1)]


def vocabulary_rank(rows: np.ndarray, vocabulary: np.ndarray, targets: Sequence[int], reference: np.ndarray) -> list[int]:
    """Nearest-vocabulary inversion over the whole vocabulary: the rank (1 = nearest, cosine, both
    relative to `reference`) of each row's true token among all `vocabulary` rows."""
    v = normalize(np.asarray(vocabulary, dtype=np.float64) - reference)
    sims = normalize(np.asarray(rows, dtype=np.float64) - reference) @ v.T
    return [int((s > s[t]).sum()) + 1 for s, t in zip(sims, targets, strict=True)]


def _centred(x: np.ndarray) -> np.ndarray:
    """Rows minus their mean: what all clients share (the common start) says nothing about one."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0) if len(x) > 1 else x


def probe(shadow_rows: np.ndarray, shadow_styles: Sequence[str], rows: np.ndarray) -> list[str]:
    """A logistic-regression probe trained on the attacker's shadow rows, applied to the victims'.
    Each set is centred on its own mean and rows are L2-normalized, so the probe reads directions,
    not the magnitude that more or fewer training steps give."""
    model = make_pipeline(Normalizer(), LogisticRegression(C=10.0, max_iter=5000))
    model.fit(_centred(shadow_rows), list(shadow_styles))
    return [str(s) for s in model.predict(_centred(rows))]


def _gram(means: np.ndarray) -> np.ndarray:
    g = means @ means.T
    return g / max(np.linalg.norm(g), 1e-12)


def match_geometry(rows: np.ndarray, shadow_rows: np.ndarray, shadow_styles: Sequence[str]) -> list[str]:
    """Cluster the victims as the server does (into at most as many groups as styles), then give
    each group the style that makes the groups' Gram matrix (centred means, scale-free) closest in
    Frobenius norm to the shadow styles' own: only inner products are used, so any orthogonal
    transform of the victims' rows leaves the answer unchanged. Exact search over assignments
    (fine up to ~8 styles)."""
    styles = sorted(set(shadow_styles))
    distinct = len(np.unique(np.asarray(rows), axis=0))  # a server's state repeats a cluster's vector for each member
    labels = cluster(rows, k=min(len(styles), distinct)) if distinct > 1 else np.zeros(len(rows), dtype=int)
    rows, shadow = _centred(rows), _centred(shadow_rows)
    groups = sorted(set(labels.tolist()))
    victim_gram = _gram(np.stack([rows[labels == g].mean(0) for g in groups]))
    means = {s: shadow[[t == s for t in shadow_styles]].mean(0) for s in styles}
    best = min(
        itertools.permutations(styles, len(groups)),
        key=lambda chosen: float(np.linalg.norm(victim_gram - _gram(np.stack([means[s] for s in chosen])))),
    )
    return [best[groups.index(g)] for g in labels.tolist()]
