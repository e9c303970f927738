"""What a client does to its task embedding and token slot before they leave the device.

Two optional defenses against a curious training server (`client.embedding_key`,
`client.embedding_epsilon`; both off by default):

- a keyed rotation: every client of a federation holds the same secret orthogonal matrix R (drawn
  from the key) and uploads R·v instead of v, for the task embedding *and* the token slot. Cosine
  similarities, the centring the clustering does and weighted means all commute with R, so the
  server clusters and averages exactly as before; clients apply Rᵀ to the slot the server returns.
  It hides the coordinates, not the geometry: the server still sees every inner product.
- the Gaussian mechanism: the round's change of the vector (clipped to `embedding_clip`) gets
  isotropic noise calibrated by the analytic Gaussian mechanism (Balle & Wang 2018) to
  (`embedding_epsilon`, `embedding_delta`) per round and upload, against any two updates (L2
  sensitivity 2·clip). Over R rounds the guarantees compose (`composed_epsilon`).

In the simulation the noise is drawn from the round's seeded generator so runs repeat; a device
must draw it from a secret source. The key travels in the config here; on devices it would be a
secret the server never sees (e.g. the node config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.stats import norm, ortho_group

from fedaigc.config import ClientConfig
from fedaigc.errors import UserError


def rotation(key: int, dim: int) -> torch.Tensor:
    """The secret orthogonal (dim, dim) matrix of `key`: Haar-random, the same on every device."""
    return torch.from_numpy(ortho_group.rvs(dim, random_state=np.random.default_rng(key)))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest noise std that makes x + N(0, σ²I) (ε, δ)-DP for L2 sensitivity Δ: the root
    of Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) = δ (Balle & Wang 2018, Thm. 8; exact for every ε,
    unlike the classic σ = Δ√(2 ln(1.25/δ))/ε, which needs ε < 1)."""
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise UserError(
            f"the Gaussian mechanism needs epsilon > 0, 0 < delta < 1, clip > 0 (got {epsilon}, {delta}, {sensitivity})"
        )

    def excess(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return float(norm.cdf(a - b) - math.exp(epsilon + norm.logcdf(-a - b)) - delta)

    return brentq(excess, 1e-9 * sensitivity, 1e9 * sensitivity)


def composed_epsilon(epsilon: float, delta: float, sigma: float, sensitivity: float, releases: int) -> tuple[float, float]:
    """(ε, δ) of `releases` Gaussian releases of (ε, δ) each with noise std σ: the better of basic
    composition (releases·ε, releases·δ) and zero-concentrated DP (each release is Δ²/2σ²-zCDP, they
    add up to ρ, and ρ-zCDP is (ρ + 2√(ρ ln 1/δ), δ)-DP: Bun & Steinke 2016), at δ_total = releases·δ."""
    rho = releases * sensitivity**2 / (2 * sigma**2)
    return min(releases * epsilon, rho + 2 * math.sqrt(rho * math.log(1 / delta))), releases * delta


def clip(vector: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`vector` scaled down to L2 norm `max_norm` if longer."""
    return vector * min(1.0, max_norm / max(float(vector.norm()), 1e-12))


@dataclass
class EmbeddingGuard:
    """One client's transform of what it uploads (`send`) and of the slot it gets back (`receive`)."""

    rotation: torch.Tensor | None = None  # (d, d) orthogonal, float64
    sigma: float = 0.0  # noise std per coordinate; 0 = no noise
    clip_norm: float = math.inf

    @classmethod
    def from_config(cls, cfg: ClientConfig, dim: int) -> EmbeddingGuard:
        sigma, clip_norm = 0.0, math.inf
        if cfg.embedding_epsilon > 0:
            clip_norm = cfg.embedding_clip
            sigma = analytic_gaussian_sigma(cfg.embedding_epsilon, cfg.embedding_delta, 2 * clip_norm)
        return cls(rotation(cfg.embedding_key, dim) if cfg.embedding_key else None, sigma, clip_norm)

    def rotate(self, vector: torch.Tensor) -> torch.Tensor:
        return vector if self.rotation is None else (self.rotation @ vector.double()).to(vector.dtype)

    def receive(self, vector: torch.Tensor) -> torch.Tensor:
        """A vector from the server back in the device's own coordinates (Rᵀ·v)."""
        return vector if self.rotation is None else (self.rotation.T @ vector.double()).to(vector.dtype)

    def privatize(self, vector: torch.Tensor, start: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """start + clip(vector − start) + noise (start: what the server already knows, e.g. the slot
        it sent; None: the vector itself is the release), in the device's coordinates."""
        if self.sigma == 0:
            return vector
        base = torch.zeros_like(vector) if start is None else start.to(vector.dtype)
        noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64) * self.sigma
        return (base + clip(vector - base, self.clip_norm) + noise).to(vector.dtype)

    def send(self, vector: torch.Tensor, start: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """What leaves the device: the privatized vector, rotated."""
        return self.rotate(self.privatize(vector, start, generator))
