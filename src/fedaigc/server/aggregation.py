"""Aggregation math on LoRA adapters (flat dicts `<layer>.lora_A.weight` / `<layer>.lora_B.weight`).

Pure functions, no Flower and no model. A layer's update is ΔW = s·B·A with s = alpha/rank; B is
(out, r) and A is (r, in) (conv LoRAs are flattened to that). Low-rank products are never formed:
norms and SVDs of B·A come from the small core R_B·R_Aᵀ after QR of B and Aᵀ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedaigc.protocol.lora import Adapter, flatten, unflatten

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def layers(adapter: Adapter) -> list[str]:
    return sorted(k[: -len(A_SUFFIX)] for k in adapter if k.endswith(A_SUFFIX))


def factors(adapter: Adapter, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a layer as 2-D float64 matrices (out, r) and (r, in)."""
    a, b = adapter[layer + A_SUFFIX], adapter[layer + B_SUFFIX]
    return b.reshape(b.shape[0], -1).double(), a.reshape(a.shape[0], -1).double()


def _put(out: Adapter, layer: str, b: torch.Tensor, a: torch.Tensor, like: Adapter) -> None:
    """Store 2-D factors back in the layout (and dtype) of `like`'s tensors, whatever the rank."""
    a_like, b_like = like[layer + A_SUFFIX], like[layer + B_SUFFIX]
    r = a.shape[0]
    out[layer + A_SUFFIX] = a.reshape(r, *a_like.shape[1:]).to(a_like.dtype).contiguous()
    out[layer + B_SUFFIX] = b.reshape(b.shape[0], r, *b_like.shape[2:]).to(b_like.dtype).contiguous()


def lowrank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of b @ a, computed from the (r x r) core after QR of b and aᵀ."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def lowrank_fro(b: torch.Tensor, a: torch.Tensor) -> float:
    """Frobenius norm of b @ a without forming it."""
    rb = torch.linalg.qr(b)[1]
    ra = torch.linalg.qr(a.T)[1]
    return torch.linalg.matrix_norm(rb @ ra.T).item()


def nuclear_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """Sum of the singular values of b @ a (the trace of its Σ), from the small core."""
    return lowrank_svd(b, a)[1].sum().item()


