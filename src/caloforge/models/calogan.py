"""``calogan``: CaloGAN (seeds/calogan-atlas-like.txt; Paganini, de Oliveira, Nachman, arXiv:1705.02355,
arXiv:1712.10321) on a detector with a cell grid per layer (``calogan-3layer``: 3 x 96, 12 x 12, 12 x 6 cells), and
on any readout whose layers make images: (r, phi) bins as n_phi x n_r images, hexagons on the image of their axial
lattice coordinates (:func:`layer_images`; the HGCAL seed's Cartesian map of its hexagons).

As the talk and papers describe it:

* **one generator per layer**, each producing that layer's image at its own granularity (here each layer's
  ``n_x x n_y`` cell grid, in the detector's cell order), all fed the same latent vector and the conditions;
* **locally connected layers** (:class:`LocallyConnected2d`: a convolution whose weights are not shared between
  positions, as the LAGAN/CaloGAN networks use; cell (i, j) of the image has its own filter), after a shared-weight
  convolution, in the generators and in the discriminator;
* the **layer-to-layer transfer**: each layer's generator also sees the previous layer's output, mapped to its own
  grid by a learned dense transformation and fed in as an extra input channel (layer 1 sees layer 0, layer 2 sees
  layer 1), so the longitudinal development is correlated;
* the **energy-conservation term**: the generator is penalised for showers whose visible energy exceeds what a shower
  of that incident energy deposits at most (``energy_weight * mean(relu(E_vis / E_inc - f_max))``, with f_max the
  largest visible fraction in the training data: the detector samples, so E_vis < E_inc is not the bound here);
* **minibatch discrimination** (Salimans et al. 2016) in the discriminator, on its per-layer features, the layer
  energies and the hit fractions, so that a generator that collapses onto one shower is seen;
* conditioning on the **energy and the particle** (e+, gamma: features ``log_e``, ``is_photon``, ``charge``),
  given to every generator and to the discriminator. The seed trained one GAN per particle; one conditional GAN
  here shares what the showers of e+ and photons have in common.

The loss: **WGAN-GP** by default (``loss = "wgan-gp"``), the seed's non-saturating cross-entropy with one-sided
label smoothing as ``loss = "gan"``. Why WGAN-GP: on a CPU budget of tens of minutes and a few thousand showers, the
cross-entropy GAN oscillates and collapses unless its learning rates are tuned per dataset, while the critic loss
of WGAN-GP gives a usable signal from the start (the reason the later seeds, the HGCAL and 89-cell WGANs, moved to
it). The gradient penalty is taken on a batch of interpolates, which the minibatch features couple; that keeps the
critic smooth on the batch as a whole. An optional moment term (``response_weight``) matches the batch means of the
log layer fractions of generated and real showers (same conditions): not in the seed; 0 turns it off.

Cells are represented as in ``wgan``: y = log1p(E_cell / (norm_fraction E_inc)) / y_scale, or with ``cell_power`` p
the power law (E_cell / (norm_fraction E_inc))^p / y_scale (:mod:`caloforge.models.logcells`); ReLU outputs (exact
zeros). Frame "cells": normal incidence at the detector's impact point (0, 0), as the seed's particle gun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from caloforge.detector import Detector
from caloforge.models.base import ModelConfig, ShowerModel, TrainBatch
from caloforge.models.flatgan import FlatLogCells, adversarial_step, check_layer_options, layer_energy_head


@dataclass
class CaloGANConfig(ModelConfig):
    """Architecture and training constants of CaloGAN."""

    latent_dim: int = 64
    gen_channels: int = 16
    lc_channels: int = 8  # channels of the generators' locally connected layer
    disc_channels: int = 8
    disc_features: int = 32  # features per layer the discriminator's convolutions pass on
    disc_hidden: int = 128
    mbd_kernels: int = 10  # minibatch discrimination: B kernels of C dimensions
    mbd_dims: int = 5
    loss: str = "wgan-gp"
    gp_lambda: float = 10.0
    label_smoothing: float = 0.1  # loss = "gan": real labels 0.9
    n_critic: int = 5
    energy_weight: float = 1.0
    response_weight: float = 0.0
    out_bias_init: float = -0.05
    norm_fraction: float = 1e-5
    beta1: float = 0.5
    beta2: float = 0.9
    cell_power: float = 0.0  # 0: log-compressed cells; p > 0: y = (E_cell / unit)^p / y_scale (models/logcells.py)
    # A head on noise and labels sets each layer's energy and the generated cells are rescaled to it
    # (flatgan.with_layer_energies; not in the seed).
    layer_energies: bool = False
    # Weight of a generator term: the energy distance between generated and real (standardised log layer energies,
    # log total, labels) of the batch (flatgan.response_distance; not in the seed). 0 turns it off.
    response_distance: float = 0.0
    # With response_distance and layer_energies: the energy score of the layer head's response at each shower's own
    # conditions instead of the batch's energy distance (as in densewgan).
    response_conditional: bool = False
    # Weight of a generator term: the energy score of each layer's centroids and widths of two generated showers per
    # real one, at its conditions (flatgan.shape_score; not in the seed). 0 turns it off.
    shape_score: float = 0.0
    # With layer_energies: the layer energies come from a conditional normalising flow trained by maximum likelihood
    # on the real showers (flatgan.ConditionalFlow, as densewgan's), instead of the layer head; the per-layer images
    # are rescaled to them (not in the seed).
    layer_flow: bool = False
    # With layer_flow: weight of the anchor of the generators' raw layer energies to the flow's (flatgan.anchor_loss).
    layer_flow_anchor: float = 0.1
    # With layer_flow: steps of maximum likelihood on all the training showers before the GAN starts
    # (flatgan.FlatLogCells.fit_layer_flow). 0: the flow learns only from the training steps' batches.
    layer_flow_fit_steps: int = 0

    # The critic's hit counts at this threshold (MeV; the evaluation's is 0.075): a soft count of the cells above it
    # (flatgan.FlatLogCells.layer_features). 0: tanh(50 y), which barely sees cells near the threshold.
    critic_hits_mev: float = 0.0

    bounds: ClassVar[dict[str, tuple]] = {
        "latent_dim": (1, 1024), "gen_channels": (1, 256), "lc_channels": (1, 64), "disc_channels": (1, 256),
        "disc_features": (1, 1024), "disc_hidden": (1, 4096), "mbd_kernels": (0, 256), "mbd_dims": (1, 64),
        "loss": ("wgan-gp", "gan"), "gp_lambda": (0.0, 1e6), "label_smoothing": (0.0, 0.5), "n_critic": (1, 100),
        "energy_weight": (0.0, 1e6), "response_weight": (0.0, 1e6), "out_bias_init": (-1e3, 1e3),
        "norm_fraction": (1e-12, 1.0), "beta1": (0.0, 0.999999), "beta2": (0.0, 0.999999), "cell_power": (0.0, 1.0),
        "response_distance": (0.0, 1e6), "shape_score": (0.0, 1e6), "critic_hits_mev": (0.0, 1e6),
        "layer_flow_anchor": (0.0, 1e6), "layer_flow_fit_steps": (0, 10 ** 7),
    }

    def weight_estimate(self) -> int:  # for about 500 cells in 3 layers
        g, lc, d = self.gen_channels, self.lc_channels, self.disc_channels
        return (self.latent_dim + 8) * g * 500 + 500 * 9 * (g * lc + lc) + 500 * 9 * d * d + 500 * d * \
            self.disc_features + 4 * self.disc_features * self.disc_hidden + 500 * 500


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.2)


class LocallyConnected2d(nn.Module):
    """A k x k 'convolution' with unshared weights: every output position (i, j) has its own filter (zero padding
    keeps the size): unfold the k x k patches, then one batched matrix product per position."""

    def __init__(self, c_in: int, c_out: int, height: int, width: int, kernel: int = 3):
        super().__init__()
        self.k, self.h, self.w, self.c_out = kernel, height, width, c_out
        fan_in = c_in * kernel * kernel
        self.weight = nn.Parameter(torch.randn(height * width, fan_in, c_out) / fan_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(c_out, height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.k // 2
        if self.k % 2 == 0:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        patches = nn.functional.unfold(x, self.k, padding=p)  # (n, c_in k k, h w)
        out = torch.bmm(patches.permute(2, 0, 1), self.weight)  # (h w, n, c_out)
        return out.permute(1, 2, 0).reshape(-1, self.c_out, self.h, self.w) + self.bias


def _cond_maps(c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return c[:, :, None, None].expand(-1, -1, h, w)


class _LayerGenerator(nn.Module):
    """(latent, conditions, previous layer's cells) -> this layer's image (1, H, W), ReLU (exact zeros), as cells."""

    def __init__(self, h: int, w: int, prev_cells: int, cfg: CaloGANConfig, n_cond: int,
                 pixels: np.ndarray | None = None):
        super().__init__()
        g = cfg.gen_channels
        self.h, self.w, self.g = h, w, g
        self.pixels = None if pixels is None else torch.as_tensor(pixels, dtype=torch.long)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim + n_cond, g * h * w), _lrelu())
        self.transfer = nn.Linear(prev_cells, h * w) if prev_cells else None
        self.conv = nn.Sequential(nn.Conv2d(g + n_cond + (1 if prev_cells else 0), g, 3, padding=1), _lrelu())
        self.lc1 = nn.Sequential(LocallyConnected2d(g, cfg.lc_channels, h, w), _lrelu())
        self.lc2 = LocallyConnected2d(cfg.lc_channels, 1, h, w)
        nn.init.constant_(self.lc2.bias, cfg.out_bias_init)

    def forward(self, z: torch.Tensor, c: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        n = z.shape[0]
        parts = [self.fc(torch.cat([z, c], dim=1)).view(n, self.g, self.h, self.w), _cond_maps(c, self.h, self.w)]
        if self.transfer is not None:
            parts.append(self.transfer(prev).view(n, 1, self.h, self.w))
        h = self.lc1(self.conv(torch.cat(parts, dim=1)))
        image = torch.relu(self.lc2(h)).view(n, self.h * self.w)
        return image if self.pixels is None else image[:, self.pixels.to(image.device)]


class _LayerFeatures(nn.Module):
    """The discriminator's view of one layer: convolution, locally connected layer, dense features."""

    def __init__(self, h: int, w: int, cfg: CaloGANConfig, n_cond: int, pixels: np.ndarray | None = None):
        super().__init__()
        d = cfg.disc_channels
        self.h, self.w = h, w
        self.pixels = None if pixels is None else torch.as_tensor(pixels, dtype=torch.long)
        self.conv = nn.Sequential(nn.Conv2d(1 + n_cond, d, 3, padding=1), _lrelu(),
                                  LocallyConnected2d(d, d, h, w), _lrelu())
        self.fc = nn.Sequential(nn.Linear(d * h * w, cfg.disc_features), _lrelu())

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.pixels is not None:  # the cells onto their pixels, zero elsewhere
            y = y.new_zeros(y.shape[0], self.h * self.w).index_copy(1, self.pixels.to(y.device), y)
        x = torch.cat([y.view(-1, 1, self.h, self.w), _cond_maps(c, self.h, self.w)], dim=1)
        return self.fc(self.conv(x).flatten(1))


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. (2016): for each of B kernels, o_b(i) = sum_j exp(-|M_i,b - M_j,b|_1) over the other rows of
    the batch (M = f T, C dimensions per kernel); appended to the features."""

    def __init__(self, n_in: int, kernels: int, dims: int):
        super().__init__()
        self.b, self.c = kernels, dims
        self.T = nn.Parameter(torch.randn(n_in, kernels * dims) * 0.1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        m = (f @ self.T).view(-1, self.b, self.c)
        dist = (m[:, None] - m[None, :]).abs().sum(3)  # (n, n, B)
        return torch.cat([f, torch.exp(-dist).sum(1) - 1.0], dim=1)


class _Discriminator(nn.Module):
    def __init__(self, images: list[tuple[int, int, np.ndarray | None]], cfg: CaloGANConfig, n_cond: int):
        super().__init__()
        self.sizes = [h * w if p is None else len(p) for h, w, p in images]
        self.layers = nn.ModuleList([_LayerFeatures(h, w, cfg, n_cond, p) for h, w, p in images])
        n_f = len(images) * (cfg.disc_features + 2) + n_cond
        self.mbd = MinibatchDiscrimination(n_f, cfg.mbd_kernels, cfg.mbd_dims) if cfg.mbd_kernels else None
        self.fc = nn.Sequential(nn.Linear(n_f + (cfg.mbd_kernels if cfg.mbd_kernels else 0), cfg.disc_hidden),
                                _lrelu(), nn.Linear(cfg.disc_hidden, 1, bias=cfg.loss == "gan"))  # cancels in W

    def forward(self, y: torch.Tensor, c: torch.Tensor, layer_feat: torch.Tensor) -> torch.Tensor:
        parts = [net(part, c) for net, part in zip(self.layers, torch.split(y, self.sizes, dim=1))]
        f = torch.cat([*parts, layer_feat, c], dim=1)
        if self.mbd is not None:
            f = self.mbd(f)
        return self.fc(f).squeeze(1)


def layer_images(detector: Detector) -> list[tuple[int, int, np.ndarray | None]]:
    """Each layer's cells as an image ``(height, width, pixels)``: ``pixels`` None when the image is the layer's
    cells in order (a grid: n_x x n_y; (r, phi) bins: n_phi x n_r, angle slow, radius fast), else the image pixel
    (``row * width + column``) of each cell. Hexagons go onto the image of their axial lattice coordinates (q, r),
    as the HGCAL seed mapped its hexagons onto a Cartesian image: a hexagon's six neighbours are six of the eight
    around its pixel, so the 3 x 3 convolutions see them; the pixels outside the sensor are never read."""
    if detector.is_uniform:
        _, nx, ny = detector.shape()
        return [(nx, ny, None)] * detector.n_layers
    out = []
    for layer in detector.layers:
        c = layer.cells
        if c.kind == "grid":
            out.append((c.n_x, c.n_y, None))
        elif c.kind == "polar":
            out.append((c.n_phi, c.n_r, None))
        else:
            x, y = c.centres()
            q, r = (np.rint(v).astype(np.int64) for v in c._lattice(x, y))
            q, r = q - q.min(), r - r.min()
            h, w = int(q.max()) + 1, int(r.max()) + 1
            out.append((h, w, q * w + r))
    return out


class CaloGAN(FlatLogCells, ShowerModel):
    """CaloGAN: per-layer generators with locally connected layers and layer-to-layer transfer (module docstring)."""

    family = "calogan"
    Config = CaloGANConfig
    readouts = "any"
    cells_positions = True  # the impact point (pos_x, pos_y) may be a condition: train --features
    default_features = ("log_e", "is_photon", "charge")

    def __init__(self, detector: Detector, n_cells: int | None = None, config: CaloGANConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: CaloGANConfig = self.config  # type: ignore[assignment]
        check_layer_options(cfg, self.family, detector.n_layers)
        images = layer_images(detector)
        self.grids = [(h, w) for h, w, _ in images]
        self.init_flat_cells()
        self.register_buffer("max_visible_fraction", torch.tensor(1.0))
        n_c = self.n_cond_features
        sizes = [h * w if p is None else len(p) for h, w, p in images]
        self.generators = nn.ModuleList([_LayerGenerator(h, w, sizes[i - 1] if i else 0, cfg, n_c, p)
                                         for i, (h, w, p) in enumerate(images)])
        self.discriminator = _Discriminator(images, cfg, n_c)
        self.layer_head = None
        self.init_layer_flow()
        if cfg.layer_energies:
            if self.layer_flow is None:
                self.layer_head = layer_energy_head(cfg.latent_dim + n_c, len(images))
            self.init_layer_energies()
        if cfg.response_distance > 0:
            self.init_response_features()
        if cfg.shape_score > 0:
            self.init_shape_features()

    def generator_parameters(self) -> Any:
        if self.layer_head is None:
            return self.generators.parameters()
        return [*self.generators.parameters(), *self.layer_head.parameters()]

    def critic_parameters(self) -> Any:
        return self.discriminator.parameters()

    def _fit_preprocessing(self, data: Any) -> None:
        self.fit_log_scale(data)
        e = np.asarray(data.conditions.energy, np.float64)
        vis = np.concatenate([np.asarray(data.showers[i:i + 1000], np.float64).sum(1)
                              for i in range(0, len(e), 1000)]) if len(e) else np.ones(1)
        self.max_visible_fraction.fill_(float((vis / e[:len(vis)]).max()) if len(e) else 1.0)
        if self.config.layer_energies or self.config.response_distance > 0:
            self.fit_layer_energies(data)
        self.fit_layer_flow(data, self.config.layer_flow_fit_steps)
        if self.config.shape_score > 0:
            self.fit_shape_features(data)

    # ---- networks -----------------------------------------------------------------------------------
    def generate_y(self, z: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """Normalised log cells (n, n_cells): layer by layer, each generator seeing the previous layer's image."""
        out, prev = [], None
        for net in self.generators:
            prev = net(z, cf, prev)
            out.append(prev)
        y = torch.cat(out, dim=1)
        if self.layer_flow is not None:
            return self.with_flow_energies(y, self.flow_layer_energies(z, cf))
        if self.layer_head is None:
            return y
        return self.with_layer_energies(y, self.layer_head(torch.cat([z, cf], dim=1)))

    def critic_score(self, y: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        return self.discriminator(y, cf, self.layer_features(y, cf))

    # ---- training (sampling and the optimisers: FlatLogCells) -------------------------------------------
    def _generator_extra(self, y_gen: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Energy conservation (hinge above the largest training fraction) and the optional moment term."""
        cfg: CaloGANConfig = self.config  # type: ignore[assignment]
        frac = self.cell_fractions(y_gen).sum(1)
        loss = cfg.energy_weight * torch.relu(frac - self.max_visible_fraction).mean()
        loss = loss + self.layer_flow_anchor_loss(y_gen)  # before a second pass replaces the raw layer energies
        if cfg.response_weight > 0:
            y_real = self.to_y(batch.showers, batch.energies)
            n_l = len(self.grids)
            gen, real = self.layer_features(y_gen)[:, :n_l], self.layer_features(y_real)[:, :n_l]
            loss = loss + cfg.response_weight * (gen.mean(0) - real.mean(0)).abs().sum()
        if cfg.response_distance > 0 or cfg.shape_score > 0:
            y_real = self.to_y(batch.showers, batch.energies)
            cf = self.condition_features(batch.cond)
        if cfg.response_distance > 0 and not cfg.response_conditional:
            loss = loss + cfg.response_distance * self.response_distance(y_gen, y_real, cf)
        if cfg.shape_score > 0:  # a second full shower per real one (its head's energies with it)
            logs_a = self.generated_layer_logs if self.layer_head is not None else None
            y_b = self.generate_y(batch.randn(cfg.latent_dim), cf)
            loss = loss + cfg.shape_score * self.shape_score(y_gen, y_b, y_real)
            if cfg.response_conditional:
                loss = loss + cfg.response_distance * self.response_score(logs_a, self.generated_layer_logs, y_real)
        elif cfg.response_conditional:  # the head alone gives the second response
            logs_b = self.head_logs(self.layer_head(torch.cat([batch.randn(cfg.latent_dim), cf], dim=1)))
            loss = loss + cfg.response_distance * self.response_score(self.generated_layer_logs, logs_b, y_real)
        return loss

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        out = self.layer_flow_step(batch, optimizers, grad_clip)  # the layer flow, by likelihood on real showers
        return {**adversarial_step(self, batch, optimizers, step, self.generate_y, self.critic_score,
                                   self._generator_extra, grad_clip), **out}
