"""``cfm``: conditional flow matching on the full cell grid, the diffusion-class fidelity peer (issue 10).

What leads the CaloChallenge today are diffusion and flow-matching models over every cell (CaloDiffusion,
arXiv:2308.03876; CaloDREAM, arXiv:2405.09629). This family is that recipe scaled down to a 2-core CPU:

* **Objective**: rectified flow / conditional flow matching with independent coupling (Lipman et al.
  arXiv:2210.02747, Liu et al. arXiv:2209.03003): x_t = (1 - t) x_0 + t x_1 between Gaussian noise x_0 and the
  preprocessed shower x_1, t ~ U(0, 1), and the network regresses the velocity x_1 - x_0 (mean squared error).
* **Backbone**: a transformer over the calorimeter layers as tokens (CaloDREAM's shape network uses patches; on a CPU
  a layer is one patch): each layer's cells (and its energy channel, below) are embedded linearly with a shared
  matrix plus a learned layer embedding; ``blocks`` pre-norm attention blocks whose layer norms are modulated by
  the time and condition embedding (adaLN, as in DiT); the output maps each token back to ``head_channels``
  numbers per cell, and a small MLP shared by all cells turns (those numbers, the cell's own current value x_t)
  into its velocity. Without that per-cell head every cell's velocity would lie in a ``width``-dimensional
  subspace and could not follow the cell's own noise, which is what decides whether a halo cell ends up hit.
* **Cells** as in CaloDiffusion: a log transform with an offset, then standardised (one mean and scale over all
  cells): y = (log(E_cell / MeV + cell_offset_mev) - mean) / std. The offset is in MeV rather than in units of the
  incident energy (CaloDiffusion divides by it): the MIP peak (about 0.15 MeV) and the hit threshold (0.075 MeV)
  are absolute energies, so empty cells, MIP hits and the cut between them sit at the same place for every shower
  (2.8 log units apart with 0.01 MeV). Generated cells below ``min_hit_mev`` are set to exactly zero.
* **Layer energies**: each token carries one more number, the layer's log(E_layer / E_inc + 1e-6), standardised
  per layer, generated jointly with the cells; the decoder rescales each generated layer to it. The energy response
  (mu90/sigma90) and the longitudinal profile are then one well-scaled number per layer instead of a sum over 900
  exponentiated cells, in which small errors of the hot core cells add up (CaloDREAM generates the layer energies
  with a separate network for the same reason; here one network does both, its loss weighted by
  ``energy_weight``).
* **Sampling**: the ODE dx/dt = v(x, t) from t = 0 to 1 with ``sample_steps`` steps of ``solver`` (``euler``: one
  network evaluation per step; ``midpoint``, ``heun``: two). ``draw_noise`` returns the initial Gaussian, so
  ``decode`` is deterministic. :meth:`CFM.set_sampling` overrides the steps and solver of a loaded model.

No few-step (reflow or consistency) variant yet: see docs/models.md.
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
from caloforge.models.base import ModelConfig, ModelError, ShowerModel, TrainBatch

SOLVERS: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2}  # network evaluations per step
LAYER_OFFSET = 1e-6  # offset of log(E_layer / E_inc): 10-100 keV, below any layer that matters


@dataclass
class CFMConfig(ModelConfig):
    """Architecture, preprocessing and sampling options of the flow-matching model."""

    width: int = 128
    blocks: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    head_channels: int = 2  # hidden units of the per-cell head (the token gives each cell 1 + head_channels numbers)
    cell_offset_mev: float = 0.01
    min_hit_mev: float = 0.005
    energy_weight: float = 1.0
    rescale_layers: bool = True
    sample_steps: int = 16
    solver: str = "midpoint"
    # Tokens: 0 = one token per layer (its 900 cells embedded into ``width`` numbers; the stop-17 model). With
    # ``patch_x`` > 0 the tokens are patches of patch_layers x patch_x x patch_y cells (CaloDREAM's patching) plus one
    # token per layer group for its energies, so that the network can say which cell the core is in (stop 19:
    # a layer token could not; BENCHMARKS.md).
    patch_layers: int = 1
    patch_x: int = 0
    patch_y: int = 0

    bounds: ClassVar[dict[str, tuple]] = {
        "patch_layers": (1, 1000), "patch_x": (0, 1000), "patch_y": (0, 1000),
        "width": (4, 2048), "blocks": (1, 64), "heads": (1, 64), "mlp_ratio": (0.25, 16.0),
        "head_channels": (1, 64), "cell_offset_mev": (1e-9, 1e3),
        "min_hit_mev": (0.0, 1e3), "energy_weight": (0.0, 1e6), "sample_steps": (1, 10000),
        "solver": tuple(SOLVERS),
    }

    def weight_estimate(self) -> int:  # for the house detector's 30 x 900 cells
        d = self.width
        c = 900 if self.patch_x <= 0 else self.patch_layers * self.patch_x * max(self.patch_y, 1)
        per_block = 4 * d * d + 2 * int(self.mlp_ratio * d) * d + 6 * d * d
        return (c + 1) * d + d * (c * (self.head_channels + 1) + 1) + self.blocks * per_block + 4 * d * d


def _silu_mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_out))


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (n, dim) of times t (n,) in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    arg = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class _Block(nn.Module):
    """Pre-norm self-attention and MLP over the layer tokens, layer norms modulated by the embedding (adaLN)."""

    def __init__(self, d: int, heads: int, mlp_ratio: float, fused: bool = False):
        super().__init__()
        self.fused = fused
        if d % heads:
            raise ModelError(f"model option 'width' {d} must be a multiple of 'heads' {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = _silu_mlp(d, int(mlp_ratio * d), d)
        self.mod = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.mod.weight)  # starts as identity blocks (gates 0), as DiT's adaLN-zero
        nn.init.zeros_(self.mod.bias)

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        n, L, d = h.shape
        q, k, v = self.qkv(h).reshape(n, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:  # patch tokens: hundreds of them, the fused kernel does not store the (L, L) weights
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, L, d))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(n, L, d))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.mod(c)[:, None].chunk(6, dim=-1)
        h = h + g1 * self._attention(self.norm1(h) * (1 + s1) + b1)
        return h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)


class _VelocityNet(nn.Module):
    """v(x_t, t, conditions): tokens (n, L, C + 1) -> velocities (n, L, C + 1)."""

    def __init__(self, n_layers: int, n_cells: int, n_cond: int, cfg: CFMConfig,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        d, k = cfg.width, cfg.head_channels
        self.d, self.k, self.n_cells = d, k, n_cells
        self.patched = cfg.patch_x > 0
        if self.patched:
            nx, ny = grid if grid is not None else (n_cells, 1)
            pl, px, py = cfg.patch_layers, cfg.patch_x, cfg.patch_y or ny
            if n_layers % pl or nx % px or ny % py:
                raise ModelError(f"cfm model options patch_layers/patch_x/patch_y = {pl}/{px}/{py} must divide the "
                                 f"model's cells {n_layers} x {nx} x {ny}")
            self.patch, self.grid = (pl, px, py), (n_layers // pl, nx // px, ny // py)
            n_patch = self.grid[0] * self.grid[1] * self.grid[2]
            self.embed = nn.Linear(pl * px * py, d)
            self.embed_e = nn.Linear(pl, d)
            self.patch_pos = nn.Parameter(0.02 * torch.randn(n_patch, d))
            self.layer_pos = nn.Parameter(0.02 * torch.randn(self.grid[0], d))
            self.out = nn.Linear(d, pl * px * py * (k + 1))
            self.out_e = nn.Linear(d, pl)
        else:
            self.embed = nn.Linear(n_cells + 1, d)
            self.layer_pos = nn.Parameter(0.02 * torch.randn(n_layers, d))
            self.out = nn.Linear(d, n_cells * (k + 1) + 1)
        self.t_mlp = _silu_mlp(d, d, d)
        self.c_mlp = _silu_mlp(n_cond, d, d)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.mlp_ratio, fused=self.patched)
                                    for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.final_mod = nn.Linear(d, 2 * d)
        # the per-cell head: v_c = a_c + sum_j u_j silu(z_cj + w_j x_c), (a_c, z_c) from the token, u, w shared
        self.head_w = nn.Parameter(torch.ones(k))
        self.head_u = nn.Parameter(torch.full((k,), 1.0 / k))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        c = F.silu(self.t_mlp(time_embedding(t, self.d)) + self.c_mlp(cf))
        h = self._tokens(x)
        for block in self.blocks:
            h = block(h, c)
        s, b = self.final_mod(c)[:, None].chunk(2, dim=-1)
        z, v_energy = self._outputs(self.norm(h) * (1 + s) + b, x.shape[1])
        pre = torch.addcmul(z[..., 1:], x[..., :-1, None], self.head_w)
        return torch.cat([z[..., 0] + F.silu(pre) @ self.head_u, v_energy], dim=-1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens: one per layer, or the patches then one energy token per layer group."""
        if not self.patched:
            return self.embed(x) + self.layer_pos[None]
        n = x.shape[0]
        (pl, px, py), (gl, gx, gy) = self.patch, self.grid
        cells = x[..., :-1].reshape(n, gl, pl, gx, px, gy, py).permute(0, 1, 3, 5, 2, 4, 6)
        tokens = cells.reshape(n, gl * gx * gy, pl * px * py)
        return torch.cat([self.embed(tokens) + self.patch_pos[None],
                          self.embed_e(x[..., -1].reshape(n, gl, pl)) + self.layer_pos[None]], dim=1)

    def _outputs(self, h: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell head inputs (n, L, C, 1 + head_channels) and the layer-energy velocities (n, L, 1)."""
        n = h.shape[0]
        if not self.patched:
            o = self.out(h)
            return o[..., :-1].reshape(n, n_layers, self.n_cells, self.k + 1), o[..., -1:]
        (pl, px, py), (gl, gx, gy) = self.patch, self.grid
        n_p = gl * gx * gy
        z = self.out(h[:, :n_p]).reshape(n, gl, gx, gy, pl, px, py, self.k + 1)
        z = z.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, n_layers, self.n_cells, self.k + 1)
        return z, self.out_e(h[:, n_p:]).reshape(n, n_layers, 1)


class CFM(ShowerModel):
    """Conditional flow matching over the full cell grid (see the module docstring)."""

    family = "cfm"
    Config = CFMConfig
    sample_chunk = 200

    def __init__(self, detector: Detector, n_cells: int | None = None, config: CFMConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: CFMConfig = self.config  # type: ignore[assignment]
        n_l, nx, ny = self.shape
        self.register_buffer("cell_stats", torch.tensor([math.log(cfg.cell_offset_mev), 1.0]))  # mean, std
        self.register_buffer("layer_mean", torch.zeros(n_l))
        self.register_buffer("layer_std", torch.ones(n_l))
        self.net = _VelocityNet(n_l, nx * ny, self.n_cond_features, cfg, grid=(nx, ny))
        self.sample_steps, self.solver = cfg.sample_steps, cfg.solver

    def set_sampling(self, steps: int | None = None, solver: str | None = None) -> CFM:
        """Override the ODE steps and solver used by ``sample``/``decode`` (not saved; the config holds the
        defaults). Returns the model."""
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ModelError(f"cfm sampling steps {steps!r}: expected a positive integer")
            self.sample_steps = steps
        if solver is not None:
            if solver not in SOLVERS:
                raise ModelError(f"cfm solver {solver!r}: expected one of {list(SOLVERS)}")
            self.solver = solver
        return self

    @property
    def evaluations_per_shower(self) -> int:
        """Network evaluations ``decode`` makes (steps x evaluations per step of the solver)."""
        return self.sample_steps * SOLVERS[self.solver]

    # ---- representation -------------------------------------------------------------------------------
    def _raw_cells(self, showers: torch.Tensor) -> torch.Tensor:
        return torch.log(showers.float().clamp(min=0) + self.config.cell_offset_mev)

    def _raw_layers(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        n_l = self.shape[0]
        e_layer = showers.float().clamp(min=0).reshape(len(showers), n_l, -1).sum(2)
        return torch.log(e_layer / energies.float()[:, None] + LAYER_OFFSET)

    def to_tokens(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Showers (n, n_cells) MeV -> standardised tokens (n, L, C + 1): the cells and the layer energy."""
        n_l = self.shape[0]
        cells = (self._raw_cells(showers) - self.cell_stats[0]) / self.cell_stats[1]
        layers = (self._raw_layers(showers, energies) - self.layer_mean) / self.layer_std
        return torch.cat([cells.reshape(len(showers), n_l, -1), layers[..., None]], dim=2)

    def from_tokens(self, x: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Tokens (n, L, C + 1) -> showers (n, n_cells) MeV, >= 0, exact zeros below ``min_hit_mev``."""
        cfg: CFMConfig = self.config  # type: ignore[assignment]
        cells = torch.exp(x[..., :-1] * self.cell_stats[1] + self.cell_stats[0]) - cfg.cell_offset_mev
        cells = torch.where(cells >= max(cfg.min_hit_mev, 1e-12), cells, torch.zeros_like(cells))
        if cfg.rescale_layers:
            frac = (torch.exp(x[..., -1] * self.layer_std + self.layer_mean) - LAYER_OFFSET).clamp(min=0)
            target = frac * energies.float()[:, None]
            total = cells.sum(2)
            scale = torch.where(total > 0, target / total.clamp(min=1e-12), torch.zeros_like(total))
            cells = cells * scale[..., None]
        return cells.reshape(x.shape[0], self.n_cells)

    def _fit_preprocessing(self, data: Any) -> None:
        """The global mean and spread of the log cells and the per-layer mean and spread of the layer energies."""
        s1 = s2 = count = 0.0
        layers = []
        energies = np.asarray(data.conditions.energy, dtype=np.float64)
        for i in range(0, len(energies), 500):
            x = torch.as_tensor(np.asarray(data.showers[i:i + 500], dtype=np.float32))
            y = self._raw_cells(x).double()
            s1, s2, count = s1 + float(y.sum()), s2 + float((y * y).sum()), count + y.numel()
            layers.append(self._raw_layers(x, torch.as_tensor(energies[i:i + 500])).double())
        if not count:
            return
        mean = s1 / count
        std = math.sqrt(max(s2 / count - mean * mean, 0.0))
        self.cell_stats.copy_(torch.tensor([mean, std if std > 1e-6 else 1.0]))
        lay = torch.cat(layers)
        lstd = lay.std(0) if len(lay) > 1 else torch.ones(lay.shape[1], dtype=torch.float64)
        self.layer_mean.copy_(lay.mean(0).float())
        self.layer_std.copy_(torch.where(lstd > 1e-6, lstd, torch.ones_like(lstd)).float())

    # ---- sampling -------------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        n_l, nx, ny = self.shape
        return [((n, n_l, nx * ny + 1), "normal")]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, cf)

    def integrate(self, x: torch.Tensor, cf: torch.Tensor, steps: int | None = None,
                  solver: str | None = None) -> torch.Tensor:
        """Integrate dx/dt = v from t = 0 (noise) to 1 (data) with fixed steps."""
        steps = self.sample_steps if steps is None else steps
        solver = self.solver if solver is None else solver
        dt = 1.0 / steps
        ones = torch.ones(x.shape[0], device=x.device)
        for i in range(steps):
            t = ones * (i * dt)
            v = self.velocity(x, t, cf)
            if solver == "euler":
                x = x + dt * v
            elif solver == "midpoint":
                x = x + dt * self.velocity(x + 0.5 * dt * v, t + 0.5 * dt, cf)
            else:  # heun
                v2 = self.velocity(x + dt * v, t + dt, cf)
                x = x + 0.5 * dt * (v + v2)
        return x

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        x = self.integrate(noise[0], self.condition_features(cond))
        return self.from_tokens(x, cond[:, 0])

    # ---- training -------------------------------------------------------------------------------------
    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """Flow-matching loss: mean squared error of the velocity on the cells plus ``energy_weight`` times that on
        the layer energies."""
        x1 = self.to_tokens(batch.showers, batch.energies)
        x0 = batch.randn(x1.shape[1], x1.shape[2])
        return self.pair_loss(x0, x1, batch.rand(), self.condition_features(batch.cond))

    def pair_loss(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """The flow-matching loss of given (noise, shower token) pairs at times t: independent pairs in training,
        the teacher's coupled pairs in reflow (scripts/cfm_reflow.py)."""
        cfg: CFMConfig = self.config  # type: ignore[assignment]
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        err = (self.velocity(xt, t, cf) - (x1 - x0)) ** 2
        return err[..., :-1].mean() + cfg.energy_weight * err[..., -1].mean()
