"""Gaussianisation through the empirical CDF and the inverse normal CDF (and back), as in the RWTH talk.

Each variable's empirical CDF is stored as a quantile table: ``quantiles[d, k]`` is the value of variable d at
cumulative probability ``probs[k]`` (k = 0..K-1, the first and last at 0.5/N and 1 - 0.5/N: the sample's minimum and
maximum). The forward map interpolates the CDF linearly between the quantiles (a smoothed, strictly monotone CDF: the
talk's bijective "histogram transformation") and applies Phi^-1; the inverse applies Phi and interpolates back, so
every output lies inside the training range. Repeated values (a spike) share one quantile; the forward map sends
them to the middle of their probability step, and the inverse sends that step back onto the spike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

DEFAULT_KNOTS = 2001


@dataclass
class Gaussianiser:
    """Per-variable monotone maps to and from N(0, 1); ``quantiles`` (D, K) and ``probs`` (K,)."""

    quantiles: np.ndarray
    probs: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, knots: int = DEFAULT_KNOTS) -> Gaussianiser:
        """Quantile tables of the columns of x (N, D)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"Gaussianiser.fit: expected an (N >= 2, D) array, got shape {x.shape}")
        n = len(x)
        lo, hi = 0.5 / n, 1.0 - 0.5 / n
        probs = np.linspace(lo, hi, min(knots, n))
        # the quantile at probability p of the sorted sample, interpolating between order statistics
        q = np.quantile(x, np.clip((probs * n - 0.5) / (n - 1), 0.0, 1.0), axis=0, method="linear").T
        return cls(q, probs)

    @property
    def dim(self) -> int:
        return self.quantiles.shape[0]

    def _check(self, a: np.ndarray, what: str) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValueError(f"Gaussianiser.{what}: expected (N, {self.dim}) values, got shape {a.shape}")
        return a

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """Smoothed empirical CDF values in [probs[0], probs[-1]]."""
        x = self._check(x, "cdf")
        u = np.empty_like(x)
        for d in range(self.dim):
            q = self.quantiles[d]
            # np.interp needs increasing xp: a flat run of quantiles (a spike) gets the mean of its probabilities
            qu, inv = np.unique(q, return_inverse=True)
            pu = np.bincount(inv, weights=self.probs) / np.bincount(inv)
            u[:, d] = np.interp(x[:, d], qu, pu) if len(qu) > 1 else 0.5
        return u

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Values -> standard normal."""
        return ndtri(self.cdf(x))

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Standard normal -> values (inside the training range)."""
        z = self._check(z, "inverse")
        u = np.clip(ndtr(z), self.probs[0], self.probs[-1])
        out = np.empty_like(u)
        for d in range(self.dim):
            out[:, d] = np.interp(u[:, d], self.probs, self.quantiles[d])
        return out

    def tensors(self, prefix: str = "gauss") -> dict:
        """For safetensors: the quantile table and the probabilities."""
        import torch

        return {f"{prefix}.quantiles": torch.from_numpy(np.ascontiguousarray(self.quantiles)),
                f"{prefix}.probs": torch.from_numpy(np.ascontiguousarray(self.probs))}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "gauss") -> Gaussianiser:
        return cls(tensors[f"{prefix}.quantiles"].numpy().astype(np.float64),
                   tensors[f"{prefix}.probs"].numpy().astype(np.float64))
