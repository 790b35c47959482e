"""The cell representation of the GAN families (``wgan``, ``gan3d``): y = log1p(E_cell / (norm_fraction E_inc)) /
y_scale, energy normalised by the incident energy and log-compressed, so that y = 0 is an empty cell and the
hottest training cell is y = 1. The class using it needs ``config.norm_fraction``, ``shape``, ``n_cells`` and a
``y_scale`` buffer.

A config with ``cell_power`` p > 0 (``wgan``, ``densewgan``, ``calogan``, ``gan3d``) uses the power law
y = (E_cell / (norm_fraction E_inc))^p / y_scale instead of the logarithm: y = 0 is still an empty cell and 1 the
hottest, but a relative change of a hot cell's energy is p times a relative change of y rather than y_scale (~10)
times an absolute one, so the generator's own noise in y moves the hot cells, and with them the total energy, less,
and a change of the total is a larger step in y for the critic to see."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class CellScale:
    """The compression of cell energies (in units of norm_fraction E_inc) itself: the logarithm, or the power law of
    ``config.cell_power`` where the config has one > 0. Shared by :class:`LogCells` and ``flatgan.FlatLogCells``."""

    def _cell_power(self) -> float:
        return float(getattr(self.config, "cell_power", 0.0))

    def compress(self, r: torch.Tensor) -> torch.Tensor:
        """Cell energies in units of norm_fraction E_inc -> y before the division by ``y_scale``."""
        p = self._cell_power()
        return r.clamp(min=0.0) ** p if p > 0 else torch.log1p(r)

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised y -> cell energies in units of norm_fraction E_inc (y = 0 maps to exactly 0)."""
        p = self._cell_power()
        if p > 0:
            return (y * self.y_scale).clamp(min=0.0) ** (1.0 / p)
        # exp - 1 rather than expm1: ONNX has no Expm1, and y = 0 still maps to exactly 0.
        return torch.exp(y * self.y_scale) - 1

    def scale_cells(self, y: torch.Tensor, log_factor: torch.Tensor) -> torch.Tensor:
        """Normalised y of cells whose energies are multiplied by exp(``log_factor``) (broadcast with y), computed in
        y so that empty cells keep finite gradients (under the power law (f r)^p = exp(p log f) r^p)."""
        p = self._cell_power()
        if p > 0:
            return y * torch.exp(p * log_factor)
        return torch.log1p((torch.exp(y * self.y_scale) - 1) * torch.exp(log_factor)) / self.y_scale


class LogCells(CellScale):
    """Mixin: showers (n, n_cells) MeV <-> normalised images (n, *shape)."""

    def _unit(self, energies: torch.Tensor) -> torch.Tensor:
        return (energies.float() * self.config.norm_fraction)[:, None, None, None]

    def to_image(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Showers (n, n_cells) MeV -> normalised images (n, *shape)."""
        x = showers.reshape(len(showers), *self.shape).float()
        return self.compress(x / self._unit(energies)) / self.y_scale

    def from_image(self, y: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Normalised images -> showers (n, n_cells) MeV."""
        return (self.expand(y) * self._unit(energies)).reshape(y.shape[0], self.n_cells)

    def cell_fractions(self, y: torch.Tensor) -> torch.Tensor:
        """Cell energies of normalised images as fractions of the incident energy."""
        return self.expand(y) * self.config.norm_fraction

    def fit_log_scale(self, data: Any) -> np.ndarray:
        """Set ``y_scale`` to the largest compressed training cell; returns each shower's total energy (MeV)."""
        hi, totals = 0.0, []
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        for i in range(0, len(energies), 1000):
            x = np.asarray(data.showers[i:i + 1000], dtype=np.float64)
            r = torch.as_tensor(x / (energies[i:i + 1000, None] * self.config.norm_fraction))
            hi = max(hi, float(self.compress(r).max()))
            totals.append(x.sum(axis=1))
        self.y_scale.fill_(max(hi, 1e-3))
        return np.concatenate(totals) if totals else np.zeros(0)
