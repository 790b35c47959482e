"""``densewgan``: the fully connected Wasserstein GAN of the 89-cell photon cluster (seeds/wgan-89-cell-photon.txt;
P. Klein, 2017) on ``atlas-4layer`` (presampler 4 x 1, strips 32 x 1, middle 5 x 7, back 3 x 6 cells).

As the talk describes it: the event is the flat vector of the cluster's cells (89 floats), generator and critic
are **dense layers only**, the loss is the **Wasserstein distance**, and the critic is "enforced to learn" the
event's energy (here: it also sees the per-layer energies and hit fractions of the shower it judges). The talk
lists as work in progress the **conditional GAN** (energy as input) and the **improved WGAN** of Gulrajani et al.
(gradient penalty); both are done here: generator and critic take the energy, and the Lipschitz constraint is the
gradient penalty (``gp_lambda``) rather than weight clipping, which trains more reliably at the same cost.

Cells are represented as in ``wgan``: y = log1p(E_cell / (norm_fraction E_inc)) / y_scale, or with ``cell_power`` p
the power law (E_cell / (norm_fraction E_inc))^p / y_scale (:mod:`caloforge.models.logcells`); ReLU outputs (exact
zeros). Any readout works (the detector's flat cell vector, frame "cells": normal incidence at (0, 0)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from caloforge.detector import Detector
from caloforge.models.base import ModelConfig, ShowerModel, TrainBatch
from caloforge.models.flatgan import FlatLogCells, adversarial_step, check_layer_options


@dataclass
class DenseWGANConfig(ModelConfig):
    """Widths, depth and adversarial-training constants of the dense WGAN-GP."""

    latent_dim: int = 32
    gen_hidden: int = 256
    gen_depth: int = 3
    critic_hidden: int = 256
    critic_depth: int = 3
    loss: str = "wgan-gp"
    gp_lambda: float = 10.0
    label_smoothing: float = 0.1  # loss = "gan" only
    n_critic: int = 5
    out_bias_init: float = -0.05
    norm_fraction: float = 1e-5
    beta1: float = 0.5
    beta2: float = 0.9
    cell_power: float = 0.0  # 0: log-compressed cells; p > 0: y = (E_cell / unit)^p / y_scale (models/logcells.py)
    # The generator also outputs each layer's energy, and its cells are rescaled to it (flatgan.with_layer_energies):
    # the response is then set by L numbers instead of a sum of noisy cells (not in the seed).
    layer_energies: bool = False
    # Weight of a generator term: the energy distance between generated and real (standardised log layer energies,
    # log total, labels) of the batch (flatgan.response_distance; not in the seed). 0 turns it off.
    response_distance: float = 0.0
    # With response_distance and layer_energies: the term is the energy score of the layer head's response at each
    # shower's own conditions (a second head sample per shower; flatgan.energy_score) instead of the batch's energy
    # distance, so that the spread is matched at every energy, not only over the batch's mixture.
    response_conditional: bool = False
    # Weight of a generator term: the energy score of each layer's centroids and widths of two generated showers per
    # real one, at its conditions (flatgan.shape_score; not in the seed). 0 turns it off.
    shape_score: float = 0.0
    # With layer_energies: the layer energies come from a conditional normalising flow trained by maximum likelihood
    # on the real showers' layer energies (flatgan.ConditionalFlow, its own optimizer, a step per training step), the
    # cells from the GAN and rescaled to them; the response is then a fitted density (not in the seed).
    layer_flow: bool = False
    # With layer_flow: weight of the anchor of the generator's raw layer energies to the flow's (flatgan.anchor_loss),
    # without which layers drift to zero and die.
    layer_flow_anchor: float = 0.1
    # With layer_flow: steps of maximum likelihood on all the training showers before the GAN starts
    # (flatgan.FlatLogCells.fit_layer_flow). 0: the flow learns only from the training steps' batches.
    layer_flow_fit_steps: int = 0
    # With layer_flow: the generator also takes the flow's layer energies as inputs (else only the noise they were
    # drawn from). On densewgan it made every measure worse (BENCHMARKS.md, "Stop 24"), hence off.
    generator_sees_layers: bool = False

    # The critic's hit counts at this threshold (MeV; the evaluation's is 0.075): a soft count of the cells above it
    # (flatgan.FlatLogCells.layer_features). 0: tanh(50 y), which barely sees cells near the threshold.
    critic_hits_mev: float = 0.0

    bounds: ClassVar[dict[str, tuple]] = {
        "latent_dim": (1, 1024), "gen_hidden": (1, 8192), "gen_depth": (1, 16), "critic_hidden": (1, 8192),
        "critic_depth": (1, 16), "loss": ("wgan-gp", "gan"), "gp_lambda": (0.0, 1e6), "label_smoothing": (0.0, 0.5),
        "n_critic": (1, 100), "out_bias_init": (-1e3, 1e3), "norm_fraction": (1e-12, 1.0), "beta1": (0.0, 0.999999),
        "beta2": (0.0, 0.999999), "cell_power": (0.0, 1.0), "response_distance": (0.0, 1e6),
        "layer_flow_anchor": (0.0, 1e6), "layer_flow_fit_steps": (0, 10 ** 7),
        "shape_score": (0.0, 1e6), "critic_hits_mev": (0.0, 1e6),
    }

    def weight_estimate(self) -> int:  # for up to about 1000 cells
        return (self.gen_depth * self.gen_hidden ** 2 + self.critic_depth * self.critic_hidden ** 2
                + (self.latent_dim + 1000) * self.gen_hidden + 1000 * self.critic_hidden)


def _mlp(n_in: int, hidden: int, depth: int, n_out: int, out_bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.LeakyReLU(0.2)]
    layers.append(nn.Linear(hidden, n_out, bias=out_bias))
    return nn.Sequential(*layers)


class DenseWGAN(FlatLogCells, ShowerModel):
    """Dense conditional WGAN-GP on a flat cell vector (see the module docstring)."""

    family = "densewgan"
    Config = DenseWGANConfig
    readouts = "any"
    cells_positions = True  # the impact point (pos_x, pos_y) may be a condition: train --features
    default_features = ("log_e",)

    def __init__(self, detector: Detector, n_cells: int | None = None, config: DenseWGANConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: DenseWGANConfig = self.config  # type: ignore[assignment]
        check_layer_options(cfg, self.family, self.detector.n_layers)
        self.init_flat_cells()
        n_c, n_l = self.n_cond_features, self.detector.n_layers
        n_out = self.n_cells + (n_l if cfg.layer_energies and not cfg.layer_flow else 0)
        self.sees_layers = n_l if cfg.layer_flow and cfg.generator_sees_layers else 0
        self.generator = _mlp(cfg.latent_dim + n_c + self.sees_layers, cfg.gen_hidden, cfg.gen_depth, n_out)
        nn.init.constant_(self.generator[-1].bias, cfg.out_bias_init)
        self.init_layer_flow()
        if cfg.layer_energies:
            nn.init.zeros_(self.generator[-1].bias[self.n_cells:])  # the training mean of each layer's energy
            self.init_layer_energies()
        if cfg.response_distance > 0:
            self.init_response_features()
        if cfg.shape_score > 0:
            self.init_shape_features()
        self.critic = _mlp(self.n_cells + 2 * n_l + n_c, cfg.critic_hidden, cfg.critic_depth, 1,
                           out_bias=cfg.loss == "gan")  # a bias cancels in W

    def generator_parameters(self) -> Any:
        return self.generator.parameters()

    def critic_parameters(self) -> Any:
        return self.critic.parameters()

    def _fit_preprocessing(self, data: Any) -> None:
        self.fit_log_scale(data)
        if self.config.layer_energies or self.config.response_distance > 0:
            self.fit_layer_energies(data)
        self.fit_layer_flow(data, self.config.layer_flow_fit_steps)
        if self.config.shape_score > 0:
            self.fit_shape_features(data)

    def generate_y(self, z: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        if self.layer_flow is None:
            out = self.generator(torch.cat([z, cf], dim=1))
            y = torch.relu(out[:, :self.n_cells])
            return self.with_layer_energies(y, out[:, self.n_cells:]) if self.config.layer_energies else y
        t = self.flow_layer_energies(z, cf)
        inputs = [z, cf, t.clamp(-10.0, 10.0)] if self.sees_layers else [z, cf]
        return self.with_flow_energies(torch.relu(self.generator(torch.cat(inputs, dim=1))), t)

    def critic_score(self, y: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        return self.critic(torch.cat([y, self.layer_features(y, cf), cf], dim=1)).squeeze(1)

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        cfg: DenseWGANConfig = self.config  # type: ignore[assignment]
        out = self.layer_flow_step(batch, optimizers, grad_clip)  # the layer flow, by likelihood on real showers
        extra = self._generator_extra if cfg.response_distance > 0 or cfg.shape_score > 0 or cfg.layer_flow else None
        return {**adversarial_step(self, batch, optimizers, step, self.generate_y, self.critic_score, extra,
                                   grad_clip), **out}

    def _generator_extra(self, y_gen: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """The response term (batch energy distance, or the energy score at each shower's conditions) and the
        shape score; the conditional scores draw a second generated shower per real one."""
        cfg: DenseWGANConfig = self.config  # type: ignore[assignment]
        y_real = self.to_y(batch.showers, batch.energies)
        cf = self.condition_features(batch.cond)
        loss = self.layer_flow_anchor_loss(y_gen)
        if cfg.response_distance > 0 and not cfg.response_conditional:
            loss = loss + cfg.response_distance * self.response_distance(y_gen, y_real, cf)
        if not (cfg.response_conditional or cfg.shape_score > 0):
            return loss
        logs_a = getattr(self, "generated_layer_logs", None)  # the head of y_gen's generator pass
        y_b = self.generate_y(batch.randn(cfg.latent_dim), cf)
        if cfg.response_conditional:
            loss = loss + cfg.response_distance * self.response_score(logs_a, self.generated_layer_logs, y_real)
        if cfg.shape_score > 0:
            loss = loss + cfg.shape_score * self.shape_score(y_gen, y_b, y_real)
        return loss