def nuclear_norms(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """`nuclear_norm` of each (b, a): one batched QR/SVD when the shapes agree (every cluster's
    adapter of a layer), which is most of SNT's cost saved in Python calls at many clusters."""
    if len({(b.shape, a.shape) for b, a in pairs}) > 1:
        return [nuclear_norm(b, a) for b, a in pairs]
    b, a = torch.stack([b for b, _ in pairs]), torch.stack([a for _, a in pairs])
    rb, ra = torch.linalg.qr(b)[1], torch.linalg.qr(a.mT)[1]
    return torch.linalg.svdvals(rb @ ra.mT).sum(-1).tolist()


def _normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("aggregation weights must have a positive sum")
    return [float(w) / total for w in weights]


def average(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """`fedit` / FedAvg: average A and B separately (the paper's intra-cluster rule)."""
    mean = RunningAverage()
    for ad, wi in zip(adapters, _normalized(weights), strict=True):
        mean.add(ad, wi)
    return mean.result()


def exact_average(adapters: Sequence[Adapter], weights: Sequence[float], rank: int | None = None) -> Adapter:
    """`exact`: average ΔW = Σ w_i B_i A_i and re-factor it to `rank` (default: the members')
    by a truncated SVD, split evenly as B = U√S, A = √S Vᵀ."""
    w = _normalized(weights)
    out: Adapter = {}
    for layer in layers(adapters[0]):
        fs = [factors(ad, layer) for ad in adapters]
        r = rank or fs[0][1].shape[0]
        u, s, vh = lowrank_svd(torch.cat([wi * b for wi, (b, _) in zip(w, fs, strict=True)], 1), torch.cat([a for _, a in fs], 0))
        root = s[:r].sqrt()
        b_new, a_new = u[:, :r] * root, root[:, None] * vh[:r]
        if b_new.shape[1] < r:  # fewer singular values than the rank: pad with zeros
            b_new = torch.nn.functional.pad(b_new, (0, r - b_new.shape[1]))
            a_new = torch.nn.functional.pad(a_new, (0, 0, 0, r - a_new.shape[0]))
        _put(out, layer, b_new, a_new, adapters[0])
    return out


def fedit_error(adapters: Sequence[Adapter], weights: Sequence[float]) -> float:
    """Mean over layers of ‖ΔW_fedit − ΔW_exact‖_F / ‖ΔW_exact‖_F: what averaging A and B
    separately loses against averaging the products."""
    w = _normalized(weights)
    mean = average(adapters, w)
    errs = []
    for layer in layers(adapters[0]):
        fs = [factors(ad, layer) for ad in adapters]
        bs = [wi * b for wi, (b, _) in zip(w, fs, strict=True)]
        exact_norm = lowrank_fro(torch.cat(bs, 1), torch.cat([a for _, a in fs], 0))
        if exact_norm == 0:
            continue
        bm, am = factors(mean, layer)
        diff = lowrank_fro(torch.cat([bm] + [-b for b in bs], 1), torch.cat([am] + [a for _, a in fs], 0))
        errs.append(diff / exact_norm)
    return float(sum(errs) / len(errs)) if errs else 0.0


def geometric_median(points: torch.Tensor, weights: Sequence[float], iters: int = 100, tol: float = 1e-8) -> torch.Tensor:
    """Weighted geometric median of row vectors by Weiszfeld's algorithm (robust to outliers)."""
    w = torch.tensor(_normalized(weights), dtype=points.dtype)
    z = (w[:, None] * points).sum(0)
    for _ in range(iters):
        d = torch.linalg.vector_norm(points - z, dim=1).clamp(min=1e-12)
        coef = w / d
        z_new = (coef[:, None] * points).sum(0) / coef.sum()
        if torch.linalg.vector_norm(z_new - z) <= tol * max(1.0, torch.linalg.vector_norm(z).item()):
            return z_new
        z = z_new
    return z


def geomed(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """FedGeoMed: the geometric median of whole client adapters (all tensors as one vector)."""
    return unflatten(geometric_median(torch.stack([flatten(a) for a in adapters]), weights), adapters[0])


def stack(
    adapters: Sequence[Adapter],
    scales: Sequence[float],
    coefficients: Sequence[float | dict[str, float]],
    max_rank: int | None = None,
) -> Adapter:
    """Exact stacking: B_G = [c_1 s_1 B_1 … c_K s_K B_K], A_G = [A_1; …; A_K], so that
    B_G A_G = Σ c_k ΔW_k with the global scale 1 (save it with alpha = rank). A coefficient is a
    number or a {layer: number} dict. `max_rank` truncates each layer by SVD (then not exact).
    This is peft's `add_weighted_adapter(combination_type="cat")` on plain tensors: the server
    holds no model to attach peft adapters to, and per-layer coefficients (SNT) need their own loop."""
    out: Adapter = {}
    for layer in layers(adapters[0]):
        bs, as_ = [], []
        for ad, s, c in zip(adapters, scales, coefficients, strict=True):
            b, a = factors(ad, layer)
            ck = c[layer] if isinstance(c, dict) else c
            bs.append(ck * s * b)
            as_.append(a)
        b_g, a_g = torch.cat(bs, 1), torch.cat(as_, 0)
        if max_rank is not None and b_g.shape[1] > max_rank:
            u, sv, vh = lowrank_svd(b_g, a_g)
            root = sv[:max_rank].sqrt()
            b_g, a_g = u[:, :max_rank] * root, root[:, None] * vh[:max_rank]
        _put(out, layer, b_g, a_g, adapters[0])
    return out


def delta(adapter: Adapter, scale: float, layer: str) -> torch.Tensor:
    """The full ΔW of one layer (for tests and small layers only)."""
    b, a = factors(adapter, layer)
    return scale * b @ a


def change(after: Adapter, start: Adapter | None, prefix: str = "unet.", dtype: torch.dtype = torch.float32) -> Adapter:
    """The low-rank factors of what training changed in the layers named `prefix...`:
    B A − B₀ A₀ = [B, −B₀] [A; A₀] (rank 2r) from a start, B A itself from the common start
    (its B is zero). In `dtype`: float32 for what the server keeps (the uploads' precision),
    float64 for a computation that uses them at once."""
    out: Adapter = {}
    for layer in layers(after):
        if not layer.startswith(prefix):
            continue
        b, a = factors(after, layer)
        if start is not None:
            b0, a0 = factors(start, layer)
            b, a = torch.cat([b, -b0], 1), torch.cat([a, a0], 0)
        out[layer + A_SUFFIX], out[layer + B_SUFFIX] = a.to(dtype), b.to(dtype)
    if not out:
        raise ValueError(f"change: the adapter has no LoRA layer named {prefix}...")
    return out


def layer_grams(changes: Sequence[Adapter]) -> torch.Tensor:
    """(layers, n, n): per layer, the inner products ⟨ΔW_i, ΔW_j⟩ (Frobenius) of low-rank changes,
    from the factors: ⟨B_i A_i, B_j A_j⟩ = Σ_rs (B_iᵀ B_j)_rs (A_i A_jᵀ)_rs, so no ΔW is formed.
    Ranks may differ between changes (zero-padded)."""
    names = layers(changes[0])
    out = torch.zeros(len(names), len(changes), len(changes), dtype=torch.float64)
    for k, layer in enumerate(names):
        fs = [factors(c, layer) for c in changes]
        r = max(b.shape[1] for b, _ in fs)
        b = torch.stack([torch.nn.functional.pad(b, (0, r - b.shape[1])) for b, _ in fs])  # (n, out, r)
        a = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])) for _, a in fs])  # (n, r, in)
        out[k] = (torch.einsum("nor,mos->nmrs", b, b) * torch.einsum("nri,msi->nmrs", a, a)).sum((2, 3))
    return out


