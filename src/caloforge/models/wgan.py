"""``wgan``: the conditional Wasserstein GAN with gradient penalty of the HGCAL study (the project's baseline).

As in the talk (seeds/wgan-tth-hgcal-refiner.txt): the generator maps (noise, labels) to a shower through
upsampling and convolutions with batch norm and LeakyReLU; the critic takes the labels as input and uses
convolutions, fully connected layers and layer norm; gradient penalty lambda = 50; auxiliary regression
networks for the labels (energy, angle) are trained on real showers only, and their error on generated
showers enters the generator loss as K * |loss_real - loss_fake| with K = 0.01.

To stay trainable on two CPU cores the calorimeter layers are the *channels* of 2D convolutions on the
(x, y) cell grid. Cells are represented as y = log1p(E_cell / (1e-5 E_inc)) / y_scale (energy normalised by
the incident energy, log-compressed); the generator ends in a ReLU, so exact zeros (empty cells) exist.

Hexagon readouts (``hgcal-proto``, the talk's own calorimeter): frame "cells". Each layer's hexagons go onto the
image of their axial lattice coordinates (:func:`caloforge.models.calogan.layer_images`, the talk's Cartesian map
of its hexagons; the same image in every layer, the layers its channels); the generator's pixels outside the sensor
are set to zero before the critic and the regressors see them and are never read back. The labels are the talk's:
energy and the impact point (x, y) in mm (features ``log_e``, ``pos_x``, ``pos_y``, and the particle), with the
position regressors next to the energy one (K_p = K_e = ``aux_weight``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caloforge.detector import Detector
from caloforge.models.base import (
    REGRESSED_FEATURES,
    ConditionsWarning,
    ModelConfig,
    ModelError,
    ShowerModel,
    TrainBatch,
)
from caloforge.models.calogan import layer_images
from caloforge.models.flatgan import (
    EMPTY_LAYER_LOG,
    ConditionalFlow,
    anchor_loss,
    check_layer_options,
    energy_distance,
    energy_score,
    flow_step,
    head_response,
    layer_energy_head,
    layer_log_factors,
    standardised_response,
)
from caloforge.models.logcells import LogCells


@dataclass
class WGANConfig(ModelConfig):
    """Architecture and adversarial-training constants of the WGAN-GP."""

    latent_dim: int = 64
    gen_channels: int = 48
    critic_channels: int = 48
    critic_hidden: int = 128
    aux_channels: int = 16
    gp_lambda: float = 50.0
    aux_weight: float = 0.01  # K of the talk
    n_critic: int = 5  # critic updates per generator update
    out_bias_init: float = -0.1  # start with (mostly) empty showers: a ReLU output below zero is an empty cell
    norm_fraction: float = 1e-5  # cells are normalised to norm_fraction * E_inc
    beta1: float = 0.5
    beta2: float = 0.9
    # The critic also sees log(E_layer / E_inc) per layer and log(E_vis / E_inc), each standardised by its spread in
    # the training data (over all energies), so that a response off by its spread (sigma90 / mu90 of Geant4 on
    # hgcal-proto: 5-7 %) is a signal of order one. Off: the older fixed scaling (log f + 7) / 3 of the layers only,
    # under which a 5 % shift is 0.017 (stop 18's models; their sigma90 came out 2-3x Geant4's).
    critic_response: bool = False
    # Weight of a generator term that matches, feature by feature, the sorted standardised log layer fractions and
    # log total of a generated batch to those of the real batch it was generated for (same conditions): a 1-D
    # Wasserstein distance per feature. The critic cannot enforce the response spread itself: with the gradient
    # penalty it is 1-Lipschitz in the log-compressed cells, in which a change of the total by its spread is a step
    # of ~0.005 per cell (a cell's energy is exp(y_scale y), y_scale ~ 10). 0 turns it off.
    response_weight: float = 0.0
    # With response_weight: compare z-scores of the response features at each shower's energy (mean and spread
    # fitted on the training data as quadratics in log E) instead of features standardised over all energies, so
    # that a batch of mixed energies constrains the spread at each energy, not only the mixture's.
    response_by_energy: bool = False
    # Cell representation: 0 the logarithm y = log1p(E_cell / unit) / y_scale; p > 0 the power law
    # y = (E_cell / unit)^p / y_scale (caloforge.models.logcells), unit = norm_fraction * E_inc.
    cell_power: float = 0.0
    # The generator also outputs each layer's energy (a small head on noise and labels) and its cells are rescaled
    # to it: the response is then set by L numbers instead of a sum of noisy cells (not in the talk).
    layer_energies: bool = False
    # Weight of a generator term: the energy distance between generated and real (standardised log layer fractions,
    # log total, labels) of the batch (caloforge.models.flatgan.energy_distance): the joint law of the response
    # given the conditions, matched without a critic. 0 turns it off.
    response_distance: float = 0.0
    # With response_distance and layer_energies: the energy score of the layer head's response at each shower's own
    # conditions (a second head sample per shower; flatgan.energy_score) instead of the batch's energy distance, so
    # that the spread is matched at every energy and impact point, not only over the batch's mixture.
    response_conditional: bool = False
    # With layer_energies: the layer energies come from a conditional normalising flow trained by maximum likelihood
    # on the real showers' layer energies (flatgan.ConditionalFlow, its own optimizer) instead of the generator's
    # head; the cells are rescaled to them (as densewgan's layer_flow; not in the talk).
    layer_flow: bool = False
    # With layer_flow: weight of the anchor of the generator's raw layer energies to the flow's (flatgan.anchor_loss),
    # without which layers drift to zero and die.
    layer_flow_anchor: float = 0.1
    # With layer_flow: the generator also takes the flow's layer energies as inputs (else only the noise they were
    # drawn from). On densewgan it made every measure worse (BENCHMARKS.md, "Stop 24"), hence off.
    generator_sees_layers: bool = False

    bounds: ClassVar[dict[str, tuple]] = {
        "latent_dim": (1, 1024), "gen_channels": (1, 512), "critic_channels": (1, 512), "critic_hidden": (1, 4096),
        "aux_channels": (1, 512), "n_critic": (1, 100), "gp_lambda": (0.0, 1e6), "aux_weight": (0.0, 1e6),
        "out_bias_init": (-1e3, 1e3), "norm_fraction": (1e-12, 1.0), "beta1": (0.0, 0.999999),
        "beta2": (0.0, 0.999999), "response_weight": (0.0, 1e6),
        "cell_power": (0.0, 1.0), "response_distance": (0.0, 1e6), "layer_flow_anchor": (0.0, 1e6),
    }

    def weight_estimate(self) -> int:  # for a 30 x 30 window; the generator's first layer grows with the window
        g, c = self.gen_channels, self.critic_channels
        return 128 * self.latent_dim * g + 54 * g * g + 96 * c * c + 100 * c * self.critic_hidden


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.2)


class _Generator(nn.Module):
    def __init__(self, n_layers: int, nx: int, ny: int, cfg: WGANConfig, n_cond: int):
        super().__init__()
        ch = cfg.gen_channels
        self.nx, self.ny = nx, ny
        self.h0, self.w0 = math.ceil(nx / 4), math.ceil(ny / 4)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim + n_cond, 2 * ch * self.h0 * self.w0),
                                nn.BatchNorm1d(2 * ch * self.h0 * self.w0), _lrelu())
        self.up1 = nn.Sequential(nn.Conv2d(2 * ch + n_cond, 2 * ch, 3, padding=1), nn.BatchNorm2d(2 * ch), _lrelu())
        self.up2 = nn.Sequential(nn.Conv2d(2 * ch + n_cond, ch, 3, padding=1), nn.BatchNorm2d(ch), _lrelu())
        self.out = nn.Conv2d(ch + n_cond, n_layers, 3, padding=1)
        nn.init.constant_(self.out.bias, cfg.out_bias_init)
        self.ch = ch
        self.layer_head = None
        if cfg.layer_energies and not cfg.layer_flow:
            self.layer_head = layer_energy_head(cfg.latent_dim + n_cond, n_layers)

    @staticmethod
    def _with_labels(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, c[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])], dim=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], 2 * self.ch, self.h0, self.w0)
        h = self.up1(self._with_labels(F.interpolate(h, scale_factor=2.0, mode="nearest"), c))
        h = self.up2(self._with_labels(F.interpolate(h, scale_factor=2.0, mode="nearest"), c))
        h = h[:, :, :self.nx, :self.ny]
        return F.relu(self.out(self._with_labels(h, c)))

    def layer_energies(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Standardised log(E_layer / E_inc + 1e-6) per layer (n, L) (config ``layer_energies``)."""
        return self.layer_head(torch.cat([z, c], dim=1))


