"""``bibae``: the Bounded-Information-Bottleneck autoencoder of the ILD photon studies
(seeds/bibae-ild-multiparameter.txt; Buhmann et al., "Getting high" and "Decoding photons"), scaled down for CPU
training.

The pieces, as the talk lists them:

* a **3D convolutional encoder** (shower, conditions) -> latent mean and log-variance, and a **3D convolutional
  decoder** (latent, conditions) -> shower; the conditions are the base class's standardised features (energy,
  angle, impact offsets, particle), fed to the decoder by FiLM (a per-channel scale and shift of every block);
* **adversarial critics instead of a pixel-wise loss**: the *main critic* sees the input shower beside a candidate
  (the input itself, or its reconstruction) with the conditions and learns to tell them apart, a learned distance
  in place of an MSE that sparse showers defeat; the *dual critic* sees a sparsity-sensitive transform of one
  shower, its ``sorted_cells`` largest cell energies in decreasing order (log-compressed), where a smeared or
  speckled shower stands out; either or both can be **reset** (re-initialised, optimiser state cleared) every
  ``critic_reset_every`` steps (``reset_critic``), as the talk's resetting critics against sparsity artefacts;
* **latent regularisation**: a *latent critic* (encoded latents vs N(0, 1)), an MMD between them, and a small KL
  term (the bounded information bottleneck);
* **batch statistics** against outliers and mode collapse: a sorted-kernel MMD between the cell-energy spectra of
  the input and reconstructed batches (all cells of the batch, ``sorted_cells`` per shower, on the MIP scale
  log1p(E / ``mip_mev``)), and an MMD on the per-shower (soft) number of hits and visible energy;
* the **post-processor**: 3D convolutions with kernel size 1 on the decoder output (every cell on its own, with
  the conditions), a residual on the log-compressed energy of the decoder's hit cells (empty cells stay empty),
  **trained second**: from ``post_start_step`` on, the encoder, decoder and critics are frozen and only the
  post-processor trains, with an MSE to the input shower and the sorted-kernel MMD of the cell energies, which is
  what restores the MIP peak;
* **latent sampling by a density estimator**: a small conditional normalising flow (``flow_blocks`` affine
  coupling blocks) fitted to the encoded training latents instead of sampling N(0, 1). It is fitted in the second
  phase too: every step from ``post_start_step`` on also takes one maximum-likelihood step of the flow on the
  encoder's latents of the batch (the encoder is frozen by then, so the targets hold still). Its last layers start
  at zero, so before that phase the flow is the identity and sampling falls back to the N(0, 1) prior.

The noise contract: ``draw_noise`` gives the flow's base noise u ~ N(0, 1) (n, ``latent_dim``), and ``decode`` is
the deterministic chain u -> flow inverse -> latent -> decoder -> post-processor -> MeV, so ONNX export and
save/load reproduce it exactly. The flow and the post-processor are ordinary submodules: they live in
``model.safetensors`` with everything else (no pickle). Train with ``select = "last"`` (configs/bibae.toml): the
validation-best model of the first phase has no post-processor or flow yet.

Cells are represented as in ``wgan``/``gan3d`` (:mod:`caloforge.models.logcells`): y = log1p(E_cell / (norm_fraction
E_inc)) / y_scale, images of the 30 x 30 x 30 shower-axis frame on the house detector. All critics use the
non-saturating binary cross-entropy of ``gan3d`` (no gradient penalty: a double backward through 3D convolutions is
too dear on a CPU). The seed's BIB-AE is far larger (and was trained on GPUs for days) on a fixed (30, 60, 30) grid;
see docs/models.md for what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from caloforge.detector import Detector
from caloforge.models.base import ModelConfig, ShowerModel, TrainBatch
from caloforge.models.logcells import LogCells


@dataclass
class BIBAEConfig(ModelConfig):
    """Architecture, loss weights and the two training phases of the BIB-AE."""

    latent_dim: int = 24
    enc_channels: int = 8
    dec_channels: int = 8
    critic_channels: int = 8
    hidden: int = 64  # dense widths of the encoder head and the critics
    sorted_cells: int = 512  # cells per shower in the dual critic and the sorted-kernel MMD
    post_channels: int = 16
    post_layers: int = 3
    flow_blocks: int = 4
    flow_hidden: int = 64
    post_start_step: int = 2000  # from this step on only the post-processor and the latent flow train
    adv_weight: float = 1.0
    dual_weight: float = 1.0
    latent_adv_weight: float = 0.1
    latent_mmd_weight: float = 1.0
    kld_weight: float = 0.01
    stats_weight: float = 1.0  # batch statistics: sorted-kernel MMD of cell energies, MMD of hits and energy sum
    post_mse_weight: float = 1.0
    post_mmd_weight: float = 1.0
    critic_reset_every: int = 0  # 0: never reset a critic
    reset_critic: str = "dual"
    mmd_band: int = 8  # sorted-kernel MMD: compare values up to this many ranks apart
    mip_mev: float = 0.1  # the energy scale of the cell-energy MMDs: log1p(E / mip_mev)
    hit_softness: float = 0.003  # soft hit count: tanh(y / hit_softness)
    out_bias_init: float = -0.05
    norm_fraction: float = 1e-5
    beta1: float = 0.5
    beta2: float = 0.999
    # Which cells of the decoder's upsampled grid (4 x the base grid, up to 3 cells larger than the readout) are kept:
    # False, the first ones (the stop-17/26 models: the grid is not mirror-symmetric about the readout's centre, and
    # those models' centroids sit on the + side); True, the central ones (stop 26's lead; BENCHMARKS.md).
    centre_crop: bool = False

    bounds: ClassVar[dict[str, tuple]] = {
        "latent_dim": (1, 512), "enc_channels": (1, 128), "dec_channels": (1, 128), "critic_channels": (1, 128),
        "hidden": (1, 4096), "sorted_cells": (1, 100000), "post_channels": (1, 512), "post_layers": (1, 16),
        "flow_blocks": (1, 32), "flow_hidden": (1, 4096), "post_start_step": (0, 10**9),
        "adv_weight": (0.0, 1e6), "dual_weight": (0.0, 1e6), "latent_adv_weight": (0.0, 1e6),
        "latent_mmd_weight": (0.0, 1e6), "kld_weight": (0.0, 1e6), "stats_weight": (0.0, 1e6),
        "post_mse_weight": (0.0, 1e6), "post_mmd_weight": (0.0, 1e6), "critic_reset_every": (0, 10**9),
        "reset_critic": ("main", "dual", "both"), "mmd_band": (0, 10000), "mip_mev": (1e-6, 1e6),
        "hit_softness": (1e-6, 1.0), "out_bias_init": (-1e3, 1e3), "norm_fraction": (1e-12, 1.0),
        "beta1": (0.0, 0.999999), "beta2": (0.0, 0.999999),
    }

    def weight_estimate(self) -> int:  # for a 30 x 30 x 30 image
        e, g, c, h, d = self.enc_channels, self.dec_channels, self.critic_channels, self.hidden, self.latent_dim
        conv = 27 * (e + 2 * e * e + 8 * e * e) + 8 * (4 * g * g + 2 * g * g) + 27 * (4 * g * g + g) \
            + 2 * 27 * (2 * c + 8 * c * c)
        dense = (4 * e + 4 * c) * 64 * h + (d + 16) * 2 * g * 512 + self.sorted_cells * h + 4 * h * h
        flow = self.flow_blocks * (self.flow_hidden * (d + 16) + self.flow_hidden ** 2 + self.flow_hidden * d)
        return conv + dense + flow + self.post_layers * self.post_channels ** 2


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.2)


def _conv_stack(shape: tuple[int, int, int], in_ch: int, ch: int) -> tuple[nn.Sequential, int]:
    """Three stride-2 3D convolutions (ch, 2 ch, 4 ch); returns the stack and its flattened output size."""
    net = nn.Sequential(nn.Conv3d(in_ch, ch, 3, stride=2, padding=1), _lrelu(),
                        nn.Conv3d(ch, 2 * ch, 3, stride=2, padding=1), _lrelu(),
                        nn.Conv3d(2 * ch, 4 * ch, 3, stride=2, padding=1), _lrelu())
    with torch.no_grad():
        n_flat = net(torch.zeros(1, in_ch, *shape)).numel()
    return net, n_flat


class _Encoder(nn.Module):
    """(image, conditions) -> latent mean and log-variance."""

    def __init__(self, shape: tuple[int, int, int], cfg: BIBAEConfig, n_cond: int):
        super().__init__()
        self.conv, n_flat = _conv_stack(shape, 1, cfg.enc_channels)
        self.head = nn.Sequential(nn.Linear(n_flat + n_cond, cfg.hidden), _lrelu(), nn.Linear(cfg.hidden,
                                                                                              2 * cfg.latent_dim))

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head(torch.cat([self.conv(y[:, None]).flatten(1), c], dim=1))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)


class _Decoder(nn.Module):
    """(latent, conditions) -> dense -> (2g, base) -> [transposed conv3d x2, conv3d, FiLM(conditions), LeakyReLU]
    -> [transposed conv3d x2, crop, FiLM, LeakyReLU] -> conv3d -> ReLU (empty cells are exact zeros). The
    stride-2 transposed convolutions upsample and mix channels in one step, a 27th of a 3x3x3 convolution's cost
    at full resolution (what makes the decoder trainable on a CPU)."""

    def __init__(self, shape: tuple[int, int, int], cfg: BIBAEConfig, n_cond: int):
        super().__init__()
        g = cfg.dec_channels
        self.shape, self.g = shape, g
        self.base = tuple(max(2, math.ceil(s / 4)) for s in shape)
        starts = [(4 * b - s) // 2 if cfg.centre_crop else 0 for b, s in zip(self.base, shape)]  # first cell kept
        self.crop = tuple(slice(a, a + s) for a, s in zip(starts, shape))
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim + n_cond, 2 * g * math.prod(self.base)), _lrelu())
        self.up1 = nn.ConvTranspose3d(2 * g, 2 * g, 2, stride=2)
        self.conv1 = nn.Conv3d(2 * g, 2 * g, 3, padding=1)
        self.up2 = nn.ConvTranspose3d(2 * g, g, 2, stride=2)
        self.film = nn.Linear(n_cond, 2 * (2 * g + g))  # scale and shift of both blocks' channels
        self.out = nn.Conv3d(g, 1, 3, padding=1)
        nn.init.constant_(self.out.bias, cfg.out_bias_init)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = self.g
        s1, b1, s2, b2 = self.film(c).split([2 * g, 2 * g, g, g], dim=1)
        h = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], 2 * g, *self.base)
        h = self.conv1(F.leaky_relu(self.up1(h), 0.2))
        h = F.leaky_relu(h * (1 + s1[:, :, None, None, None]) + b1[:, :, None, None, None], 0.2)
        h = self.up2(h)[(slice(None), slice(None), *self.crop)]
        h = F.leaky_relu(h * (1 + s2[:, :, None, None, None]) + b2[:, :, None, None, None], 0.2)
        return F.relu(self.out(h)).squeeze(1)


class _PostProcessor(nn.Module):
    """Kernel-size-1 3D convolutions: each cell's energy (and the conditions) -> a correction of that cell; hit
    cells only (the decoder decides which cells are hit). A kernel-size-1 convolution is a dense map of the
    channels of each cell, which is how it is computed here (channels last: ``nn.Linear``, several times faster
    on a CPU than ``nn.Conv3d`` with kernel 1, the same numbers). The last layer starts at zero: the identity."""

    def __init__(self, cfg: BIBAEConfig, n_cond: int):
        super().__init__()
        h = cfg.post_channels
        self.inp = nn.Linear(1, h)
        self.cond = nn.Linear(n_cond, h)  # the broadcast condition channels' share of the first layer
        self.hidden = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.post_layers - 1))
        self.out = nn.Linear(h, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _cells(self, x: torch.Tensor, cond_term: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.inp(x) + cond_term, 0.2)
        for layer in self.hidden:
            h = F.leaky_relu(layer(h), 0.2)
        return F.relu(x + self.out(h))

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Every cell (the exported graph has no data-dependent shapes)."""
        x = y[..., None]  # (n, L, X, Y, 1): cells x channels
        return (self._cells(x, self.cond(c)[:, None, None, None, :]) * (x > 0).to(x.dtype)).squeeze(-1)

    def hit_cells(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The same numbers as ``forward``, computed on the hit cells only (training: a few % of the cells)."""
        flat = y.reshape(y.shape[0], -1)
        row, col = flat.nonzero(as_tuple=True)
        out = torch.zeros_like(flat)
        out[row, col] = self._cells(flat[row, col][:, None], self.cond(c)[row]).squeeze(1)
        return out.reshape(y.shape)


class _ImageCritic(nn.Module):
    """3D convolutions on ``in_ch`` image channels, then a dense head with the conditions -> one logit."""

    def __init__(self, shape: tuple[int, int, int], cfg: BIBAEConfig, n_cond: int, in_ch: int):
        super().__init__()
        self.conv, n_flat = _conv_stack(shape, in_ch, cfg.critic_channels)
        self.head = nn.Sequential(nn.Linear(n_flat + n_cond, cfg.hidden), _lrelu(), nn.Linear(cfg.hidden, 1))

    def forward(self, images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(images).flatten(1), c], dim=1)).squeeze(1)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), _lrelu(), nn.Linear(hidden, hidden), _lrelu(),
                         nn.Linear(hidden, n_out))


class _VectorCritic(nn.Module):
    """A dense critic of a vector (the sorted cell energies, or a latent) and the conditions -> one logit."""

    def __init__(self, n_in: int, hidden: int, n_cond: int):
        super().__init__()
        self.net = _mlp(n_in + n_cond, hidden, 1)

    def forward(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([v, c], dim=1)).squeeze(1)


class _Coupling(nn.Module):
    """An affine coupling block: the second half of the latent is scaled and shifted given the first and the
    conditions (log-scales bounded by tanh). Starts as the identity."""

    def __init__(self, dim: int, hidden: int, n_cond: int):
        super().__init__()
        self.k = dim // 2
        self.net = _mlp(self.k + n_cond, hidden, 2 * (dim - self.k))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _params(self, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(torch.cat([a, c], dim=1)).chunk(2, dim=1)
        return 2.0 * torch.tanh(s / 2.0), t

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> base; returns the log-determinant too."""
        a, b = z[:, :self.k], z[:, self.k:]
        s, t = self._params(a, c)
        return torch.cat([a, b * torch.exp(s) + t], dim=1), s.sum(1)

    def inverse(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a, b = u[:, :self.k], u[:, self.k:]
        s, t = self._params(a, c)
        return torch.cat([a, (b - t) * torch.exp(-s)], dim=1)


class _LatentFlow(nn.Module):
    """The conditional density estimator of the latent space: affine couplings with the latent reversed between
    blocks (a fixed permutation), base N(0, 1)."""

    def __init__(self, dim: int, blocks: int, hidden: int, n_cond: int):
        super().__init__()
        self.blocks = nn.ModuleList(_Coupling(dim, hidden, n_cond) for _ in range(blocks))
        self.dim = dim

    def log_prob(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        logdet = torch.zeros(z.shape[0], device=z.device)
        for block in self.blocks:
            z, ld = block(z, c)
            z = z.flip(1)
            logdet = logdet + ld
        return -0.5 * (z ** 2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def inverse(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            u = block.inverse(u.flip(1), c)
        return u


# ---- the kernel distances -------------------------------------------------------------------------------
def _rbf(d2: torch.Tensor, widths: tuple[float, ...]) -> torch.Tensor:
    return sum(torch.exp(-d2 / (2 * w * w)) for w in widths)


def mmd(a: torch.Tensor, b: torch.Tensor, widths: tuple[float, ...]) -> torch.Tensor:
    """Squared maximum mean discrepancy of two samples (n, d) and (m, d), Gaussian kernels of several widths."""
    kaa = _rbf(torch.cdist(a, a).pow(2), widths).mean()
    kbb = _rbf(torch.cdist(b, b).pow(2), widths).mean()
    kab = _rbf(torch.cdist(a, b).pow(2), widths).mean()
    return kaa + kbb - 2 * kab


def sorted_mmd(a: torch.Tensor, b: torch.Tensor, band: int, widths: tuple[float, ...]) -> torch.Tensor:
    """The sorted-kernel MMD of two equally long sets of values ("Getting high"): both sorted, and the kernel
    evaluated only between values at most ``band`` ranks apart, so it costs O(n band) instead of O(n^2) and can
    take every cell of a batch. With ``band`` >= n it is the ordinary MMD."""
    a, b = torch.sort(a.reshape(-1)).values, torch.sort(b.reshape(-1)).values
    n = a.numel()
    band = min(band, n - 1)
    total = a.new_zeros(())
    count = 0
    for d in range(-band, band + 1):
        lo, hi = max(0, -d), min(n, n - d)
        xa, xb = a[lo:hi], b[lo:hi]
        ya, yb = a[lo + d:hi + d], b[lo + d:hi + d]
        total = total + (_rbf((xa - ya) ** 2, widths) + _rbf((xb - yb) ** 2, widths)
                         - 2 * _rbf((xa - yb) ** 2, widths)).sum()
        count += hi - lo
    return total / count


LATENT_WIDTHS = (0.5, 1.0, 2.0, 4.0)
CELL_WIDTHS = (0.05, 0.2, 1.0)
STAT_WIDTHS = (0.1, 0.3, 1.0)


class BIBAE(LogCells, ShowerModel):
    """Bounded-information-bottleneck autoencoder with post-processor and latent flow (module docstring)."""

    family = "bibae"
    Config = BIBAEConfig
    sample_chunk = 256

    def __init__(self, detector: Detector, n_cells: int | None = None, config: BIBAEConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        nc = self.n_cond_features
        self.register_buffer("y_scale", torch.tensor(1.0))
        self.k_sorted = min(cfg.sorted_cells, self.n_cells)
        self.encoder = _Encoder(self.shape, cfg, nc)
        self.decoder = _Decoder(self.shape, cfg, nc)
        self.post = _PostProcessor(cfg, nc)
        self.flow = _LatentFlow(cfg.latent_dim, cfg.flow_blocks, cfg.flow_hidden, nc)
        self.critic = _ImageCritic(self.shape, cfg, nc, 2)
        self.dual_critic = _VectorCritic(self.k_sorted, cfg.hidden, nc)
        self.latent_critic = _VectorCritic(cfg.latent_dim, cfg.hidden, nc)

    def _fit_preprocessing(self, data: Any) -> None:
        self.fit_log_scale(data)

    # ---- sampling -----------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        return [((n, self.config.latent_dim), "normal")]

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        cf = self.condition_features(cond)
        z = self.flow.inverse(noise[0], cf)
        y = self.post(self.decoder(z, cf), cf)
        return self.from_image(y.clamp(max=1.0), cond[:, 0])

    # ---- representations for the critics and the batch statistics --------------------------------------------
    def _sorted(self, y: torch.Tensor) -> torch.Tensor:
        """The ``sorted_cells`` largest cells of each shower, in decreasing order (n, k), log-compressed y."""
        return torch.topk(y.flatten(1), self.k_sorted, dim=1).values

    def _mip_scale(self, y_sorted: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Sorted cells on the MIP scale log1p(E_cell / mip_mev), E_cell in MeV."""
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        e = self.cell_fractions(y_sorted) * energies.float()[:, None]
        return torch.log1p(e / cfg.mip_mev)

    def _shower_stats(self, y: torch.Tensor) -> torch.Tensor:
        """Per shower: log of the soft number of hits and of the visible energy fraction (n, 2)."""
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        hits = torch.tanh(y / cfg.hit_softness).flatten(1).sum(1)
        visible = self.cell_fractions(y).flatten(1).sum(1)
        return torch.stack([torch.log1p(hits), torch.log(visible + 1e-6)], dim=1)

    def batch_statistics(self, y_real: torch.Tensor, y_fake: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Sorted-kernel MMD of the cell-energy spectra and MMD of (hits, visible energy), real vs generated."""
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        cells = sorted_mmd(self._mip_scale(self._sorted(y_real), energies),
                           self._mip_scale(self._sorted(y_fake), energies), cfg.mmd_band, CELL_WIDTHS)
        return cells + mmd(self._shower_stats(y_real), self._shower_stats(y_fake), STAT_WIDTHS)

    # ---- training -----------------------------------------------------------------------------------
    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        betas = (cfg.beta1, cfg.beta2)
        ae = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return {"autoencoder": torch.optim.Adam(ae, lr=lr, betas=betas),
                "critic": torch.optim.Adam(self.critic.parameters(), lr=lr, betas=betas),
                "dual_critic": torch.optim.Adam(self.dual_critic.parameters(), lr=lr, betas=betas),
                "latent_critic": torch.optim.Adam(self.latent_critic.parameters(), lr=lr, betas=betas),
                "post": torch.optim.Adam(self.post.parameters(), lr=lr),
                "flow": torch.optim.Adam(self.flow.parameters(), lr=lr)}

    def reset_critics(self, optimizers: dict[str, torch.optim.Optimizer]) -> list[str]:
        """Re-initialise the critic(s) named by ``reset_critic`` and clear their optimiser state."""
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        names = ["critic", "dual_critic"] if cfg.reset_critic == "both" else \
            ["critic" if cfg.reset_critic == "main" else "dual_critic"]
        for name in names:
            module: nn.Module = getattr(self, name)
            for m in module.modules():
                if isinstance(m, nn.Linear | nn.Conv3d | nn.ConvTranspose3d):
                    m.reset_parameters()
            opt = optimizers.get(name)
            if opt is not None:
                for p in module.parameters():
                    opt.state.pop(p, None)
        return names

    @staticmethod
    def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.Tensor], batch: TrainBatch,
              grad_clip: float) -> None:
        from caloforge.distributed import reduce_gradients

        opt.zero_grad(set_to_none=True)
        loss.backward()
        reduce_gradients(params, batch.share)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()

    def _encode(self, y: torch.Tensor, cf: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, ...]:
        mu, logvar = self.encoder(y, cf)
        z = mu + torch.exp(0.5 * logvar) * batch.randn(mu.shape[1])
        return z, mu, logvar

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        """Before ``post_start_step``: one update of the three critics, then one of the encoder and decoder.
        From it on: one update of the post-processor and one maximum-likelihood step of the latent flow."""
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        if step >= cfg.post_start_step:
            return self._second_phase(batch, optimizers, grad_clip)
        out: dict[str, float] = {}
        if cfg.critic_reset_every and step > 0 and step % cfg.critic_reset_every == 0:
            self.reset_critics(optimizers)
            out["reset"] = 1.0
        return {**out, **self._first_phase(batch, optimizers, grad_clip)}

    def _first_phase(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer],
                     grad_clip: float) -> dict[str, float]:
        from caloforge.distributed import weighted_sum

        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        bce = F.binary_cross_entropy_with_logits
        cf = self.condition_features(batch.cond)
        y = self.to_image(batch.showers, batch.energies)
        z, mu, logvar = self._encode(y, cf, batch)
        y_rec = self.decoder(z, cf)
        # The critics: the input beside itself vs beside its reconstruction; sorted cells; latents vs N(0, 1).
        prior = batch.randn(cfg.latent_dim)
        real_pair, fake_pair = torch.stack([y, y], 1), torch.stack([y, y_rec.detach()], 1)
        d_real, d_fake = self.critic(real_pair, cf), self.critic(fake_pair, cf)
        s_real, s_fake = self.dual_critic(self._sorted(y), cf), self.dual_critic(self._sorted(y_rec.detach()), cf)
        l_real, l_fake = self.latent_critic(prior, cf), self.latent_critic(z.detach(), cf)
        ones, zeros = torch.ones_like(d_real), torch.zeros_like(d_real)
        loss_c = bce(d_real, ones) + bce(d_fake, zeros)
        loss_s = bce(s_real, ones) + bce(s_fake, zeros)
        loss_l = bce(l_real, ones) + bce(l_fake, zeros)
        out = {"critic": float(loss_c.detach()), "dual_critic": float(loss_s.detach()),
               "latent_critic": float(loss_l.detach())}
        if not torch.isfinite(weighted_sum((loss_c + loss_s + loss_l).detach(), batch.share)):
            return out
        for loss, name in ((loss_c, "critic"), (loss_s, "dual_critic"), (loss_l, "latent_critic")):
            self._step(loss, optimizers[name], list(getattr(self, name).parameters()), batch, grad_clip)
        # The autoencoder: fool the critics, keep the latents near N(0, 1), match the batch statistics.
        adv = bce(self.critic(torch.stack([y, y_rec], 1), cf), ones)
        dual = bce(self.dual_critic(self._sorted(y_rec), cf), ones)
        latent_adv = bce(self.latent_critic(z, cf), ones)
        latent_mmd = mmd(z, prior, LATENT_WIDTHS)
        kld = 0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar).sum(1).mean()
        stats = self.batch_statistics(y, y_rec, batch.energies)
        loss = (cfg.adv_weight * adv + cfg.dual_weight * dual + cfg.latent_adv_weight * latent_adv
                + cfg.latent_mmd_weight * latent_mmd + cfg.kld_weight * kld + cfg.stats_weight * stats)
        ae = list(self.encoder.parameters()) + list(self.decoder.parameters())
        self._step(loss, optimizers["autoencoder"], ae, batch, grad_clip)
        out.update(ae=float(loss.detach()), adv=float(adv.detach()), dual=float(dual.detach()),
                   latent_mmd=float(latent_mmd.detach()), kld=float(kld.detach()), stats=float(stats.detach()))
        return out

    def _second_phase(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer],
                      grad_clip: float) -> dict[str, float]:
        """Frozen encoder and decoder; the post-processor learns the cell energies, the flow the latents."""
        cfg: BIBAEConfig = self.config  # type: ignore[assignment]
        cf = self.condition_features(batch.cond)
        y = self.to_image(batch.showers, batch.energies)
        with torch.no_grad():
            z, _, _ = self._encode(y, cf, batch)
            y_dec = self.decoder(z, cf)
        y_post = self.post.hit_cells(y_dec, cf)
        mse = F.mse_loss(y_post, y)
        cells = sorted_mmd(self._mip_scale(self._sorted(y), batch.energies),
                           self._mip_scale(self._sorted(y_post), batch.energies), cfg.mmd_band, CELL_WIDTHS)
        loss = cfg.post_mse_weight * mse + cfg.post_mmd_weight * cells
        nll = -self.flow.log_prob(z, cf).mean() / cfg.latent_dim
        out = {"post": float(loss.detach()), "post_mse": float(mse.detach()), "post_mmd": float(cells.detach()),
               "flow_nll": float(nll.detach())}
        if not (math.isfinite(out["post"]) and math.isfinite(out["flow_nll"])):
            return out
        self._step(loss, optimizers["post"], list(self.post.parameters()), batch, grad_clip)
        self._step(nll, optimizers["flow"], list(self.flow.parameters()), batch, grad_clip)
        return out