def gram(changes: Sequence[Adapter]) -> torch.Tensor:
    """The inner products of low-rank changes summed over their layers (`layer_grams`)."""
    out = torch.zeros(len(changes), len(changes), dtype=torch.float64)
    for g in layer_grams(changes):
        out += g
    return out


def gram_points(g: torch.Tensor) -> torch.Tensor:
    """n points in Rⁿ whose inner products are `g` (rows of V·√Λ from its eigendecomposition): the
    changes' distances and angles, exactly, in n numbers each, for code that clusters vectors."""
    values, vectors = torch.linalg.eigh(g.double())
    return vectors * values.clamp(min=0).sqrt()


def ded(cluster_embeddings: dict[int, torch.Tensor], shares: dict[int, float]) -> dict[int, float]:
    """Domain Embedding Distance: 1 − cos(e_k, ē), ē the share-weighted centroid of the clusters'
    (normalized) domain embeddings."""
    e = {k: v / v.norm().clamp(min=1e-12) for k, v in cluster_embeddings.items()}
    centroid = sum(shares[k] * e[k] for k in e)
    centroid = centroid / centroid.norm().clamp(min=1e-12)
    return {k: 1.0 - float(e[k] @ centroid) for k in e}


def snt(cluster_adapters: dict[int, Adapter], scales: dict[int, float]) -> dict[int, dict[str, float]]:
    """SVD Normalized Trace per cluster and layer: ‖ΔW_k^l‖_* / mean_j ‖ΔW_j^l‖_*."""
    ks = sorted(cluster_adapters)
    out: dict[int, dict[str, float]] = {k: {} for k in ks}
    for layer in layers(cluster_adapters[ks[0]]):
        norms = nuclear_norms([factors(cluster_adapters[k], layer) for k in ks])
        tr = {k: scales[k] * n for k, n in zip(ks, norms, strict=True)}
        mean = sum(tr.values()) / len(tr)
        for k in ks:
            out[k][layer] = tr[k] / mean if mean > 0 else 1.0
    return out


def stacking_coefficients(
    shares: dict[int, float], ded_k: dict[int, float] | None, snt_kl: dict[int, dict[str, float]] | None, tau: float = 0.1
) -> dict[int, dict[str, float] | float]:
    """c_k^l = softmax_k(log π_k − DED_k/τ) / SNT_k^l. Without DED the softmax is π; without SNT
    the division is skipped (the ablations)."""
    ks = sorted(shares)
    logits = torch.tensor([math.log(max(shares[k], 1e-12)) - (ded_k[k] / tau if ded_k else 0.0) for k in ks], dtype=torch.float64)
    p = dict(zip(ks, logits.softmax(0).tolist(), strict=True))
    if snt_kl is None:
        return p
    return {k: {layer: p[k] / max(v, 1e-12) for layer, v in snt_kl[k].items()} for k in ks}