class _Critic(nn.Module):
    def __init__(self, n_layers: int, nx: int, ny: int, cfg: WGANConfig, n_cond: int):
        super().__init__()
        ch = cfg.critic_channels
        n_feat = n_layers + (1 if cfg.critic_response else 0)
        self.conv = nn.Sequential(
            nn.Conv2d(n_layers + n_cond, ch, 3, padding=1), _lrelu(),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), nn.GroupNorm(1, 2 * ch), _lrelu(),
            nn.Conv2d(2 * ch, 2 * ch, 4, stride=2, padding=1), nn.GroupNorm(1, 2 * ch), _lrelu(),
        )
        n_flat = 2 * ch * (nx // 4) * (ny // 4)
        self.fc = nn.Sequential(nn.Linear(n_flat + n_feat + n_cond, cfg.critic_hidden),
                                nn.LayerNorm(cfg.critic_hidden), _lrelu(),
                                nn.Linear(cfg.critic_hidden, 1, bias=False))  # a bias cancels in W

    def forward(self, y: torch.Tensor, c: torch.Tensor, layer_feat: torch.Tensor) -> torch.Tensor:
        maps = c[:, :, None, None].expand(-1, -1, y.shape[2], y.shape[3])
        h = self.conv(torch.cat([y, maps], dim=1)).flatten(1)
        return self.fc(torch.cat([h, layer_feat, c], dim=1)).squeeze(1)


class _Regressor(nn.Module):
    """Auxiliary label regression on (absolute-scale) shower images; trained on real showers only."""

    def __init__(self, n_layers: int, nx: int, ny: int, cfg: WGANConfig):
        super().__init__()
        ch = cfg.aux_channels
        self.conv = nn.Sequential(nn.Conv2d(n_layers, ch, 4, stride=2, padding=1), _lrelu(),
                                  nn.Conv2d(ch, ch, 4, stride=2, padding=1), _lrelu())
        self.fc = nn.Sequential(nn.Linear(ch * (nx // 4) * (ny // 4) + n_layers, 64), _lrelu(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.conv(x).flatten(1), x.sum(dim=(2, 3)) / 10.0], dim=1)).squeeze(1)


class WGAN(LogCells, ShowerModel):
    """Conditional WGAN-GP with auxiliary label regressors (see the module docstring)."""

    family = "wgan"
    Config = WGANConfig
    sample_chunk = 256  # bounds the memory of placing the cells in the window (one index per cell)
    cells_positions = True  # hexagon readouts in frame "cells", the impact point a condition (the HGCAL labels)
    default_features = ("log_e", "pos_x", "pos_y", "is_photon", "charge")  # frame "cells" only

    def __init__(self, detector: Detector, n_cells: int | None = None, config: WGANConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: WGANConfig = self.config  # type: ignore[assignment]
        n_l, nx, ny = self._cell_images() if self.frame == "cells" else self.shape
        self.image_shape = (n_l, nx, ny)
        check_layer_options(cfg, self.family, n_l)
        self.register_buffer("y_scale", torch.tensor(1.0))
        self.sees_layers = n_l if cfg.layer_flow and cfg.generator_sees_layers else 0
        self.generator = _Generator(n_l, nx, ny, cfg, self.n_cond_features + self.sees_layers)
        # The critic also sees log(E_layer / E_inc) per layer: the energy response and longitudinal profile are
        # what the validation weighs most, and they are hard to read off log-compressed cells.
        self.critic = _Critic(n_l, nx, ny, cfg, self.n_cond_features)
        if cfg.critic_response or cfg.response_weight > 0 or cfg.layer_energies or cfg.response_distance > 0:
            # mean, spread of log(E_layer / E_inc), log(E_vis / E_inc) in the training data
            self.register_buffer("response_mean", torch.zeros(n_l + 1))
            self.register_buffer("response_std", torch.ones(n_l + 1))
        if cfg.response_by_energy:  # quadratics in t = (log E - a) / b of each feature's mean and spread (rows t^0..2)
            self.register_buffer("response_t", torch.tensor([0.0, 1.0]))
            self.register_buffer("response_mean_poly", torch.zeros(3, n_l + 1))
            self.register_buffer("response_std_poly", torch.zeros(3, n_l + 1))
        # one regressor per label (energy, angle, the impact offsets): the HGCAL recipe's energy and position nets
        self.regressed = [i for i, f in enumerate(self.features) if f in REGRESSED_FEATURES]
        self.regressors = nn.ModuleList([_Regressor(n_l, nx, ny, cfg) for _ in self.regressed])
        self.layer_flow = ConditionalFlow(n_l, self.n_cond_features) if cfg.layer_flow else None

    def _cell_images(self) -> tuple[int, int, int]:
        """Frame "cells": every layer's cells on one image (calogan's map), as buffers: ``cell_pixels`` (n_cells,),
        each cell's flat (layer, row, column) pixel, and ``pixel_mask`` (1, L, H, W), 1 on the sensor's pixels."""
        det = self.detector
        images = layer_images(det)
        if not all(layer.cells.kind == "hex" for layer in det.layers) or len({(h, w) for h, w, _ in images}) != 1:
            raise ModelError(f"model family {self.family!r} stacks the layers as the channels of one image (uniform "
                             f"grids, or hexagons on the same lattice in every layer); detector {det.name!r} has "
                             f"per-layer cells ({det.readout_summary()}), which it cannot represent (calogan and "
                             f"densewgan take any readout)")
        h, w = images[0][0], images[0][1]
        pixels = [np.arange(h * w) if p is None else np.asarray(p) for _, _, p in images]
        flat = np.concatenate([layer * h * w + p for layer, p in enumerate(pixels)])
        mask = torch.zeros(len(images) * h * w)
        mask[torch.as_tensor(flat)] = 1.0
        self.register_buffer("cell_pixels", torch.as_tensor(flat, dtype=torch.long), persistent=False)
        self.register_buffer("pixel_mask", mask.view(1, len(images), h, w), persistent=False)
        return len(images), h, w

    def check_conditions(self, conditions: Any, source: str = "conditions") -> None:
        """The base class's checks; in frame "cells" also a warning for impact points outside the training range
        (the cells frame does not move with the shower axis: positions there are extrapolations)."""
        super().check_conditions(conditions, source)
        rng = self.meta.get("conditions") or {}
        if self.frame != "cells" or "position" not in self.condition_names or not len(conditions):
            return
        for name, v, key in (("x", conditions.x, "x_mm"), ("y", conditions.y, "y_mm")):
            lo, hi = rng.get(key, (-math.inf, math.inf))
            tol = 0.05 * (hi - lo) + 1e-6
            if float(np.min(v)) < lo - tol or float(np.max(v)) > hi + tol:
                warnings.warn(f"{self.family} model: requested impact {name} [{float(np.min(v)):g}, "
                              f"{float(np.max(v)):g}] mm lies outside the training range [{lo:g}, {hi:g}] mm; showers "
                              f"there are extrapolations", ConditionsWarning, stacklevel=3)

    # ---- representation (caloforge.models.logcells) ---------------------------------------------------
    def to_image(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Showers (n, n_cells) MeV -> normalised images (n, L, H, W) (frame "cells": zero off the sensor)."""
        if self.frame != "cells":
            return super().to_image(showers, energies)
        x = showers.float()
        img = x.new_zeros(len(x), self.pixel_mask.numel()).index_copy(1, self.cell_pixels, x)
        return self.compress(img.view(len(x), *self.image_shape) / self._unit(energies)) / self.y_scale

    def from_image(self, y: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Normalised images -> showers (n, n_cells) MeV (frame "cells": the sensor's pixels, in cell order)."""
        if self.frame != "cells":
            return super().from_image(y, energies)
        e = self.expand(y) * self._unit(energies)
        return e.flatten(1).index_select(1, self.cell_pixels)

    def _generate(self, z: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """Generated normalised images; off the sensor zero (frame "cells"); with ``layer_energies`` each non-empty
        layer rescaled to the generator's layer energy."""
        n_l = self.image_shape[0]
        t = None
        if self.layer_flow is not None:
            with torch.no_grad():  # the flow learns from the likelihood alone, never from the critic
                t = self.layer_flow.sample(z[:, :n_l], cf)
        y = self.generator(z, torch.cat([cf, t.clamp(-10.0, 10.0)], dim=1) if self.sees_layers else cf)
        if self.frame == "cells":
            y = y * self.pixel_mask
        if not self.config.layer_energies:
            return y
        if t is None:
            t = self.generator.layer_energies(z, cf)
        mean, std = self.response_mean[:n_l], self.response_std[:n_l]
        self.raw_layer_frac = self.cell_fractions(y).sum(dim=(2, 3))  # for layer_flow's anchor (flatgan.anchor_loss)
        log_factor = layer_log_factors(self.raw_layer_frac, t, mean, std)
        self.generated_layer_logs = self._head_logs(t)  # for response_distance (flatgan.head_response)
        y = self.scale_cells(y, log_factor[:, :, None, None])
        if self.layer_flow is None:
            return y
        return y * (self.generated_layer_logs >= EMPTY_LAYER_LOG).to(y.dtype)[:, :, None, None]

    def _head_logs(self, t: torch.Tensor) -> torch.Tensor:
        """The layer head's standardised outputs t (n, L) -> log(E_layer / E_inc), at most 0."""
        n_l = self.image_shape[0]
        return (t * self.response_std[:n_l] + self.response_mean[:n_l]).clamp(max=0.0)

    def _absolute(self, y: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Absolute-scale image log1p(E_cell / 0.1 MeV) / 10 for the label regressors."""
        return torch.log1p(self.expand(y) * self._unit(energies) / 0.1) / 10.0

    def critic_score(self, y: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """Critic output for normalised images y and condition features (labels)."""
        frac = self.cell_fractions(y).sum(dim=(2, 3))
        if not self.config.critic_response:
            return self.critic(y, cf, (torch.log(frac + 1e-6) + 7.0) / 3.0)
        return self.critic(y, cf, self._response_features(frac))

    @staticmethod
    def _response_logs(frac: torch.Tensor) -> torch.Tensor:
        """Layer fractions (n, L) -> log layer fractions and log total (n, L + 1)."""
        return torch.log(torch.cat([frac, frac.sum(1, keepdim=True)], dim=1) + 1e-6)

    def _response_features(self, frac: torch.Tensor) -> torch.Tensor:
        """Layer fractions (n, L) -> standardised log layer fractions and log total (n, L + 1), within +-10."""
        return standardised_response(frac, self.response_mean, self.response_std)

    def _response_z(self, frac: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Log layer fractions and log total (n, L + 1) as z-scores at each shower's energy, within +-10."""
        logs = self._response_logs(frac)
        t = (torch.log(energies.float()) - self.response_t[0]) / self.response_t[1]
        powers = torch.stack([torch.ones_like(t), t, t * t], dim=1)  # (n, 3)
        mean = powers @ self.response_mean_poly
        spread = (powers @ self.response_std_poly).clamp(min=1e-3)
        return ((logs - mean) / spread).clamp(-10.0, 10.0)

    def _response_distance(self, y_gen: torch.Tensor, y_real: torch.Tensor,
                           energies: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the L + 1 response features of the 1-D Wasserstein distance between the generated and the real
        batch (sorted values compared; in data-parallel training each process compares its own shard)."""
        by_energy = self.config.response_by_energy and energies is not None

        def feats(y: torch.Tensor) -> torch.Tensor:
            frac = self.cell_fractions(y).sum(dim=(2, 3))
            return self._response_z(frac, energies) if by_energy else self._response_features(frac)

        f_gen = feats(y_gen)
        with torch.no_grad():
            f_real = feats(y_real)
        return (torch.sort(f_gen, dim=0).values - torch.sort(f_real, dim=0).values).abs().mean()

    def _fit_preprocessing(self, data: Any) -> None:
        self.fit_log_scale(data)
        if not (self.config.critic_response or self.config.response_weight > 0 or self.config.layer_energies
                or self.config.response_distance > 0):
            return
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        logs = []
        with torch.no_grad():
            for i in range(0, len(energies), 500):
                x = torch.as_tensor(np.asarray(data.showers[i:i + 500], dtype=np.float32))
                frac = self.cell_fractions(self.to_image(x, torch.as_tensor(energies[i:i + 500]))).sum(dim=(2, 3))
                logs.append(self._response_logs(frac.double()))
        if not logs:
            return
        lay = torch.cat(logs)
        std = lay.std(0) if len(lay) > 1 else torch.ones(lay.shape[1], dtype=torch.float64)
        self.response_mean.copy_(lay.mean(0).float())
        self.response_std.copy_(torch.where(std > 1e-3, std, torch.full_like(std, 1e-3)).float())
        if not self.config.response_by_energy:
            return
        log_e = np.log(energies)
        a = float(log_e.mean())
        b = float(log_e.std()) if len(log_e) > 1 and log_e.std() > 1e-6 else 1.0
        t = (log_e - a) / b
        powers = np.stack([np.ones_like(t), t, t * t], axis=1)
        y = lay.numpy()
        mean_poly = np.linalg.lstsq(powers, y, rcond=None)[0]  # (3, L + 1)
        abs_res = np.abs(y - powers @ mean_poly) * math.sqrt(math.pi / 2)  # E|x| = sigma sqrt(2 / pi)
        std_poly = np.linalg.lstsq(powers, abs_res, rcond=None)[0]
        self.response_t.copy_(torch.tensor([a, b]))
        self.response_mean_poly.copy_(torch.as_tensor(mean_poly, dtype=torch.float32))
        self.response_std_poly.copy_(torch.as_tensor(std_poly, dtype=torch.float32))

    # ---- sampling -----------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        cfg: WGANConfig = self.config  # type: ignore[assignment]
        return [((n, cfg.latent_dim), "normal")]

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        y = self._generate(noise[0], self.condition_features(cond))
        return self.from_image(y.clamp(max=1.0), cond[:, 0])  # 1.0 = the hottest training cell

    # ---- training -----------------------------------------------------------------------------------
    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        cfg: WGANConfig = self.config  # type: ignore[assignment]
        betas = (cfg.beta1, cfg.beta2)
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=lr, betas=betas),
            "regressors": torch.optim.Adam(self.regressors.parameters(), lr=lr, betas=betas),
            **({"flow": torch.optim.Adam(self.layer_flow.parameters(), lr=lr)} if self.layer_flow is not None else {}),
        }

    def _regression_loss(self, y: torch.Tensor, energies: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        a = self._absolute(y, energies)
        return torch.stack([F.mse_loss(net(a), cf[:, i]) for i, net in zip(self.regressed, self.regressors)])

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        """One critic + regressor update; a generator update every ``n_critic`` steps (noise through the batch and
        gradients reduced over the shards in data-parallel training, :mod:`caloforge.distributed`)."""
        from caloforge.distributed import reduce_gradients, weighted_sum

        cfg: WGANConfig = self.config  # type: ignore[assignment]
        cf = self.condition_features(batch.cond)
        y_real = self.to_image(batch.showers, batch.energies)
        flow_out = {}
        if self.layer_flow is not None:  # the layer flow, by likelihood on the real showers
            n_l = self.image_shape[0]
            frac = self.cell_fractions(y_real).sum(dim=(2, 3))
            flow_out["flow_nll"] = flow_step(self.layer_flow, frac, cf, batch, optimizers["flow"],
                                             self.response_mean[:n_l], self.response_std[:n_l], grad_clip)
        # Critic.
        with torch.no_grad():
            y_fake = self._generate(batch.randn(cfg.latent_dim), cf)
        eps = batch.rand(1, 1, 1)
        y_hat = (eps * y_real + (1 - eps) * y_fake).requires_grad_(True)
        grad, = torch.autograd.grad(self.critic_score(y_hat, cf).sum(), y_hat, create_graph=True)
        gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        w_dist = self.critic_score(y_real, cf).mean() - self.critic_score(y_fake, cf).mean()
        loss_c = -w_dist + cfg.gp_lambda * gp
        out = {"critic": float(loss_c.detach()), "w": float(w_dist.detach()), "gp": float(gp.detach())}
        if not torch.isfinite(weighted_sum(loss_c.detach(), batch.share)):
            return out
        optimizers["critic"].zero_grad(set_to_none=True)
        loss_c.backward()
        reduce_gradients(self.critic.parameters(), batch.share)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), grad_clip)
        optimizers["critic"].step()
        # Label regressors, on real showers only.
        reg_real = self._regression_loss(y_real, batch.energies, cf)
        optimizers["regressors"].zero_grad(set_to_none=True)
        reg_real.sum().backward()
        reduce_gradients(self.regressors.parameters(), batch.share)
        optimizers["regressors"].step()
        out["reg"] = float(reg_real.sum().detach())
        # Generator.
        if (step + 1) % cfg.n_critic == 0:
            y_gen = self._generate(batch.randn(cfg.latent_dim), cf)
            g_adv = -self.critic_score(y_gen, cf).mean()
            reg_fake = self._regression_loss(y_gen, batch.energies, cf)
            loss_g = g_adv + cfg.aux_weight * (reg_real.detach() - reg_fake).abs().sum()
            if self.layer_flow is not None and cfg.layer_flow_anchor > 0:
                anchor = anchor_loss(self.raw_layer_frac, self.generated_layer_logs)
                loss_g = loss_g + cfg.layer_flow_anchor * anchor
                out["anchor"] = float(anchor.detach())
            if cfg.response_weight > 0:
                resp = self._response_distance(y_gen, y_real, batch.energies)
                loss_g = loss_g + cfg.response_weight * resp
                out["resp"] = float(resp.detach())
            if cfg.response_distance > 0:  # with layer_energies: the layer head's response (flatgan.response_distance)
                with torch.no_grad():
                    real = torch.cat([self._response_features(self.cell_fractions(y_real).sum(dim=(2, 3))), cf], 1)
                if cfg.layer_energies:
                    f_gen = head_response(self.generated_layer_logs, self.response_mean, self.response_std)
                else:
                    f_gen = self._response_features(self.cell_fractions(y_gen).sum(dim=(2, 3)))
                if cfg.response_conditional:
                    logs_b = self._head_logs(self.generator.layer_energies(batch.randn(cfg.latent_dim), cf))
                    f_b = head_response(logs_b, self.response_mean, self.response_std)
                    dist = energy_score(f_gen, f_b, real[:, :f_gen.shape[1]])
                else:
                    dist = energy_distance(torch.cat([f_gen, cf], 1), real)
                loss_g = loss_g + cfg.response_distance * dist
                out["edist"] = float(dist.detach())
            optimizers["generator"].zero_grad(set_to_none=True)
            loss_g.backward()
            reduce_gradients(self.generator.parameters(), batch.share)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.generator.parameters(), grad_clip)
            optimizers["generator"].step()
            out["gen"] = float(loss_g.detach())
            self._last_gen = out["gen"]
        else:
            out["gen"] = getattr(self, "_last_gen", 0.0)
        return {**out, **flow_out}
