"""Shared pieces of the GAN families on a detector's flat cell vector (``calogan``, ``densewgan``; frame "cells").

* :class:`FlatLogCells`: showers (n, n_cells) MeV <-> y = log1p(E_cell / (norm_fraction E_inc)) / y_scale, the
  representation of ``wgan`` and ``gan3d`` (energy normalised by the incident energy, log-compressed, y = 0 an empty
  cell, the hottest training cell y = 1), for a flat cell vector of any readout; and per-layer energy fractions.
* :func:`adversarial_step`: one critic update and, every ``n_critic`` steps, one generator update, with the WGAN-GP
  loss (gradient penalty on interpolates) or the non-saturating cross-entropy of the original GAN, in data-parallel
  training too (noise through the batch, gradients reduced over the shards).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caloforge.models.base import ModelError, TrainBatch
from caloforge.models.layerflow import _Coupling
from caloforge.models.logcells import CellScale


class FlatLogCells(CellScale):
    """Mixin for a :class:`ShowerModel` in frame "cells": needs ``config.norm_fraction``, ``config.latent_dim``,
    ``config.beta1/beta2``, ``n_cells``, ``detector``, and ``generate_y``, ``generator_parameters`` and
    ``critic_parameters``; call :meth:`init_flat_cells` in ``__init__``."""

    def init_flat_cells(self) -> None:
        offsets = self.detector.layer_offsets()
        onehot = torch.zeros(self.n_cells, len(offsets) - 1)
        for i in range(len(offsets) - 1):
            onehot[int(offsets[i]):int(offsets[i + 1]), i] = 1.0
        self.layer_offsets = [int(o) for o in offsets]
        self.register_buffer("y_scale", torch.tensor(1.0))
        self.register_buffer("layer_onehot", onehot, persistent=False)

    def _unit(self, energies: torch.Tensor) -> torch.Tensor:
        return (energies.float() * self.config.norm_fraction)[:, None]

    def to_y(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Showers (n, n_cells) MeV -> normalised cells (n, n_cells) (log or power law: logcells.CellScale)."""
        return self.compress(showers.float() / self._unit(energies)) / self.y_scale

    def from_y(self, y: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Normalised cells -> showers (n, n_cells) MeV (y = 0 stays 0)."""
        return self.expand(y) * self._unit(energies)

    def cell_fractions(self, y: torch.Tensor) -> torch.Tensor:
        """Cell energies as fractions of the incident energy."""
        return self.expand(y) * self.config.norm_fraction

    def layer_features(self, y: torch.Tensor, cf: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer log energy fractions of the incident energy and hit fractions (n, 2 L), roughly unit scale:
        the response and longitudinal profile that log-compressed cells hide from a critic.

        The hit fraction is a soft count: tanh(50 y) by default; with ``config.critic_hits_mev`` = T > 0 (and the
        condition features ``cf``, whose first is log E_inc) it is sigmoid(4 log(E_cell / T)), one half at T, so the
        critic counts the cells above the evaluation's threshold (a cell at a tenth of the largest is far above it
        at every energy, and tanh(50 y) of a cell at the threshold is about 0.1 with power-law cells)."""
        cell_frac = self.cell_fractions(y)
        frac = cell_frac @ self.layer_onehot
        threshold = getattr(self.config, "critic_hits_mev", 0.0)
        if threshold > 0 and cf is not None:
            log_e = cf[:, :1] * self.cond_std[0] + self.cond_mean[0]  # log E_inc (MeV)
            soft = torch.sigmoid(4.0 * (torch.log(cell_frac + 1e-30) + log_e - math.log(threshold)))
        else:
            soft = torch.tanh(50.0 * y)  # y >= 0
        hits = soft @ self.layer_onehot / self.layer_onehot.sum(0)
        return torch.cat([(torch.log(frac + 1e-6) + 7.0) / 3.0, hits], dim=1)

    def init_layer_energies(self) -> None:
        """Buffers of :meth:`with_layer_energies`: mean and spread of each layer's log(E_layer / E_inc + 1e-6) in the
        training data (set by :meth:`fit_layer_energies`)."""
        n_l = len(self.layer_offsets) - 1
        self.register_buffer("layer_log_mean", torch.zeros(n_l))
        self.register_buffer("layer_log_std", torch.ones(n_l))

    def init_response_features(self) -> None:
        """Buffers of :meth:`response_features`: mean and spread of log(E_layer / E_inc + 1e-6) per layer and of
        log(E_vis / E_inc + 1e-6) in the training data (set by :meth:`fit_layer_energies`)."""
        n_l = len(self.layer_offsets) - 1
        self.register_buffer("response_mean", torch.zeros(n_l + 1))
        self.register_buffer("response_std", torch.ones(n_l + 1))

    def _training_layer_fractions(self, data: Any) -> np.ndarray | None:
        """E_layer / E_inc of the training showers (n, L), read 1000 showers at a time (None without showers)."""
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        onehot = self.layer_onehot.double().numpy()
        parts = [np.asarray(data.showers[i:i + 1000], dtype=np.float64) @ onehot / energies[i:i + 1000, None]
                 for i in range(0, len(energies), 1000)]
        return np.concatenate(parts) if parts else None

    def _training_response_logs(self, data: Any) -> np.ndarray | None:
        """log(E_layer / E_inc + 1e-6) per layer and log(E_vis / E_inc + 1e-6) of the training showers (n, L + 1)."""
        frac = self._training_layer_fractions(data)
        if frac is None:
            return None
        return np.log(np.concatenate([frac, frac.sum(1, keepdims=True)], axis=1) + 1e-6)

    def fit_layer_energies(self, data: Any) -> None:
        """Set the statistics of the layer energies (``layer_log_mean``, ``layer_log_std``) and, where the model has
        them, of the response features (``response_mean``, ``response_std``) from the training showers."""
        logs = self._training_response_logs(data)
        if logs is None:
            return
        std = logs.std(0) if len(logs) > 1 else np.ones(logs.shape[1])
        mean, std = torch.as_tensor(logs.mean(0)), torch.as_tensor(np.where(std > 1e-3, std, 1e-3))
        if hasattr(self, "layer_log_mean"):
            self.layer_log_mean.copy_(mean[:-1].float())
            self.layer_log_std.copy_(std[:-1].float())
        if hasattr(self, "response_mean"):
            self.response_mean.copy_(mean.float())
            self.response_std.copy_(std.float())

    def response_distance(self, y_gen: torch.Tensor, y_real: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """Energy distance between the generated and the real batch in (standardised response, labels): the joint
        law of the layer energies and the total given the conditions, matched without a critic (config
        ``response_distance``; the batch's generated showers have the real showers' conditions).

        With generated layer energies (``layer_energies``) the generated response is the layer head's, for every
        layer: the head is then trained as a generator of the response in its own right, and its gradient does not
        reach the cells, where it would push their raw sizes (which the rescaling undoes) and could empty a layer
        for good (a layer whose cells are all zero stays empty, and the head cannot refill it)."""
        with torch.no_grad():
            real = torch.cat([self.response_features(y_real), cf], dim=1)
        logs = getattr(self, "generated_layer_logs", None)
        if logs is not None and logs.shape[0] == len(y_gen) and logs.requires_grad:
            f_gen = head_response(logs, self.response_mean, self.response_std)
        else:
            f_gen = self.response_features(y_gen)
        return energy_distance(torch.cat([f_gen, cf], dim=1), real)

    def response_score(self, logs_a: torch.Tensor, logs_b: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
        """Energy score of the layer head's response at each real shower's own conditions (config
        ``response_conditional``): ``logs_a`` and ``logs_b`` are two head samples, log(E_layer / E_inc) (n, L), for the
        conditions of the real showers ``y_real``. Unlike :meth:`response_distance` it constrains the spread at every
        condition, not only over the batch's mixture of energies."""
        with torch.no_grad():
            real = self.response_features(y_real)
        mean, std = self.response_mean, self.response_std
        return energy_score(head_response(logs_a, mean, std), head_response(logs_b, mean, std), real)

    def head_logs(self, t: torch.Tensor) -> torch.Tensor:
        """The layer head's standardised outputs t (n, L) -> log(E_layer / E_inc), at most 0."""
        return (t * self.layer_log_std + self.layer_log_mean).clamp(max=0.0)

    def init_shape_features(self) -> None:
        """Buffers of :meth:`shape_features`: each cell's (1, x, y, x^2, y^2) in its layer's columns (n_cells, 5 L), and
        the training mean and spread of the 4 L features (set by :meth:`fit_shape_features`)."""
        from caloforge.observables import as_geometry

        geom = as_geometry(self.detector)
        if geom.n_cells != self.n_cells:
            raise ValueError(f"shape_score needs the detector's flat cell vector ({geom.n_cells} cells), the model "
                             f"has {self.n_cells}")
        x, y = torch.as_tensor(geom.cell_x).float(), torch.as_tensor(geom.cell_y).float()
        cols = torch.stack([torch.ones_like(x), x, y, x * x, y * y], dim=1)  # (n_cells, 5)
        basis = (cols[:, :, None] * self.layer_onehot[:, None, :]).flatten(1)  # (n_cells, 5 L), column k L + l
        self.register_buffer("moment_basis", basis, persistent=False)
        n_l = len(self.layer_offsets) - 1
        self.register_buffer("shape_mean", torch.zeros(4 * n_l))
        self.register_buffer("shape_std", torch.ones(4 * n_l))

    def _raw_shape_features(self, frac: torch.Tensor) -> torch.Tensor:
        """Cell energies as fractions of E_inc (n, n_cells) -> per layer the centroids x, y and the widths x, y (mm)
        (n, 4 L); an empty layer has centroid 0 and width 0.1 mm."""
        m = frac @ self.moment_basis
        n_l = len(self.layer_offsets) - 1
        e = m[:, :n_l] + 1e-6
        cx, cy = m[:, n_l:2 * n_l] / e, m[:, 2 * n_l:3 * n_l] / e
        wx = (m[:, 3 * n_l:4 * n_l] / e - cx * cx).clamp(min=0.0).add(1e-2).sqrt()
        wy = (m[:, 4 * n_l:] / e - cy * cy).clamp(min=0.0).add(1e-2).sqrt()
        return torch.cat([cx, cy, wx, wy], dim=1)

    def shape_features(self, y: torch.Tensor) -> torch.Tensor:
        """Per layer the centroids and widths of normalised cells y, standardised by the training statistics, within
        +-10 (n, 4 L): the shape inside each layer that a classifier on high-level features reads."""
        return ((self._raw_shape_features(self.cell_fractions(y)) - self.shape_mean) / self.shape_std).clamp(-10, 10)

    def fit_shape_features(self, data: Any) -> None:
        """``shape_mean``, ``shape_std`` from the training showers (a constant feature, e.g. the y centroid of a
        layer one cell high, keeps spread 1)."""
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        feats = []
        with torch.no_grad():
            for i in range(0, len(energies), 1000):
                x = np.asarray(data.showers[i:i + 1000], dtype=np.float64) / energies[i:i + 1000, None]
                feats.append(self._raw_shape_features(torch.as_tensor(x, dtype=torch.float32)).double())
        if not feats:
            return
        f = torch.cat(feats)
        std = f.std(0) if len(f) > 1 else torch.ones(f.shape[1], dtype=torch.float64)
        self.shape_mean.copy_(f.mean(0).float())
        self.shape_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def shape_score(self, y_a: torch.Tensor, y_b: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
        """Energy score of the layers' centroids and widths (:meth:`shape_features`) of two generated samples per
        real shower, at its conditions (config ``shape_score``): the lateral shape matched shower by shower's
        conditions, where the critic leaves it too regular (centroids that scatter too little)."""
        with torch.no_grad():
            real = self.shape_features(y_real)
        return energy_score(self.shape_features(y_a), self.shape_features(y_b), real)

    def response_features(self, y: torch.Tensor) -> torch.Tensor:
        """Standardised log(E_layer / E_inc) per layer and log(E_vis / E_inc) of normalised cells (n, L + 1), within
        +-10 (the real side of :meth:`response_distance`)."""
        return standardised_response(self.cell_fractions(y) @ self.layer_onehot, self.response_mean, self.response_std)

    def with_layer_energies(self, y: torch.Tensor, t: torch.Tensor, frac: torch.Tensor | None = None) -> torch.Tensor:
        """Generated cells y (n, n_cells) rescaled layer by layer to the generated layer energies: t (n, L) are
        standardised log(E_layer / E_inc + 1e-6). The shower's response and longitudinal profile are then L
        numbers the generator sets directly, not sums of noisy cells; empty generated layers stay empty.

        The layer head's energies, log(E_layer / E_inc) (n, L), are kept in ``generated_layer_logs`` for
        :meth:`response_distance`."""
        if frac is None:  # the generated layer fractions of E_inc, unless the caller has them
            frac = self.cell_fractions(y) @ self.layer_onehot
        log_factor = layer_log_factors(frac, t, self.layer_log_mean, self.layer_log_std)
        self.generated_layer_logs = self.head_logs(t)
        return self.scale_cells(y, log_factor @ self.layer_onehot.T)

    # ---- layer energies from a flow trained by likelihood (config ``layer_flow``) ------------------------------
    def init_layer_flow(self) -> None:
        """``layer_flow``: the conditional flow of the layer energies, or None when the config has it off."""
        on = getattr(self.config, "layer_flow", False)
        self.layer_flow = ConditionalFlow(len(self.layer_offsets) - 1, self.n_cond_features) if on else None

    def flow_layer_energies(self, z: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """The flow's standardised log layer energies (n, L) for the first L noise numbers of each row; no gradient:
        the flow learns from the likelihood alone, never from the critic."""
        with torch.no_grad():
            return self.layer_flow.sample(z[:, :len(self.layer_offsets) - 1], cf)

    def with_flow_energies(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Generated cells y (n, n_cells) rescaled to the flow's layer energies t; a layer whose flow energy is below
        1e-6 of E_inc (where the training zeros sit, :func:`flow_targets`) comes out empty. Keeps the raw layer
        fractions in ``raw_layer_frac`` for :meth:`layer_flow_anchor_loss`."""
        self.raw_layer_frac = self.cell_fractions(y) @ self.layer_onehot
        y = self.with_layer_energies(y, t, self.raw_layer_frac)
        empty = self.generated_layer_logs < EMPTY_LAYER_LOG
        return y * ((~empty).to(y.dtype) @ self.layer_onehot.T)

    def fit_layer_flow(self, data: Any, steps: int, batch_size: int = 256, lr: float = 1e-3) -> None:
        """Fit the layer flow by maximum likelihood on all the training showers' layer energies for ``steps`` steps
        before the adversarial training starts (config ``layer_flow_fit_steps``), as the other preprocessing constants
        are fitted: the flow is small and cheap, and the GAN's own flow steps (one batch per training step, at the
        GAN's learning rate) leave it short of its optimum in a short run (measured on ``calogan``, BENCHMARKS.md).
        Seeded by torch's global generator (the trainer seeds it); call after :meth:`fit_layer_energies`."""
        if self.layer_flow is None or steps <= 0 or not len(data.conditions.energy):
            return
        frac = torch.as_tensor(self._training_layer_fractions(data), dtype=torch.float32)
        cf = self.condition_features(torch.as_tensor(data.conditions.as_array(), dtype=torch.float32))
        fit_flow(self.layer_flow, frac, cf, self.layer_log_mean, self.layer_log_std, steps, batch_size, lr)

    def layer_flow_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer],
                        grad_clip: float) -> dict[str, float]:
        """One likelihood step of the layer flow on the batch's real layer energies ({} without a flow)."""
        if self.layer_flow is None:
            return {}
        frac = batch.showers.float() @ self.layer_onehot / batch.energies.float()[:, None]
        return {"flow_nll": flow_step(self.layer_flow, frac, self.condition_features(batch.cond), batch,
                                      optimizers["flow"], self.layer_log_mean, self.layer_log_std, grad_clip)}

    def layer_flow_anchor_loss(self, like: torch.Tensor) -> torch.Tensor:
        """``layer_flow_anchor`` times :func:`anchor_loss` of the last generator pass (zero without a flow)."""
        weight = getattr(self.config, "layer_flow_anchor", 0.0)
        if self.layer_flow is None or weight <= 0:
            return like.new_zeros(())
        return weight * anchor_loss(self.raw_layer_frac, self.generated_layer_logs)

    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        return [((n, self.config.latent_dim), "normal")]

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        y = self.generate_y(noise[0], self.condition_features(cond))
        return self.from_y(y.clamp(max=1.0), cond[:, 0])

    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        """Adam for the generator and for the critic, with the config's betas; with ``layer_flow`` one more."""
        betas = (self.config.beta1, self.config.beta2)
        opts = {"generator": torch.optim.Adam(self.generator_parameters(), lr=lr, betas=betas),
                "critic": torch.optim.Adam(self.critic_parameters(), lr=lr, betas=betas)}
        if getattr(self, "layer_flow", None) is not None:  # the layer flow: its own Adam, default betas
            opts["flow"] = torch.optim.Adam(self.layer_flow.parameters(), lr=lr)
        return opts

    def fit_log_scale(self, data: Any) -> None:
        """``y_scale``: the largest compressed training cell."""
        hi = 0.0
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        for i in range(0, len(energies), 1000):
            x = np.asarray(data.showers[i:i + 1000], dtype=np.float64)
            r = torch.as_tensor(x / (energies[i:i + 1000, None] * self.config.norm_fraction))
            hi = max(hi, float(self.compress(r).max()))
        self.y_scale.fill_(max(hi, 1e-3))


class ConditionalFlow(nn.Module):
    """A small conditional normalising flow (affine couplings, alternating halves) for a GAN's layer energies: trained
    by maximum likelihood on the real showers' standardised log layer energies given the labels, so their spread at
    every condition is a fitted density, not what an adversarial game leaves it (config ``layer_flow``)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int = 64, blocks: int = 6, clamp: float = 3.0):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(_Coupling(dim, cond_dim, hidden, 2, clamp) for _ in range(blocks))

    def latent(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows x (n, dim) given condition features c (n, cond_dim) -> their latent z and log |det dz/dx|."""
        logdet = x.new_zeros(len(x))
        for i, block in enumerate(self.blocks):
            if i % 2:
                x = x.flip(1)
            x, ld = block(x, c)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Log density of rows x (n, dim) given condition features c (n, cond_dim)."""
        z, logdet = self.latent(x, c)
        return -0.5 * (z * z).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def sample(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Normal noise z (n, dim) -> rows of the fitted law given c."""
        for i in reversed(range(len(self.blocks))):
            z = self.blocks[i].inverse(z, c)
            if i % 2:
                z = z.flip(1)
        return z


#: the offset in the layer energies' logs, log(E_layer / E_inc + offset), of the GAN families' response statistics
LAYER_LOG_OFFSET = 1e-6
#: log(E_layer / E_inc) below which a generated layer is empty (the offset of the response statistics).
EMPTY_LAYER_LOG = math.log(LAYER_LOG_OFFSET)


def flow_targets(frac: torch.Tensor, u: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Real layer energies as fractions of E_inc (n, L) -> a layer flow's training rows: standardised
    log(f + 1e-6); an empty layer is spread uniformly in log below 1e-6 of E_inc with the uniform noise ``u`` (n, L)
    (a point mass has no density), where the generated layer counts as empty (:data:`EMPTY_LAYER_LOG`)."""
    logs = torch.where(frac > 0, torch.log(frac + LAYER_LOG_OFFSET), EMPTY_LAYER_LOG + torch.log(0.02 + 0.98 * u))
    return (logs - mean) / std


def fit_flow(flow: ConditionalFlow, frac: torch.Tensor, cf: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             steps: int, batch_size: int = 256, lr: float = 1e-3, generator: torch.Generator | None = None,
             progress: bool = False, lr_final: float | None = None) -> float:
    """Fit a layer flow by maximum likelihood on real layer energies ``frac`` (n, L; fractions of E_inc) given the
    condition features ``cf``: ``steps`` Adam steps on random batches (:func:`flow_targets`), seeded by
    ``generator`` (torch's global one when None), with a progress bar if asked; with ``lr_final`` the learning
    rate falls from ``lr`` to it on a cosine over the steps. Returns the mean negative log-likelihood of the last
    100 steps."""
    from tqdm import tqdm

    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    n, last = len(frac), []
    for step in tqdm(range(steps), desc="layer flow", unit="step", disable=not progress):
        if lr_final is not None:
            opt.param_groups[0]["lr"] = lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        rows = flow_targets(frac[idx], torch.rand(len(idx), frac.shape[1], generator=generator), mean, std)
        nll = -flow.log_prob(rows, cf[idx]).mean()
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        last = (last + [float(nll.detach())])[-100:]
    return float(np.mean(last)) if last else float("nan")


def anchor_loss(raw_frac: torch.Tensor, target_logs: torch.Tensor) -> torch.Tensor:
    """Mean squared log gap between a generator's raw layer energies (n, L; fractions of E_inc, before the rescaling
    to the layer flow's energies) and the flow's, over the layers the flow fills. The rescaling makes the raw scale
    free, and a layer whose raw cells drift to zero stays empty for good (ReLU cells get no gradient): the anchor
    keeps the raw scale near the target (config ``layer_flow_anchor``)."""
    full = target_logs.detach() >= EMPTY_LAYER_LOG
    gap = torch.log(raw_frac + 1e-7) - target_logs.detach()
    return (gap * gap * full).sum() / full.sum().clamp(min=1)


def flow_step(flow: ConditionalFlow, frac: torch.Tensor, cf: torch.Tensor, batch: TrainBatch,
              optimizer: torch.optim.Optimizer, mean: torch.Tensor, std: torch.Tensor, grad_clip: float) -> float:
    """One maximum-likelihood step of a layer flow on the real layer energies ``frac`` (n, L; fractions of E_inc)
    given the condition features; returns the negative log-likelihood."""
    rows = flow_targets(frac, batch.rand(frac.shape[1]), mean, std)
    nll = -flow.log_prob(rows, cf).mean()
    _step(optimizer, nll, list(flow.parameters()), batch.share, grad_clip)
    return float(nll.detach())


def check_layer_options(cfg: Any, family: str, n_layers: int) -> None:
    """The layer-energy options that need others: ``response_conditional`` scores the layer head's samples (it needs
    ``layer_energies`` and a weight); ``layer_flow`` replaces the head (it needs ``layer_energies``, no response
    term, which could not train the flow, and a noise vector at least as long as the layers)."""
    if getattr(cfg, "response_conditional", False) and not (cfg.layer_energies and cfg.response_distance > 0):
        raise ModelError(f"{family} config: response_conditional = true scores the layer head's response and needs "
                         f"layer_energies = true and response_distance > 0 (got layer_energies = "
                         f"{cfg.layer_energies}, response_distance = {cfg.response_distance})")
    if getattr(cfg, "layer_flow", False) and not (cfg.layer_energies and cfg.response_distance == 0
                                                  and cfg.latent_dim >= n_layers):
        raise ModelError(f"{family} config: layer_flow = true needs layer_energies = true, response_distance = 0 "
                         f"(the flow is trained by likelihood alone) and latent_dim >= {n_layers} (the layers)")


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Energy distance 2 E|a - b| - E|a - a'| - E|b - b'| between the rows of a (n, d) and b (m, d) (Szekely): zero
    exactly when the two distributions are equal, a smooth loss with no critic, and unbiased (pairs i = j left out)."""
    def mean_dist(u: torch.Tensor, v: torch.Tensor, same: bool) -> torch.Tensor:
        d = ((u[:, None, :] - v[None, :, :]).pow(2).sum(-1) + 1e-12).sqrt()
        if not same:
            return d.mean()
        n = len(u)
        return (d.sum() - d.diagonal().sum()) / max(n * (n - 1), 1)

    return 2 * mean_dist(a, b, False) - mean_dist(a, a, True) - mean_dist(b, b, True)


def energy_score(gen_a: torch.Tensor, gen_b: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean energy score (|a - x| + |b - x|) / 2 - |a - b| / 2 of rows x of ``real`` (n, d), each with two generated
    rows a, b (n, d) drawn at that row's own conditions (Gneiting and Raftery 2007). A strictly proper scoring rule:
    its expectation is smallest only when the generated law equals the real one at every condition, so a batch of
    mixed energies constrains each energy's spread (the batch's energy distance sees only the mixture)."""
    def dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ((u - v).pow(2).sum(-1) + 1e-12).sqrt()

    return (0.5 * (dist(gen_a, real) + dist(gen_b, real)) - 0.5 * dist(gen_a, gen_b)).mean()


def standardised_response(frac: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Layer fractions of E_inc (n, L) -> log(f + 1e-6) of each layer and of their sum, standardised by the training
    ``mean`` and ``std`` (L + 1) and kept within +-10: the response features of every GAN family."""
    logs = torch.log(torch.cat([frac, frac.sum(1, keepdim=True)], dim=1) + 1e-6)
    return ((logs - mean) / std).clamp(-10.0, 10.0)


def head_response(logs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A layer head's log(E_layer / E_inc) (n, L) -> the response features, as of real showers."""
    return standardised_response(torch.exp(logs), mean, std)


def layer_energy_head(n_in: int, n_layers: int) -> nn.Sequential:
    """The small network that generates each layer's standardised log energy from noise and labels (``calogan`` and
    ``wgan`` with ``layer_energies``); zero output bias: the training means."""
    head = nn.Sequential(nn.Linear(n_in, 128), nn.LeakyReLU(0.2), nn.Linear(128, n_layers))
    nn.init.zeros_(head[-1].bias)
    return head


def layer_log_factors(frac: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log of the factors (n, L) that take generated layer fractions ``frac`` (of E_inc) to the generated layer
    energies: ``t`` standardised log(E_layer / E_inc) (= t std + mean, at most 0; the 1e-6 offset of the training
    statistics is not undone). In logs and within +-30 so that neither the factor nor its gradient is ever 0 or
    infinite (f^p of the power-law cells has an infinite derivative at f = 0). The fractions enter without their
    gradient: the generator sets a layer's energy through ``t`` and its shape through the cells, and a nearly empty
    generated layer cannot send 1 / frac^2 gradients. Empty layers stay empty (log factor 0)."""
    f = frac.detach()
    log_factor = (t * std + mean).clamp(max=0.0) - torch.log(f.clamp(min=1e-12))
    return torch.where(f > 0, log_factor.clamp(-30.0, 30.0), torch.zeros_like(f))


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, share: float, grad_clip: float) -> None:
    from caloforge.distributed import reduce_gradients

    opt.zero_grad(set_to_none=True)
    loss.backward()
    reduce_gradients(params, share)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def adversarial_step(model: Any, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                     generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     generator_extra: Callable[[torch.Tensor, TrainBatch], torch.Tensor] | None = None,
                     grad_clip: float = 0.0) -> dict[str, float]:
    """One critic update on (real, generated) normalised cells; a generator update every ``config.n_critic`` steps.

    ``generate(z, cf)`` and ``critic(y, cf)`` are the networks; ``generator_extra(y_gen, batch)`` an extra generator
    loss (e.g. energy conservation). ``config.loss``: "wgan-gp" (critic loss -W + gp_lambda * GP) or "gan"
    (non-saturating binary cross-entropy with one-sided label smoothing ``config.label_smoothing``).
    """
    from caloforge.distributed import weighted_sum

    cfg = model.config
    cf = model.condition_features(batch.cond)
    y_real = model.to_y(batch.showers, batch.energies)
    with torch.no_grad():
        y_fake = generate(batch.randn(cfg.latent_dim), cf)
    d_real, d_fake = critic(y_real, cf), critic(y_fake, cf)
    if cfg.loss == "wgan-gp":
        eps = batch.rand(1)
        y_hat = (eps * y_real + (1 - eps) * y_fake).requires_grad_(True)
        grad, = torch.autograd.grad(critic(y_hat, cf).sum(), y_hat, create_graph=True)
        gp = ((grad.norm(dim=1) - 1) ** 2).mean()
        w_dist = d_real.mean() - d_fake.mean()
        loss_c = -w_dist + cfg.gp_lambda * gp
        out = {"critic": float(loss_c.detach()), "w": float(w_dist.detach()), "gp": float(gp.detach())}
    else:
        real_label = torch.full_like(d_real, 1.0 - cfg.label_smoothing)
        loss_c = (F.binary_cross_entropy_with_logits(d_real, real_label)
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        out = {"critic": float(loss_c.detach())}
    if not torch.isfinite(weighted_sum(loss_c.detach(), batch.share)):
        return out
    _step(optimizers["critic"], loss_c, list(model.critic_parameters()), batch.share, grad_clip)
    if (step + 1) % cfg.n_critic == 0:
        y_gen = generate(batch.randn(cfg.latent_dim), cf)
        d_gen = critic(y_gen, cf)
        if cfg.loss == "wgan-gp":
            loss_g = -d_gen.mean()
        else:
            loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        if generator_extra is not None:
            extra = generator_extra(y_gen, batch)
            out["extra"] = float(extra.detach())
            loss_g = loss_g + extra
        _step(optimizers["generator"], loss_g, list(model.generator_parameters()), batch.share, grad_clip)
        out["gen"] = float(loss_g.detach())
        model._last_gen = out["gen"]
    else:
        out["gen"] = getattr(model, "_last_gen", 0.0)
    return out
