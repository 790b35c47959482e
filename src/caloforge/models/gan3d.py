"""``gan3d``: the 3D convolutional auxiliary-classifier GAN of the LCD/CLIC 3dGAN (seeds/3dgan-lcd-calorimeter.txt).

As the talk describes it:

* the shower is a 3D image (layers x cells in x x cells in y), and both networks are 3D convolutional;
* the **generator** maps (noise, conditions) through a dense layer to a small 3D volume, then upsamples with 3D
  convolutions, LeakyReLU and batch normalisation, with **no batch norm in the last step** (a ReLU output, so empty
  cells are exact zeros);
* the **discriminator** uses 3D convolutions with **different filter sizes along z (depth) and x, y**, LeakyReLU,
  batch normalisation and dropout, strides instead of pooling (**no pooling**);
* it is an **auxiliary-classifier GAN**: besides real/fake, the discriminator **regresses the primary energy**
  (and the angle when trained on angled showers), **checks the total deposited energy** (the sum of the cells,
  compared with what the conditions imply), and **classifies the particle type** (photon or electron) when the
  training set has several; the generator is trained to make all of these come out right.

The losses follow the 3dGAN recipe: binary cross-entropy for real/fake and the particle class, a mean absolute
percentage error for the energy, and a mean absolute error on the total deposited energy, weighted by
``adv_weight``, ``energy_weight``, ``ecal_weight``, ``class_weight``. Cells are represented as in ``wgan``:
y = log1p(E_cell / (norm_fraction E_inc)) / y_scale, or with ``cell_power`` p > 0 the power law
(E_cell / (norm_fraction E_inc))^p / y_scale (not in the seed; ``caloforge.models.logcells``). The 3dGAN crops
25 x 25 x 25 from the CLIC ECAL; on the house detector the model's image is the 30 x 30 x 30 shower-axis frame
(docs/models.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caloforge.detector import Detector
from caloforge.models.base import ModelConfig, ShowerModel, TrainBatch
from caloforge.models.logcells import LogCells


@dataclass
class GAN3DConfig(ModelConfig):
    """Architecture and loss weights of the 3dGAN."""

    latent_dim: int = 64
    gen_channels: int = 16
    disc_channels: int = 8
    dropout: float = 0.2
    adv_weight: float = 2.0  # the 3dGAN weights: real/fake 2, energy 0.1, ecal sum 0.1 (then tuned)
    energy_weight: float = 0.1
    ecal_weight: float = 0.1
    class_weight: float = 0.1
    label_smoothing: float = 0.1  # real labels 0.9 for the discriminator (one-sided)
    out_bias_init: float = -0.1
    norm_fraction: float = 1e-5
    beta1: float = 0.5
    beta2: float = 0.999
    cell_power: float = 0.0  # 0: log-compressed cells; p > 0: y = (E_cell / unit)^p / y_scale (models/logcells.py)

    bounds: ClassVar[dict[str, tuple]] = {
        "latent_dim": (1, 1024), "gen_channels": (1, 256), "disc_channels": (1, 256), "dropout": (0.0, 0.9),
        "adv_weight": (0.0, 1e6), "energy_weight": (0.0, 1e6), "ecal_weight": (0.0, 1e6), "class_weight": (0.0, 1e6),
        "label_smoothing": (0.0, 0.5), "out_bias_init": (-1e3, 1e3), "norm_fraction": (1e-12, 1.0),
        "beta1": (0.0, 0.999999), "beta2": (0.0, 0.999999), "cell_power": (0.0, 1.0),
    }

    def weight_estimate(self) -> int:  # for a 30 x 30 x 30 image
        g, d = self.gen_channels, self.disc_channels
        return (self.latent_dim + 16) * 2 * g * 512 + 27 * (2 * g * g + g * g) + 75 * (d + 2 * d * d + 4 * d * d) \
            + 4 * d * 64 * 4


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.2)


class _Generator(nn.Module):
    """(noise, conditions) -> dense -> (2g, 8, 8, 8) -> upsample, conv3d, BN, LeakyReLU (x2) -> conv3d -> ReLU."""

    def __init__(self, shape: tuple[int, int, int], cfg: GAN3DConfig, n_cond: int):
        super().__init__()
        g = cfg.gen_channels
        self.shape = shape
        self.base = tuple(max(2, math.ceil(s / 4)) for s in shape)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim + n_cond, 2 * g * math.prod(self.base)), _lrelu())
        self.up1 = nn.Sequential(nn.Conv3d(2 * g + n_cond, 2 * g, 3, padding=1), nn.BatchNorm3d(2 * g), _lrelu())
        self.up2 = nn.Sequential(nn.Conv3d(2 * g + n_cond, g, 3, padding=1), nn.BatchNorm3d(g), _lrelu())
        self.out = nn.Conv3d(g, 1, (3, 3, 3), padding=1)  # the last step: no batch norm
        nn.init.constant_(self.out.bias, cfg.out_bias_init)
        self.g = g

    @staticmethod
    def _with_labels(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, c[:, :, None, None, None].expand(-1, -1, *h.shape[2:])], dim=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], 2 * self.g, *self.base)
        h = self.up1(self._with_labels(F.interpolate(h, scale_factor=2.0, mode="nearest"), c))
        h = self.up2(self._with_labels(F.interpolate(h, scale_factor=2.0, mode="nearest"), c))
        h = h[:, :, :self.shape[0], :self.shape[1], :self.shape[2]]
        return F.relu(self.out(h)).squeeze(1)


class _Discriminator(nn.Module):
    """3D convolutions with different kernel sizes in depth and in x, y; strides, no pooling; four heads."""

    def __init__(self, shape: tuple[int, int, int], cfg: GAN3DConfig, n_aux: int, n_classes: int):
        super().__init__()
        d = cfg.disc_channels
        self.conv = nn.Sequential(
            nn.Conv3d(1, d, (3, 5, 5), stride=1, padding=(1, 2, 2)), _lrelu(), nn.Dropout3d(cfg.dropout),
            nn.Conv3d(d, 2 * d, (3, 5, 5), stride=2, padding=(1, 2, 2)), nn.BatchNorm3d(2 * d), _lrelu(),
            nn.Dropout3d(cfg.dropout),
            nn.Conv3d(2 * d, 4 * d, (5, 3, 3), stride=2, padding=(2, 1, 1)), nn.BatchNorm3d(4 * d), _lrelu(),
            nn.Conv3d(4 * d, 4 * d, (5, 3, 3), stride=2, padding=(2, 1, 1)), _lrelu(),
        )
        with torch.no_grad():
            n_flat = self.conv.eval()(torch.zeros(1, 1, *shape)).numel()
        self.conv.train()
        self.adv = nn.Linear(n_flat, 1)
        self.aux = nn.Linear(n_flat, n_aux)  # energy (and angle) regression
        self.cls = nn.Linear(n_flat, n_classes) if n_classes else None

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.conv(y[:, None]).flatten(1)
        return self.adv(h).squeeze(1), self.aux(h), (self.cls(h).squeeze(1) if self.cls is not None else None)


class GAN3D(LogCells, ShowerModel):
    """3D convolutional auxiliary-classifier GAN (see the module docstring)."""

    family = "gan3d"
    Config = GAN3DConfig
    sample_chunk = 256

    def __init__(self, detector: Detector, n_cells: int | None = None, config: GAN3DConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        self.register_buffer("y_scale", torch.tensor(1.0))
        # the total visible energy per incident energy: log(sum / E) = a + b log(E) (fitted on the training set)
        self.register_buffer("ecal_coef", torch.zeros(2))
        self.aux_features = [i for i, f in enumerate(self.features) if f in ("log_e", "angle")]
        self.class_feature = self.features.index("is_photon") if "is_photon" in self.features else None
        self.generator = _Generator(self.shape, cfg, self.n_cond_features)
        self.discriminator = _Discriminator(self.shape, cfg, len(self.aux_features), 1 if self.class_feature
                                            is not None else 0)

    # ---- representation (caloforge.models.logcells) ---------------------------------------------------
    def _log_ecal(self, y: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """log(total deposited energy / incident energy) of images."""
        return torch.log(self.cell_fractions(y).sum(dim=(1, 2, 3)) + 1e-7)

    def _fit_preprocessing(self, data: Any) -> None:
        total = self.fit_log_scale(data)
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        ok = total > 0
        if ok.sum() >= 2:
            b, a = np.polyfit(np.log(energies[ok]), np.log(total[ok] / energies[ok]), 1) \
                if np.ptp(energies[ok]) > 0 else (0.0, float(np.mean(np.log(total[ok] / energies[ok]))))
            self.ecal_coef.copy_(torch.tensor([a, b], dtype=torch.float32))

    # ---- sampling -----------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        return [((n, cfg.latent_dim), "normal")]

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        y = self.generator(noise[0], self.condition_features(cond))
        return self.from_image(y.clamp(max=1.0), cond[:, 0])

    # ---- training -----------------------------------------------------------------------------------
    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        betas = (cfg.beta1, cfg.beta2)
        return {"generator": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
                "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)}

    def _aux_losses(self, y: torch.Tensor, cond: torch.Tensor, cf: torch.Tensor,
                    aux: torch.Tensor, cls: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Energy (and angle) regression, total deposited energy, particle class: what the conditions imply."""
        target = cf[:, self.aux_features]
        # MAPE on the energy as in the 3dGAN, on standardised labels shifted away from zero (they can be negative)
        losses = {"energy": ((aux - target).abs() / (target.abs() + 1.0)).mean()}
        log_e = torch.log(cond[:, 0].float())
        expected = self.ecal_coef[0] + self.ecal_coef[1] * log_e
        losses["ecal"] = (self._log_ecal(y, cond[:, 0]) - expected).abs().mean()
        if cls is not None and self.class_feature is not None:
            label = (cond[:, 4] == 22).float()
            losses["class"] = F.binary_cross_entropy_with_logits(cls, label)
        return losses

    def _weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        w = {"energy": cfg.energy_weight, "ecal": cfg.ecal_weight, "class": cfg.class_weight}
        return sum(w[k] * v for k, v in losses.items())

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        """One discriminator update (real and generated showers) and one generator update."""
        from caloforge.distributed import reduce_gradients, weighted_sum

        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        cf = self.condition_features(batch.cond)
        y_real = self.to_image(batch.showers, batch.energies)
        real_label = 1.0 - cfg.label_smoothing
        # Discriminator.
        with torch.no_grad():
            y_fake = self.generator(batch.randn(cfg.latent_dim), cf)
        adv_r, aux_r, cls_r = self.discriminator(y_real)
        adv_f, _, _ = self.discriminator(y_fake)
        loss_adv = F.binary_cross_entropy_with_logits(adv_r, torch.full_like(adv_r, real_label)) \
            + F.binary_cross_entropy_with_logits(adv_f, torch.zeros_like(adv_f))
        aux = self._aux_losses(y_real, batch.cond, cf, aux_r, cls_r)
        aux.pop("ecal")  # the sum of a real shower is what it is: nothing to learn
        loss_d = cfg.adv_weight * loss_adv + self._weighted(aux)
        out = {"disc": float(loss_d.detach()), "d_adv": float(loss_adv.detach())}
        if not torch.isfinite(weighted_sum(loss_d.detach(), batch.share)):
            return out
        optimizers["discriminator"].zero_grad(set_to_none=True)
        loss_d.backward()
        reduce_gradients(self.discriminator.parameters(), batch.share)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), grad_clip)
        optimizers["discriminator"].step()
        # Generator: fool the discriminator, and make the auxiliary outputs match the conditions.
        y_gen = self.generator(batch.randn(cfg.latent_dim), cf)
        adv_g, aux_g, cls_g = self.discriminator(y_gen)
        g_adv = F.binary_cross_entropy_with_logits(adv_g, torch.ones_like(adv_g))
        aux_gen = self._aux_losses(y_gen, batch.cond, cf, aux_g, cls_g)
        loss_g = cfg.adv_weight * g_adv + self._weighted(aux_gen)
        optimizers["generator"].zero_grad(set_to_none=True)
        loss_g.backward()
        reduce_gradients(self.generator.parameters(), batch.share)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), grad_clip)
        optimizers["generator"].step()
        out.update(gen=float(loss_g.detach()), ecal=float(aux_gen["ecal"].detach()),
                   energy=float(aux_gen["energy"].detach()))
        return out
