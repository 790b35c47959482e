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
from caloforge.models.flatgan import (
    LAYER_LOG_OFFSET,
    ConditionalFlow,
    fit_flow,
    flow_step,
    flow_targets,
)
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
    # Not in the seed: sampling rescales each generated layer to the energy drawn from a small conditional flow fitted
    # by likelihood on the training showers' layer energies (flatgan.ConditionalFlow), so that the visible energy
    # and the longitudinal profile are a fitted density rather than what the adversarial game leaves. The flow is
    # fitted before the GAN trains (layer_flow_fit_steps; then one likelihood step per training step, as in densewgan)
    # or afterwards on a trained model (scripts/attach_layer_flow.py); the generator and discriminator never see it.
    layer_flow: bool = False
    layer_flow_fit_steps: int = 5000
    # With layer_flow: the flow's draw is coupled to the generator's own layer energies instead of fresh noise (their
    # latent, whitened at the conditions: GAN3D.fit_flow_coupling), so that a layer the generator made heavy stays
    # heavy. Fitted on a trained model only (scripts/attach_layer_flow.py --couple N).
    layer_flow_coupling: bool = False

    bounds: ClassVar[dict[str, tuple]] = {
        "latent_dim": (1, 1024), "gen_channels": (1, 256), "disc_channels": (1, 256), "dropout": (0.0, 0.9),
        "adv_weight": (0.0, 1e6), "energy_weight": (0.0, 1e6), "ecal_weight": (0.0, 1e6), "class_weight": (0.0, 1e6),
        "label_smoothing": (0.0, 0.5), "out_bias_init": (-1e3, 1e3), "norm_fraction": (1e-12, 1.0),
        "beta1": (0.0, 0.999999), "beta2": (0.0, 0.999999), "cell_power": (0.0, 1.0),
        "layer_flow_fit_steps": (0, 10 ** 7),
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
        self.layer_flow: ConditionalFlow | None = None
        if cfg.layer_flow:
            self.enable_layer_flow()
        if cfg.layer_flow_coupling:
            self.enable_flow_coupling()

    # ---- layer energies from a flow (config layer_flow) -------------------------------------------------
    def enable_layer_flow(self) -> None:
        """Add the (unfitted) layer flow and its statistics; sampling uses it from now on."""
        n_d = self.shape[0]
        like = self.y_scale
        self.layer_flow = ConditionalFlow(n_d, self.n_cond_features).to(like.device)
        self.register_buffer("layer_log_mean", torch.zeros(n_d, device=like.device))
        self.register_buffer("layer_log_std", torch.ones(n_d, device=like.device))
        self.register_buffer("layer_log_max", torch.zeros(n_d, device=like.device))  # the training maximum
        self.config.layer_flow = True  # type: ignore[attr-defined]

    def layer_fractions(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Showers (n, n_cells) MeV in the model's frame -> each image layer's energy over E_inc (n, depth)."""
        x = showers.reshape(len(showers), *self.shape).float()
        return x.sum(dim=(2, 3)) / energies.float()[:, None]

    def fit_layer_flow(self, frac: torch.Tensor, cond: torch.Tensor, steps: int,
                       generator: torch.Generator | None = None, progress: bool = False) -> float:
        """Fit the layer flow by likelihood on layer fractions ``frac`` (n, depth) at raw conditions ``cond`` (Adam,
        the learning rate from 1e-3 to 1e-5 on a cosine); returns the final mean negative log-likelihood per shower."""
        if self.layer_flow is None:
            raise ValueError("gan3d: no layer flow (config layer_flow = false)")
        logs = torch.log(frac.double() + LAYER_LOG_OFFSET)
        std = logs.std(0) if len(logs) > 1 else torch.ones(logs.shape[1], dtype=torch.float64)
        self.layer_log_mean.copy_(logs.mean(0).float())
        self.layer_log_std.copy_(torch.where(std > 1e-3, std, torch.full_like(std, 1e-3)).float())
        self.layer_log_max.copy_(logs.max(0).values.float())
        with torch.enable_grad():
            return fit_flow(self.layer_flow, frac.float(), self.condition_features(cond.float()).detach(),
                            self.layer_log_mean, self.layer_log_std, steps, generator=generator, progress=progress,
                            lr_final=1e-5)

    def layer_flow_nll(self, frac: torch.Tensor, cond: torch.Tensor) -> float:
        """Mean negative log-likelihood per shower of layer fractions ``frac`` at raw conditions ``cond`` under the
        layer flow (held-out showers: the score that chooses a fit), empty layers at the middle of their band."""
        assert self.layer_flow is not None
        with torch.no_grad():
            return float(-self.layer_flow.log_prob(self._flow_rows(frac), self.condition_features(cond.float())).mean())

    def enable_flow_coupling(self) -> None:
        """Add the (unfitted) coupling of the layer flow to the generator's layer energies (config
        ``layer_flow_coupling``): z -> (z - [cf, cf^2] A - b) W^T on the flow's latent of the generated layers."""
        if self.layer_flow is None:
            raise ValueError("gan3d: layer_flow_coupling needs layer_flow = true")
        n_d, like = self.shape[0], self.y_scale
        self.register_buffer("coupling_a", torch.zeros(2 * self.n_cond_features, n_d, device=like.device))
        self.register_buffer("coupling_b", torch.zeros(n_d, device=like.device))
        self.register_buffer("coupling_w", torch.eye(n_d, device=like.device))
        self.config.layer_flow_coupling = True  # type: ignore[attr-defined]

    def _generator_latent(self, frac: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """The flow's latent of generated layer fractions (n, depth), an empty layer at the middle of the band where
        the training's empty layers are spread."""
        assert self.layer_flow is not None
        return self.layer_flow.latent(self._flow_rows(frac), cf)[0]

    def _flow_rows(self, frac: torch.Tensor) -> torch.Tensor:
        """Layer fractions (n, depth) -> the flow's standardised rows (flatgan.flow_targets with u = 1/2)."""
        return flow_targets(frac.float(), torch.full_like(frac.float(), 0.5), self.layer_log_mean, self.layer_log_std)

    def fit_flow_coupling(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                          chunk: int = 256) -> dict[str, float]:
        """Fit the coupling on the generator's showers at the raw conditions ``cond``: their layer energies' latent
        z under the flow, regressed on the condition features and their squares (z = [cf, cf^2] A + b + L e, L the
        Cholesky factor of the residuals' covariance), and W = L^-1, so that (z - [cf, cf^2] A - b) W^T is a standard
        normal draw as far as its first two moments go. A generator whose layer energies had the data's law would
        need none (A = 0, b = 0, W = 1). Returns the size of the correction (mean |b|, the residual spread)."""
        if self.layer_flow is None:
            raise ValueError("gan3d: no layer flow (config layer_flow = false)")
        if not self.config.layer_flow_coupling:  # type: ignore[attr-defined]
            self.enable_flow_coupling()
        latent_dim = self.config.latent_dim  # type: ignore[attr-defined]
        zs, cfs = [], []
        with torch.no_grad():
            for i in range(0, len(cond), chunk):
                cf = self.condition_features(cond[i:i + chunk].float())
                z = torch.randn(len(cf), latent_dim, generator=generator).to(cf.device)
                y = self.generator(z, cf).clamp(max=1.0)
                zs.append(self._generator_latent(self.cell_fractions(y).sum(dim=(2, 3)), cf).double())
                cfs.append(cf.double())
        z, cf = torch.cat(zs), torch.cat(cfs)
        x = torch.cat([cf, cf * cf], dim=1)
        x_mean, z_mean = x.mean(0), z.mean(0)
        xc, zc = x - x_mean, z - z_mean
        # ridge (1e-3 per shower on roughly unit features): constant or repeated features (a single particle's
        # is_photon, cf^2 = cf of a 0/1 feature) get small coefficients instead of large cancelling ones
        gram = xc.T @ xc + 1e-3 * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        a = torch.linalg.solve(gram, xc.T @ zc)
        res = zc - xc @ a
        cov = res.T @ res / max(len(z) - x.shape[1] - 1, 1)
        chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
        self.coupling_a.copy_(a.float())
        self.coupling_b.copy_((z_mean - x_mean @ a).float())
        self.coupling_w.copy_(torch.linalg.inv(chol).float())
        return {"mean_abs_b": float(self.coupling_b.abs().mean()), "residual_sd": float(cov.diagonal().sqrt().mean())}

    def _with_flow_energies(self, y: torch.Tensor, z: torch.Tensor | None, cf: torch.Tensor) -> torch.Tensor:
        """Generated images y rescaled layer by layer to the flow's energies for noise z (n, depth), or, with the
        coupling (z None), for the generator's own whitened latent; a layer the flow leaves below LAYER_LOG_OFFSET
        of E_inc (where the training's empty layers sit) comes out empty."""
        assert self.layer_flow is not None
        frac = self.cell_fractions(y).sum(dim=(2, 3))
        if z is None:
            shift = torch.cat([cf, cf * cf], dim=1) @ self.coupling_a + self.coupling_b
            z = (self._generator_latent(frac, cf) - shift) @ self.coupling_w.T
        # a draw above the layer's largest training energy is held there: the flow's far tail gave a few showers
        # several times the visible energy
        log_target = self.layer_flow.sample(z, cf) * self.layer_log_std + self.layer_log_mean
        log_target = torch.minimum(log_target, self.layer_log_max)
        target = torch.exp(log_target.clamp(max=0.0)) - LAYER_LOG_OFFSET  # the offset undone: the layers of the
        # house detector hold 1e-6 to 1e-3 of E_inc
        full = (target > 0) & (frac > 0)
        log_factor = torch.where(full, torch.log(target.clamp(min=1e-30)) - torch.log(frac.clamp(min=1e-30)),
                                 torch.zeros_like(frac)).clamp(-30.0, 30.0)
        return self.scale_cells(y, log_factor[:, :, None, None]) * full[:, :, None, None].to(y.dtype)

    # ---- representation (caloforge.models.logcells) ---------------------------------------------------
    def _log_ecal(self, y: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """log(total deposited energy / incident energy) of images."""
        return torch.log(self.cell_fractions(y).sum(dim=(1, 2, 3)) + 1e-7)

    def _fit_preprocessing(self, data: Any) -> None:
        total = self.fit_log_scale(data)
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        if self.layer_flow is not None:  # seeded by torch's global generator (the trainer seeds it)
            frac = torch.cat([self.layer_fractions(torch.as_tensor(np.asarray(data.showers[i:i + 1000])),
                                                   torch.as_tensor(energies[i:i + 1000]))
                              for i in range(0, len(energies), 1000)])
            self.fit_layer_flow(frac, torch.as_tensor(data.conditions.as_array()), self.config.layer_flow_fit_steps)
        ok = total > 0
        if ok.sum() >= 2:
            b, a = np.polyfit(np.log(energies[ok]), np.log(total[ok] / energies[ok]), 1) \
                if np.ptp(energies[ok]) > 0 else (0.0, float(np.mean(np.log(total[ok] / energies[ok]))))
            self.ecal_coef.copy_(torch.tensor([a, b], dtype=torch.float32))

    # ---- sampling -----------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        flow = [((n, self.shape[0]), "normal")] if self.layer_flow is not None and not cfg.layer_flow_coupling else []
        return [((n, cfg.latent_dim), "normal")] + flow

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        cf = self.condition_features(cond)
        y = self.generator(noise[0], cf).clamp(max=1.0)
        if self.layer_flow is not None:
            y = self._with_flow_energies(y, None if self.config.layer_flow_coupling else noise[1], cf)
        return self.from_image(y, cond[:, 0])

    # ---- training -----------------------------------------------------------------------------------
    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        cfg: GAN3DConfig = self.config  # type: ignore[assignment]
        betas = (cfg.beta1, cfg.beta2)
        opts = {"generator": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
                "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)}
        if self.layer_flow is not None:  # the layer flow goes on learning by likelihood: its own Adam
            opts["flow"] = torch.optim.Adam(self.layer_flow.parameters(), lr=lr)
        return opts

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
        if self.layer_flow is not None:  # one likelihood step on the batch's real layer energies
            out["flow_nll"] = flow_step(self.layer_flow, self.layer_fractions(batch.showers, batch.energies), cf,
                                        batch, optimizers["flow"], self.layer_log_mean, self.layer_log_std, grad_clip)
        return out