def request_coefficients(
    request: torch.Tensor, cluster_embeddings: dict[int, torch.Tensor], shares: dict[int, float], tau: float = 0.1
) -> dict[int, float]:
    """Per-request cluster weights for hybrid generation: softmax_k(log π_k − DED_k/τ) with the DED
    taken against the request's task embedding instead of the clusters' centroid. Both sides are
    centred on the share-weighted mean domain embedding first: every private-token slot starts
    from the same word, so raw cosines between clusters are all above 0.9 and would mix every style."""
    e = {k: v.double() / v.double().norm().clamp(min=1e-12) for k, v in cluster_embeddings.items()}
    centre = sum(shares[k] * e[k] for k in e)
    r = request.double() / request.double().norm().clamp(min=1e-12) - centre
    r = r / r.norm().clamp(min=1e-12)
    distance = {k: 1.0 - float(r @ ((e[k] - centre) / (e[k] - centre).norm().clamp(min=1e-12))) for k in e}
    return stacking_coefficients(shares, distance, None, tau)  # type: ignore[return-value]


def member_weights(num_examples: Sequence[int], embeddings: torch.Tensor, centroid: torch.Tensor) -> list[float]:
    """Intra-cluster weights ∝ examples × cosine similarity to the cluster centroid (clipped at 0;
    plain example counts if every similarity is 0)."""
    sims = torch.nn.functional.cosine_similarity(embeddings.double(), centroid.double()[None], dim=-1).clamp(min=0)
    w = [n * s for n, s in zip(num_examples, sims.tolist(), strict=True)]
    return w if sum(w) > 0 else [float(n) for n in num_examples]


def screen(updates: dict[str, Adapter], reference: Adapter, norm_factor: float = 100.0) -> tuple[list[str], dict[str, str]]:
    """Split updates into accepted ids and {id: reason} rejections: wrong keys or shapes, NaN/Inf,
    or an update norm (against `reference`, what the server sent) over `norm_factor` × the median."""
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for cid, ad in updates.items():
        if set(ad) != set(reference):
            rejected[cid] = "wrong tensor names"
        elif any(ad[k].shape != reference[k].shape for k in reference):
            bad = next(k for k in sorted(reference) if ad[k].shape != reference[k].shape)
            rejected[cid] = f"wrong shape of {bad}: {tuple(ad[bad].shape)}"
        elif not all(torch.isfinite(t).all() for t in ad.values()):
            rejected[cid] = "NaN or Inf values"
        else:
            norms[cid] = torch.linalg.vector_norm(flatten(ad) - flatten(reference)).item()
    if len(norms) >= 2:
        median = float(torch.tensor(list(norms.values())).median())
        for cid, n in norms.items():
            if median > 0 and n > norm_factor * median:
                rejected[cid] = f"update norm {n:.3g} > {norm_factor:g} x cluster median {median:.3g}"
    return [c for c in updates if c not in rejected], rejected


class RunningAverage:
    """`average` fed one adapter at a time: float64 running sums of every tensor (A and B
    separately) and of the weights. A server can consume uploads as they arrive and drop each
    one, holding one sum per cluster instead of every update (benchmarks/server_scale.py)."""

    def __init__(self) -> None:
        self.sums: Adapter = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0

    def add(self, adapter: Adapter, weight: float) -> None:
        if not self.sums:
            self.sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in adapter.items()}
            self.dtypes = {k: v.dtype for k, v in adapter.items()}
        w = float(weight)
        for k, s in self.sums.items():
            s.add_(adapter[k], alpha=w)  # cast to float64 on the fly: no temporary copy of the upload
        self.total += w

    def result(self) -> Adapter:
        """The weighted mean, in the dtypes of the first adapter added."""
        if not self.total > 0:
            raise ValueError("aggregation weights must have a positive sum")
        return {k: (s / self.total).to(self.dtypes[k]) for k, s in self.sums.items()}
