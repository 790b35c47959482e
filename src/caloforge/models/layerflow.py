"""``layerflow``: a two-stage model built for diffusion-level fidelity at sub-millisecond sampling on a CPU.

Stage 1, the *layer flow*: a conditional normalising flow (affine coupling blocks, one network pass per
sample) over 4 features per layer: log(E_layer / E_inc), the energy-weighted centroid (x, y) in cell units and
log of the mean squared radius. It carries the energy response, the longitudinal profile, the layer-to-layer
correlations and the shower-to-shower lateral fluctuations (centroid wander, width).

Stage 2, the *cell hurdle*: for every cell, a hit probability and a distribution of log(hit energy), both
linear in the cell's layer features and the conditions with per-cell coefficients (no per-cell network: one
small matrix product per layer). The standardised residual of log(hit energy) follows a per-cell
sinh-arcsinh transform of a logistic variable (skew and tail weight per cell: the MIP peak and the
high-energy tail). One uniform number per cell gives both the hit decision and, conditionally, the energy.
A per-layer histogram of log(hit energy), mixed in with a per-cell weight, carries the soft hits (the
MIP peak sits at a fixed energy that no per-cell location-scale law can place for every cell).
Each layer is then rescaled to the flow's layer energy, so energy sums follow the flow exactly.

Options (on in the shipped model): ``hit_count`` adds a second flow over the per-layer log hit counts, and each
layer then hits exactly that many cells (Pareto order sampling on the per-cell hit probabilities); with
``counts_first`` the counts are sampled first and the layer flow is conditioned on them (else the count flow is
conditioned on the layer features); ``clamp_features`` keeps every flow sample inside the training range.

Both stages are trained jointly by maximum likelihood on real showers (the shape stage sees the real layer
features: teacher forcing). Sampling is one flow pass plus a handful of vectorised per-cell operations.
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
from caloforge.models.base import ModelConfig, ShowerModel, TrainBatch, as_conditions
from caloforge.models.kernels import (
    SCRATCH,
    UniformBlock,
    basis_dot,
    first_bins,
    gathered_dots,
    select_hits_by_layers,
    window_hits,
)
from caloforge.models.kernels import applies as kernels_apply

#: layers per block of hit logits in CPU sampling (a block of a 256-shower chunk, 0.9-1.2 MB per layer, stays in
#: the core's cache between the product that makes it and the selection kernel that reads it)
LOGIT_BLOCK = 2
TILT_MIN_MEV = 0.5  # match_centroids tilts only hits above this energy (about 3 MIPs in 0.5 mm Si)
N_FEAT = 4  # layer-flow features per layer: log energy fraction, centroid x, centroid y, log mean r^2
SPARSE_MAP_Q = 63  # (sparse_map) quantiles stored per layer and hit count
SPARSE_MAP_MIN = 200  # (sparse_map) fewer layers than this with a given count on either side: no map for that pair
#: (empty_logfrac) where empty layers' standardised log energies sit: 1.3 standard units below the dequantisation
#: edge (0.01 MeV), which one-hit layers reach only in their far tail
EMPTY_LOGFRAC_AT = -3.0
HALO_BASIS = 9  # basis functions of the halo term (see LayerFlow._halo_basis)
#: knots (cells from the axis) of the piecewise-linear radial profile of ``halo_knots`` halo terms
HALO_KNOTS = (0.0, 1.5, 3.0, 4.0, 5.0, 6.0, 7.5, 9.0, 11.0, 13.5, 16.5, 20.0, 25.0)
#: each condition feature's raw value under the two mirrors of ``mirror_tie``, (scale, shift) for x -> -x and for
#: y -> -y with the angle reversed (the calorimeter is symmetric under both; an angle towards -y is the mirror image)
MIRROR_FEATURES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "log_e": ((1, 0), (1, 0)), "angle": ((1, 0), (-1, 0)), "sec_angle": ((1, 0), (1, 0)),
    "tan_angle": ((1, 0), (-1, 0)),
    "sin_x": ((-1, 0), (1, 0)), "cos_x": ((1, 0), (1, 0)), "sin_y": ((1, 0), (-1, 0)), "cos_y": ((1, 0), (1, 0)),
    "pos_x": ((-1, 0), (1, 0)), "pos_y": ((1, 0), (-1, 0)), "is_photon": ((1, 0), (1, 0)), "charge": ((1, 0), (1, 0)),
}
ANGLE_BASIS_MAX_DEG = 60.0  # the angle_basis bumps span 0 to this (the widest angle the house detector's window holds)


@dataclass
class LayerFlowConfig(ModelConfig):
    """Architecture of the layer flow and of the cell hurdle stage."""

    flow_blocks: int = 8
    flow_hidden: int = 192
    flow_layers: int = 2  # hidden layers per coupling network
    scale_clamp: float = 3.0  # soft bound of the coupling log-scales
    dequant_mev: float = 0.01  # layer-energy dequantisation width; layers below it are empty
    centroid_reg_mev: float = 0.5  # regulariser in the centroid denominator (empty layers -> centroid 0)
    empty_layer_noise: float = 0.3  # dequantisation noise of the lateral features of empty layers (std units)
    min_hit_prob: float = 1e-5  # floor of initial per-cell hit probabilities
    cell_cap_margin: float = 1.5  # hit energies are capped at this times the cell's largest training energy
    cap_rescaled: bool = False  # the cap holds after the rescaling to the layer energy too: a hit above it keeps
    # the cap and its excess goes to the layer's other hits (a layer of few hits would otherwise scale a halo
    # cell up to many times the energy any training shower gave it; 4 % of showers in v39 at the corner)
    shape_weight: float = 1.0  # weight of the cell-stage likelihood in the loss
    mip_bins: int = 48  # bins of the per-layer soft-hit spectrum mixed into every cell's energy law (0: none)
    mip_log_min: float = -7.0  # ln(E / MeV) range of that spectrum's bins: 0.9 keV to 2 MeV, soft hits only
    mip_log_max: float = 0.7
    hit_count: bool = False  # per-layer hit counts from a second flow; each layer hits exactly that many cells
    count_blocks: int = 6  # coupling blocks of the count flow
    count_hidden: int = 128
    counts_first: bool = False  # order p(counts) p(layer features | counts) instead of p(features) p(counts | features)
    clamp_features: bool = False  # clamp flow samples to the training range of each feature (+- clamp_margin x range)
    clamp_margin: float = 0.1
    axis_features: bool = False  # centroids and mean r^2 measured from the shower axis, not from the local grid
    offset_squares: bool = False  # the squared axis offsets as cell covariates too (how a cell shares with its
    # neighbours depends on how far the axis passes from the cell centre: E_ratio, the hottest cell)
    match_centroids: bool = False  # tilt each layer's cell energies so its centroid is the flow's (sampling only)
    centroid_gain: float = 1.0  # (sampling only) the cells see the flow's layer centroids at this fraction of their
    # deviation from the conditional mean: cells drawn independently around a centroid add their own scatter to the
    # flow's, so a gain below 1 keeps each layer's centroid spread at Geant4's (item 12)
    halo_centroid_gain: float = 1.0  # (sampling only; with core_block) the cells outside the core block see the
    # centroids at this further fraction: far cells move a layer's centroid with a long lever arm (item 12)
    core_block: int = 0  # a shift-invariant core term on the central core_block x core_block cells (0: none)
    core_width: float = 0.3  # Gaussian widths core_width x (1, 2, 4) cells of the core term's basis
    core_exclusive: bool = False  # core cells follow the core term alone (richer basis, no per-cell coefficients)
    core_centroid: bool = False  # core cells also follow the layer's centroid (odd terms times the flow's cx, cy)
    core_far: bool = False  # the exclusive core's basis also has log(r + 1/2) and exp(-r / 3) (for blocks >= 11)
    select_noise: bool = False  # with hit_count: hit energies from the selection noise (no second per-cell uniform)
    total_energy: bool = False  # the flow also models log(E_visible / E_inc); layers are rescaled to that total
    total_stage: bool = False  # with total_energy (and counts_first): the total has its own small conditional flow
    # after the hit counts and before the layer flow, which is conditioned on it: one dimension of a 120-dimensional
    # flow gets its narrow, energy-dependent width wrong, and the visible-energy resolution with it (item 13)
    empty_logfrac: float = 0.0  # (training; with hit_count and counts_first) > 0: an empty layer's standardised log
    # energy is drawn from N(EMPTY_LOGFRAC_AT, empty_logfrac^2) instead of the log of its dequantisation noise, an
    # exponential tail whose sharp edge sits next to one-hit layers' energies; sampling empties layers by their hit
    # count (item 14: tried in stop 30, no effect)
    sparse_map: int = 0  # (sampling; fitted after training, scripts/fit_sparse_map.py) layers with 1..sparse_map hits
    # take their energy through a per-layer, per-count quantile map from the flow's to the training showers' (item 15:
    # the layer energies come right, the cells do not; not in the shipped models)
    count_centres: bool = False  # (sampling only; with hit_count and counts_first) the later stages see each drawn
    # hit count at the centre of its dequantisation bin, not where the count flow put it inside the bin (item 14: no
    # effect)
    total_blocks: int = 2  # coupling blocks of the total's flow (one dimension: a conditional affine map each)
    halo_term: bool = False  # cells outside the core block follow a shift-invariant halo law plus sin(angle) times
    # their own laws: at normal incidence the halo is then a function of the displacement from the axis alone
    halo_knots: bool = False  # with halo_term: the radial part of the halo law piecewise linear in r (HALO_KNOTS)
    halo_ramp_deg: float = 0.0  # with halo_term: own laws weigh min(1, sin(angle) / sin(this)) (0: sin(angle))
    halo_no_width: bool = False  # with halo_term: the halo law ignores the layer's width (log mean r^2) and hit count,
    # the covariates the far hits themselves make (under teacher forcing they tell the cells where those hits are)
    angle_basis: int = 0  # Gaussian bumps in the incidence angle (0-60 deg) as cell covariates (0: none): each cell's
    # laws get their own smooth angle dependence (the front layers' halo is not linear in angle and sec angle)
    flow_weight_decay: float = 0.0  # decoupled (AdamW) weight decay of the flows' weights; the cell laws get none.
    # 1.0 lowers the flows' validation NLL on 20000 showers, but cost layer correlations in v33 (docs/models.md)
    mirror_tie: str = "none"  # cell laws tied under the two mirrors through the corner of the cell the axis crosses
    # (x -> -x; y -> -y with the angle reversed). "full": a cell's laws are its mirror images' at the mirrored
    # covariates; "corner": mirrored cells' laws agree wherever the configuration is its own mirror image (normal
    # incidence on a cell corner, centroids on the axis), and are free elsewhere; "halo": "corner" for the cells
    # outside the core block alone (the core cells and the core term keep their own laws) (item 9)
    centroid_over_width: bool = False  # cells also see each layer's centroid over its mean squared radius (cx / r^2,
    # cy / r^2, from the axis): a shift d of a shower of width s changes log E at a cell x by about x d / s^2, a
    # response that no fixed coefficient of the centroid alone gives at every energy, angle and depth (item 11)
    cow_soft: float = 0.0  # with centroid_over_width: c / (r^2 + 1/4 + this) (cells^2): bounds the lever arm of
    # narrow or sparse layers, where a one-hit centroid over a tiny width swings the cells' laws (item 11)
    pad_y: int = 0  # cells added on both sides of the local grid along y (the tilt direction): at 40-60 degrees
    # 0.1-2 % of a front layer's energy lies beyond the normal-incidence window's 15 cells from the axis, and with
    # that lever arm it carries a large part of the layer's width
    permutation_seed: int = 1234

    bounds: ClassVar[dict[str, tuple]] = {
        "flow_blocks": (1, 64), "flow_hidden": (1, 4096), "flow_layers": (0, 16), "count_blocks": (1, 64),
        "total_blocks": (1, 64),
        "count_hidden": (1, 4096), "mip_bins": (0, 1024), "permutation_seed": (0, 2**32 - 1),
        "scale_clamp": (1e-3, 1e3), "dequant_mev": (0.0, 1e6), "centroid_reg_mev": (1e-9, 1e6),
        "empty_layer_noise": (0.0, 1e3), "min_hit_prob": (0.0, 0.5), "cell_cap_margin": (1e-3, 1e6),
        "shape_weight": (0.0, 1e6), "mip_log_min": (-50.0, 50.0), "mip_log_max": (-50.0, 50.0),
        "clamp_margin": (0.0, 1e3), "core_block": (0, 31), "core_width": (1e-3, 100.0), "angle_basis": (0, 16),
        "halo_ramp_deg": (0.0, 60.0), "flow_weight_decay": (0.0, 1e3), "pad_y": (0, 64), "cow_soft": (0.0, 1e3),
        "centroid_gain": (0.0, 2.0), "halo_centroid_gain": (0.0, 2.0), "empty_logfrac": (0.0, 10.0),
        "sparse_map": (0, 16),
        "mirror_tie": ("none", "full", "corner", "halo"),
    }

    def weight_estimate(self) -> int:
        def flow(blocks: int, hidden: int) -> int:
            return blocks * (max(self.flow_layers - 1, 0) * hidden**2 + 512 * hidden)

        return flow(self.flow_blocks, self.flow_hidden) + (flow(self.count_blocks, self.count_hidden)
                                                           if self.hit_count else 0)


def _asinh(x: torch.Tensor) -> torch.Tensor:
    """asinh written with exportable ops (ONNX has no Asinh in the TorchScript exporter)."""
    ax = x.abs()
    return torch.sign(x) * torch.log1p(ax + ax * ax / (1 + torch.sqrt(1 + ax * ax)))


def _sinh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.exp(x) - torch.exp(-x))


def _made(noise: torch.Tensor | UniformBlock) -> torch.Tensor:
    return noise.tensor() if isinstance(noise, UniformBlock) else noise


def _put(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[index] = values: in place (no copy of a large output), out of place while exporting to ONNX."""
    if torch.onnx.is_in_onnx_export():
        return out.index_put((index,), values)
    return out.index_put_((index,), values)


class _Coupling(nn.Module):
    """Affine coupling: the second half of the features is scaled and shifted given the first half and c."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, n_layers: int, clamp: float):
        super().__init__()
        self.d_a = dim // 2
        self.d_b = dim - self.d_a
        self.clamp = clamp
        layers: list[nn.Module] = []
        width = self.d_a + cond_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 2 * self.d_b)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _st(self, x_a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(torch.cat([x_a, c], dim=1)).chunk(2, dim=1)
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """data -> latent; returns (z, log|det J|)."""
        x_a, x_b = x[:, :self.d_a], x[:, self.d_a:]
        s, t = self._st(x_a, c)
        return torch.cat([x_a, x_b * torch.exp(s) + t], dim=1), s.sum(dim=1)

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z_a, z_b = z[:, :self.d_a], z[:, self.d_a:]
        s, t = self._st(z_a, c)
        return torch.cat([z_a, (z_b - t) * torch.exp(-s)], dim=1)


class LayerFlow(ShowerModel):
    """Layer-feature flow + per-cell hurdle model (see the module docstring)."""

    family = "layerflow"
    Config = LayerFlowConfig
    takes_uniform_blocks = True  # decode makes its uniforms where it needs them (see kernels.UniformBlock)
    parallel_chunks = True  # on the CPU, one chunk per thread
    sample_chunk = 256  # showers per decoding pass on the CPU (measured best of 64-512 with the compiled kernels)
    #: options ``train --init-from`` may change: the weights have the same shapes and meaning (the tie projects the
    #: source's laws at the first step; a core block one cell larger adds the core term to a ring where it is small)
    fine_tune_options: ClassVar[tuple[str, ...]] = ("mirror_tie", "core_block", "cap_rescaled", "centroid_gain",
                                                   "halo_centroid_gain", "count_centres")

    def __init__(self, detector: Detector, n_cells: int | None = None, config: LayerFlowConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__(detector, n_cells, config, features, frame)
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        n_l, n_x, n_y = self.shape
        self.n_layers, self.n_lat = n_l, n_x * n_y
        self.n_feat = N_FEAT + int(cfg.hit_count)
        n_cf = self.n_cond_features
        self.cell_offsets = "position" in self.condition_names  # the axis's per-layer offset in its cell as covariates
        # covariates per cell: 1, the standardised layer features, the condition features (, the axis offsets)
        self.n_cov = (self.n_feat + 1 + n_cf + (2 + 2 * cfg.offset_squares) * self.cell_offsets + cfg.angle_basis
                      + 2 * cfg.centroid_over_width)
        if cfg.centroid_over_width:  # the scale of cx / r^2 and cy / r^2 per layer (fit_preprocessing; not centred,
            self.register_buffer("cow_scale", torch.ones(n_l, 2))  # so that a mirror only flips their sign)
        if cfg.angle_basis > 0:
            if "angle" not in self.condition_names:
                raise ValueError("layerflow: angle_basis needs a model that takes incidence angles")
            k = cfg.angle_basis
            self.register_buffer("angle_centres", torch.linspace(0.0, ANGLE_BASIS_MAX_DEG, k), persistent=False)
            self.angle_width = ANGLE_BASIS_MAX_DEG / max(k - 1, 1)
        # The layer flow: 4 features per layer (and the total); with hit_count a second flow models the L log hit
        # counts. Layout [logfrac | cx | cy | log r2 (| log total) (| log(1 + hits))], see layer_features.
        self.total = bool(cfg.total_energy)
        own_total = self.total and cfg.total_stage
        if cfg.total_stage and not (cfg.total_energy and cfg.hit_count and cfg.counts_first):
            raise ValueError("layerflow: total_stage needs total_energy, hit_count and counts_first")
        if cfg.empty_logfrac > 0 and not (cfg.hit_count and cfg.counts_first):
            raise ValueError("layerflow: empty_logfrac needs hit_count and counts_first")
        if cfg.count_centres and not (cfg.hit_count and cfg.counts_first):
            raise ValueError("layerflow: count_centres needs hit_count and counts_first")
        if cfg.sparse_map and not cfg.hit_count:
            raise ValueError("layerflow: sparse_map needs hit_count")
        if cfg.sparse_map:  # filled by fit_sparse_map (or by loading a model that has them)
            self.register_buffer("sparse_q_flow", torch.zeros(n_l, cfg.sparse_map, SPARSE_MAP_Q))
            self.register_buffer("sparse_q_data", torch.zeros(n_l, cfg.sparse_map, SPARSE_MAP_Q))
        self.flow_dim = N_FEAT * n_l + (self.total and not own_total)  # the main flow's features
        self.dim = self.n_feat * n_l + self.total
        x_mm, y_mm = self.local_cell_centers_mm()
        gx, gy = np.meshgrid(x_mm / detector.cell_size_mm, y_mm / detector.cell_size_mm, indexing="ij")
        self.register_buffer("cell_x", torch.as_tensor(gx.reshape(-1), dtype=torch.float32), persistent=False)
        self.register_buffer("cell_y", torch.as_tensor(gy.reshape(-1), dtype=torch.float32), persistent=False)
        # Preprocessing constants (fit_preprocessing): feature standardisation, conditional mean of the flow.
        self.register_buffer("feat_mean", torch.zeros(self.dim))
        self.register_buffer("feat_std", torch.ones(self.dim))
        self.register_buffer("flow_coef", torch.zeros(2 + n_cf, self.dim))  # conditional mean: [1, lE, lE^2, ..]@coef
        self.register_buffer("flow_std", torch.ones(self.dim))
        if cfg.clamp_features:  # a flow maps rare latents far outside the data: one such shower can dominate a metric
            self.register_buffer("y_lo", torch.full((self.dim,), -1e4))
            self.register_buffer("y_hi", torch.full((self.dim,), 1e4))
        # Per-cell cap of log(hit energy): log(cell_cap_margin * the largest energy the cell saw in training).
        # The per-cell energy tails are heavy; without a cap a rare halo cell takes a large share of its layer.
        self.register_buffer("cell_log_e_max", torch.full((n_l * self.n_lat,), 10.0))
        self._scan_order: np.ndarray | None = None  # the hit-selection kernel's scan order (speed only; see _hits)
        # Flow.
        rng = np.random.default_rng(cfg.permutation_seed)
        perms = np.stack([rng.permutation(self.flow_dim) for _ in range(cfg.flow_blocks)])
        self.register_buffer("perms", torch.as_tensor(perms, dtype=torch.long), persistent=False)
        self.register_buffer("inv_perms", torch.as_tensor(np.argsort(perms, axis=1), dtype=torch.long),
                             persistent=False)
        first = cfg.hit_count and cfg.counts_first
        self.blocks = nn.ModuleList(
            _Coupling(self.flow_dim, n_cf + 1 + n_l * first + own_total, cfg.flow_hidden, cfg.flow_layers,
                      cfg.scale_clamp)
            for _ in range(cfg.flow_blocks))
        self.total_blocks = None
        if own_total:  # log total given the conditions and the hit counts
            none = torch.zeros(cfg.total_blocks, 1, dtype=torch.long)
            self.register_buffer("total_perms", none, persistent=False)
            self.register_buffer("total_inv_perms", none.clone(), persistent=False)
            self.total_blocks = nn.ModuleList(
                _Coupling(1, n_cf + 1 + n_l, cfg.count_hidden, cfg.flow_layers, cfg.scale_clamp)
                for _ in range(cfg.total_blocks))
        self.count_blocks = None
        if cfg.hit_count:  # log hit counts given the conditions (and the layer flow's features, unless counts_first)
            perms = np.stack([rng.permutation(n_l) for _ in range(cfg.count_blocks)])
            self.register_buffer("count_perms", torch.as_tensor(perms, dtype=torch.long), persistent=False)
            self.register_buffer("count_inv_perms", torch.as_tensor(np.argsort(perms, axis=1), dtype=torch.long),
                                 persistent=False)
            self.count_blocks = nn.ModuleList(
                _Coupling(n_l, n_cf + 1 + self.flow_dim * (not first), cfg.count_hidden, cfg.flow_layers,
                          cfg.scale_clamp)
                for _ in range(cfg.count_blocks))
        # Cell hurdle. Hit logit: per layer a (n_cov, n_lat) matrix (evaluated densely, one bmm). Energy of a hit:
        # per cell n_cov coefficients for mu and for log sigma of log(E_hit / MeV), a skew and a log tail weight
        # (rows indexed by the flat cell index; evaluated only for hit cells).
        self.cell_hit = nn.Parameter(torch.zeros(n_l, self.n_cov, self.n_lat))
        self.cell_mu = nn.Parameter(torch.zeros(n_l * self.n_lat, self.n_cov))
        self.cell_log_sigma = nn.Parameter(torch.zeros(n_l * self.n_lat, self.n_cov))
        self.cell_skew = nn.Parameter(torch.zeros(n_l * self.n_lat))
        self.cell_log_tail = nn.Parameter(torch.zeros(n_l * self.n_lat))
        # Soft-hit component: a histogram density of ln(E_hit) per layer (the MIP peak sits at a fixed energy, which
        # no per-cell location-scale law can place for every cell), mixed in with a per-cell weight linear in the
        # covariates. Sampling needs no extra noise: the energy quantile picks the component, then its quantile.
        self.mip_logits = nn.Parameter(torch.zeros(n_l, cfg.mip_bins)) if cfg.mip_bins > 0 else None
        self.cell_mix = nn.Parameter(torch.zeros(n_l * self.n_lat, self.n_cov)) if cfg.mip_bins > 0 else None
        # Core term: on the core_block x core_block cells nearest the axis, the hit logit, mu, log sigma and soft-hit
        # weight get sum_k a_k phi_k(dx, dy), phi_k Gaussians in the cell centre's distance from the axis (and their
        # odd partners in dy: angled showers lean towards +y), a_k linear in the layer's covariates. The per-cell
        # laws are smooth in the axis offset; where the axis passes near a cell edge or corner the sharing of the
        # core between cells changes fast, and only a function of the distance to the axis gets it right.
        self.core_w = self.core_cw = None
        if cfg.core_block > 0:
            if not self.cell_offsets:
                raise ValueError("layerflow: core_block needs a model that takes impact positions (the axis)")
            cx1 = x_mm / detector.cell_size_mm
            cy1 = y_mm / detector.cell_size_mm
            bx = np.sort(np.argsort(np.abs(cx1 - 0.5), kind="stable")[:cfg.core_block])
            by = np.sort(np.argsort(np.abs(cy1 - 0.5), kind="stable")[:cfg.core_block])
            core = (bx[:, None] * n_y + by[None, :]).reshape(-1)
            pos = np.full(self.n_lat, len(core))
            pos[core] = np.arange(len(core))
            self.register_buffer("core_idx", torch.as_tensor(core, dtype=torch.long), persistent=False)
            self.register_buffer("core_pos", torch.as_tensor(pos, dtype=torch.long), persistent=False)
            # exclusive: 6 laws (also the skew and tail weight) on 11 basis functions, the per-cell ones masked out
            self.core_laws, self.core_basis = (6, 11 + 2 * cfg.core_far) if cfg.core_exclusive else (4, 6)
            self.core_w = nn.Parameter(torch.zeros(n_l, self.n_cov, self.core_laws * self.core_basis))
            # odd terms dx g_k, dy g_k (3 widths) times the layer's raw centroid (cells from the axis), per layer, law
            self.core_cw = nn.Parameter(torch.zeros(n_l, self.core_laws, 2, 3)) if cfg.core_centroid else None
            if cfg.core_exclusive:
                keep = np.ones(self.n_lat, np.float32)
                keep[core] = 0.0
                self.register_buffer("cell_keep", torch.as_tensor(keep), persistent=False)
        # Halo term: the cells outside the core block get sum_k b_k psi_k(dx, dy) (HALO_BASIS functions of the
        # displacement from the axis, even in dy at normal incidence) on the hit logit, mu, log sigma and soft-hit
        # weight, b_k linear in the layer's covariates, and their own per-cell laws only times sin(angle).
        self.halo_w = None
        if cfg.halo_term:
            if cfg.core_block <= 0 or cfg.core_exclusive or "angle" not in self.condition_names:
                raise ValueError("layerflow: halo_term needs core_block > 0 (not exclusive) and incidence angles")
            halo = np.ones(self.n_lat, np.float32)
            halo[core] = 0.0
            self.register_buffer("halo_mask", torch.as_tensor(halo), persistent=False)
            self.n_halo = HALO_BASIS - 4 + len(HALO_KNOTS) if cfg.halo_knots else HALO_BASIS
            self.halo_w = nn.Parameter(torch.zeros(n_l, self.n_cov, 4 * self.n_halo))
        if cfg.mirror_tie != "none":
            self._check_mirror_tie(n_x, n_y)

    # ---- mirror tie ---------------------------------------------------------------------------------
    def _check_mirror_tie(self, n_x: int, n_y: int) -> None:
        """Refuse what ``mirror_tie`` cannot tie; keep the cell permutations of the two mirrors."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        why = []
        if self.frame != "axis" or not self.cell_offsets:
            why.append("a model in the shower-axis frame that takes impact positions")
        if cfg.halo_term or cfg.core_exclusive or cfg.core_centroid or cfg.angle_basis:
            why.append("no halo_term, core_exclusive, core_centroid or angle_basis")
        unknown = [f for f in self.features if f not in MIRROR_FEATURES]
        if unknown:
            why.append(f"condition features with a known mirror image (not {unknown})")
        cx, cy = self.cell_x.view(n_x, n_y), self.cell_y.view(n_x, n_y)
        if not (torch.equal(cx.flip(0), -cx) and torch.equal(cy.flip(1), -cy)):
            why.append("a local grid symmetric about the axis cell's corner")
        idx = torch.arange(n_x * n_y).view(n_x, n_y)
        self.register_buffer("mirror_perms", torch.stack([idx.flip(0).reshape(-1), idx.flip(1).reshape(-1)]),
                             persistent=False)
        if self.core_w is not None:
            core = set(self.core_idx.tolist())
            if any({int(self.mirror_perms[k, c]) for c in core} != core for k in range(2)):
                why.append(f"a core block symmetric about the axis cell's corner (an even core_block, not "
                           f"{cfg.core_block})")
        if why:
            raise ValueError("layerflow: mirror_tie needs " + "; ".join(why))

    def _mirror_maps(self) -> torch.Tensor:
        """The two mirrors' actions on the cell covariates, (2, L, n_cov, n_cov): x' = M x for the covariate vector
        x = [1, layer features, condition features, axis offsets (, their squares)] of a layer. Each raw quantity
        maps affinely (odd ones change sign; the offset f - 1/2 of the axis from the cell corner becomes -f - 1/2),
        so with the standardisation M is affine in x: an involution whose shifts sit in the constant column."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        n_l, n_feat, n_cf = self.n_layers, self.n_feat, self.n_cond_features
        eye = torch.eye(self.n_cov, dtype=torch.float64, device=self.feat_mean.device)
        maps = eye.repeat(2, n_l, 1, 1)
        mean = self._per_layer(self.feat_mean.double()).view(n_feat, n_l).T  # (L, n_feat)
        std = self._per_layer(self.feat_std.double()).view(n_feat, n_l).T
        for k in range(2):
            m = maps[k]
            i = 1 + 1 + k  # the layer's centroid in x (k = 0) or y (k = 1), measured from the axis: odd
            m[:, i, i], m[:, i, 0] = -1.0, -2.0 * mean[:, 1 + k] / std[:, 1 + k]
            for f, name in enumerate(self.features):
                a, b = MIRROR_FEATURES[name][k]
                mu, sd = float(self.cond_mean[f]), float(self.cond_std[f])
                i = 1 + n_feat + f
                m[:, i, i], m[:, i, 0] = a, (a * mu + b - mu) / sd
            o = 1 + n_feat + n_cf + k  # the axis offset f - 1/2 -> -f - 1/2
            m[:, o, o], m[:, o, 0] = -1.0, -1.0
            if cfg.offset_squares:  # (f - 1/2)^2 - 1/12 -> itself + 2 (f - 1/2) + 1
                q = o + 2
                m[:, q, o], m[:, q, 0] = 2.0, 1.0
            if cfg.centroid_over_width:  # c / r^2 (last two covariates): odd, not centred
                i = self.n_cov - 2 + k
                m[:, i, i] = -1.0
        return maps

    @torch.no_grad()
    def tie_mirrors(self) -> None:
        """Project the cell laws onto the tied ones (in place); training calls this after every optimiser step.

        ``full``: every law becomes the average of its four images M_g^T w_{g(c)} under {1, X, Y, XY}, so the law of
        cell c at covariates x is exactly that of the mirrored cell at the mirrored covariates. ``corner``: with
        P_g = (1 + M_g) / 2 the projector onto the configurations that are their own mirror image, the parts w P_X
        P_Y are shared by the four cells of an orbit, w P_X (1 - P_Y) by the two cells of the x-mirror, w (1 - P_X)
        P_Y by those of the y-mirror, and w (1 - P_X)(1 - P_Y) stays the cell's own: mirrored cells then agree at
        every self-mirrored configuration (the corner at normal incidence) and nowhere else are they constrained."""
        mode = self.config.mirror_tie  # type: ignore[attr-defined]
        if mode == "none":
            return
        n_l, n_lat, n_cov = self.n_layers, self.n_lat, self.n_cov
        maps = self._mirror_maps()
        px, py = self.mirror_perms[0], self.mirror_perms[1]
        pxy = px[py]
        dev = self.cell_hit.device
        eye = torch.eye(n_cov, dtype=torch.float64, device=dev)
        p_x, p_y = (eye + maps[0]) / 2, (eye + maps[1]) / 2  # (L, n_cov, n_cov)

        own = torch.zeros(n_lat, dtype=torch.bool, device=dev)  # cells keeping their own laws ("halo": the core)
        if mode == "halo" and self.core_w is not None:
            own[self.core_idx] = True

        def by_cell(w: torch.Tensor) -> torch.Tensor:  # w (L, n_lat, n_cov), rows are laws w . x
            w = w.double()
            if mode == "full":
                acc = w.clone()
                for m, perm in ((maps[0], px), (maps[1], py), (maps[0] @ maps[1], pxy)):
                    acc += torch.einsum("lci,lik->lck", w[:, perm], m)  # row vector w^T M: (M^T w)^T
                return acc / 4
            a = w @ p_x @ p_y
            b = w @ p_x @ (eye - p_y)
            c = w @ (eye - p_x) @ p_y
            tied = ((a + a[:, px] + a[:, py] + a[:, pxy]) / 4 + (b + b[:, px]) / 2 + (c + c[:, py]) / 2
                    + w @ (eye - p_x) @ (eye - p_y))
            return torch.where(own[:, None], w, tied)

        self.cell_hit.copy_(by_cell(self.cell_hit.transpose(1, 2)).transpose(1, 2).to(self.cell_hit.dtype))
        for par in (self.cell_mu, self.cell_log_sigma, self.cell_mix):
            if par is not None:
                par.copy_(by_cell(par.view(n_l, n_lat, n_cov)).reshape(par.shape).to(par.dtype))
        for par in (self.cell_skew, self.cell_log_tail):  # no covariates: one value per orbit
            v = par.view(n_l, n_lat)
            par.copy_(torch.where(own, v, (v + v[:, px] + v[:, py] + v[:, pxy]) / 4).reshape(-1))
        cap = self.cell_log_e_max.view(n_l, n_lat)  # the energy cap: the largest of the four cells'
        tied = torch.stack([cap, cap[:, px], cap[:, py], cap[:, pxy]]).amax(0)
        self.cell_log_e_max.copy_(torch.where(own, cap, tied).reshape(-1))
        if self.core_w is not None and mode != "halo":  # basis functions even in dx; g_k even, g_k dy odd in dy
            w = self.core_w.double().view(n_l, n_cov, self.core_laws, self.core_basis)
            odd_y = torch.tensor([(k % 2) == 1 for k in range(self.core_basis)], device=dev)
            if mode == "full":
                acc = w.clone()
                for g, m in enumerate((maps[0], maps[1], maps[0] @ maps[1]), start=1):
                    img = torch.einsum("lik,lijb->lkjb", m, w)  # M^T w per (law, basis) column
                    acc += torch.where(odd_y, -img, img) if g >= 2 else img  # images with Y flip odd-in-dy ones
                w = acc / 4
            else:  # an odd-in-dy term must vanish wherever the configuration is its own y-mirror image
                w = torch.where(odd_y, torch.einsum("lki,lijb->lkjb", (eye - p_y).transpose(1, 2), w), w)
            self.core_w.copy_(w.reshape(self.core_w.shape).to(self.core_w.dtype))

    # ---- features -----------------------------------------------------------------------------------
    def _flow_cond(self, cf: torch.Tensor) -> torch.Tensor:
        """What the flows are conditioned on: the condition features and (log E)^2."""
        return torch.cat([cf, cf[:, :1] ** 2], dim=1)

    def _cond_basis(self, cf: torch.Tensor) -> torch.Tensor:
        """Regressors of the flow's conditional mean: 1, log E, (log E)^2 and the other condition features."""
        return torch.cat([torch.ones_like(cf[:, :1]), cf[:, :1], cf[:, :1] ** 2, cf[:, 1:]], dim=1)

    def _offsets(self, cond: torch.Tensor) -> torch.Tensor | None:
        """The axis's offset within its cell in every layer, (L, n, 2), centred on 0 (None without positions)."""
        if not self.cell_offsets:
            return None
        _, _, fx, fy = self.axis_cells(cond)
        off = torch.stack([fx[None].expand(self.n_layers, -1), fy.transpose(0, 1)], dim=2) - 0.5
        return torch.cat([off, off ** 2 - 1.0 / 12], dim=2) if self.config.offset_squares else off

    def layer_features(self, showers: torch.Tensor, energies: torch.Tensor, u: torch.Tensor | None = None,
                       u_count: torch.Tensor | None = None, cond: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features (n, dim) laid out [logfrac | cx | cy | log r2 (| log total) (| log(1 + hits))], and layer
        energies (n, L). ``u`` and ``u_count`` dequantise the layer energy and the hit count (default 0.5). The
        total (``total_energy``) is log of the visible energy over the incident energy, dequantised alike.

        With ``axis_features`` the centroid and the mean squared radius are measured from where the shower axis
        crosses the layer (from ``cond``): in the shower-axis frame that point jumps by a cell from layer to layer
        of an inclined shower, a saw-tooth in (angle, impact, depth) that the flow would otherwise have to learn."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        s = showers.reshape(len(showers), self.n_layers, self.n_lat).float()
        e_l = s.sum(dim=2)
        den = e_l + cfg.centroid_reg_mev
        sx, sy = s @ self.cell_x, s @ self.cell_y
        sr2 = s @ (self.cell_x ** 2 + self.cell_y ** 2)
        if cfg.axis_features and cond is not None and self.cell_offsets:
            axis = (self._offsets(cond)[..., :2] + 0.5).permute(1, 0, 2)  # (n, L, 2), the axis in local cell units
            ax, ay = axis[..., 0], axis[..., 1]
            sr2 = sr2 - 2 * ax * sx - 2 * ay * sy + (ax ** 2 + ay ** 2) * e_l
            sx, sy = sx - ax * e_l, sy - ay * e_l
        cx, cy, r2 = sx / den, sy / den, (sr2 / den).clamp(min=0.0)
        u = torch.full_like(e_l, 0.5) if u is None else u
        logfrac = torch.log((e_l + cfg.dequant_mev * u) / energies.float()[:, None])
        feats = [logfrac, cx, cy, torch.log(r2 + 0.25)]
        if self.total:
            feats.append(torch.log((e_l + cfg.dequant_mev * u).sum(dim=1, keepdim=True) / energies.float()[:, None]))
        if cfg.hit_count:
            u_count = torch.full_like(e_l, 0.5) if u_count is None else u_count
            feats.append(torch.log1p((s > 0).sum(dim=2).float() + u_count))
        return torch.cat(feats, dim=1), e_l

    def _per_layer(self, f: torch.Tensor) -> torch.Tensor:
        """The per-layer part (n, n_feat L) of features laid out as in layer_features (without the total)."""
        if not self.total:
            return f
        k = N_FEAT * self.n_layers
        return torch.cat([f[..., :k], f[..., k + 1:]], dim=-1)

    def _angle_bumps(self, cond: torch.Tensor) -> torch.Tensor:
        """The ``angle_basis`` covariates (n, K): Gaussian bumps exp(-(angle - a_k)^2 / 2 w^2) - 1/2 at K angles a_k
        evenly spaced over 0-60 degrees, w their spacing (centred by 1/2 so that the GLM's optimiser sees covariates
        of both signs)."""
        d = (cond[:, 1:2].float() - self.angle_centres) / self.angle_width
        return torch.exp(-0.5 * d * d) - 0.5

    def _halo_basis(self, dx: torch.Tensor, dy: torch.Tensor, sin_a: torch.Tensor, sec_m1: torch.Tensor,
                    cxr: torch.Tensor, cyr: torch.Tensor) -> torch.Tensor:
        """The halo term's HALO_BASIS functions (..., K) of the displacement (dx, dy) of a cell from the axis (cells):
        1, r / 10, log(r + 1/2), exp(-r / 3) (the radial fall-off); (sec(angle) - 1) (dy^2 - dx^2) / (r^2 + 1) (the
        elongation of an inclined shower); sin(angle) dy / (r + 1) and sin(angle) dy exp(-r / 3) / 3 (its lean
        towards +y); and c_y dy / (r + 1), c_x dx / (r + 1) with (c_x, c_y) the layer's centroid from the axis (the
        halo follows the shower). At normal incidence every function is unchanged by y -> -y with c_y -> -c_y (and
        x likewise): the halo is symmetric by construction."""
        r = torch.sqrt(dx * dx + dy * dy + 1e-6)
        e3 = torch.exp(r * (-1.0 / 3.0))
        inv = 1.0 / (r + 1.0)
        if self.config.halo_knots:  # hat functions on HALO_KNOTS (flat beyond the last): any radial profile
            t = HALO_KNOTS
            rc = r.clamp(t[0], t[-1])
            radial = []
            for j in range(len(t)):
                left = ((rc - t[j - 1]) / (t[j] - t[j - 1])).clamp(0.0, 1.0) if j > 0 else torch.ones_like(rc)
                right = ((t[j + 1] - rc) / (t[j + 1] - t[j])).clamp(0.0, 1.0) if j + 1 < len(t) else torch.ones_like(rc)
                radial.append(torch.minimum(left, right))
        else:
            radial = [torch.ones_like(r), 0.1 * r, torch.log(r + 0.5), e3]
        return torch.stack(radial + [sec_m1 * (dy * dy - dx * dx) / (r * r + 1.0), sin_a * dy * inv,
                                     sin_a * dy * e3 / 3.0, cyr * dy * inv, cxr * dx * inv], dim=-1)

    def _halo_inputs(self, cov: torch.Tensor, offsets: torch.Tensor, cond: torch.Tensor):
        """What the halo term needs per layer and shower: the axis (L, n, 2) in local cell units, sin and
        sec - 1 of the angle (1, n), the layer centroid from the axis (L, n, 2) in cells, and the coefficients
        (L, n, 4, K)."""
        n_l = self.n_layers
        axis = offsets[..., :2] + 0.5
        a = cond[:, 1].float()[None] * (math.pi / 180)
        c_raw = self._lateral_raw(cov[:, :, 2:5])[..., :2]
        if self.config.halo_no_width:  # covariates 4 and 5: the layer's log mean r^2 and (with hit_count) hit count
            keep = torch.ones(cov.shape[2], dtype=cov.dtype, device=cov.device)
            keep[4:4 + self.n_feat - 3] = 0.0
            cov = cov * keep
        coef = torch.bmm(cov, self.halo_w).reshape(n_l, -1, 4, self.n_halo)
        return axis, torch.sin(a), 1.0 / torch.cos(a) - 1.0, c_raw.float(), coef

    def _halo_logits(self, cov: torch.Tensor, offsets: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The halo term's part of the hit logit (L, n, n_lat), zero on the core block."""
        axis, sin_a, sec_m1, c_raw, coef = self._halo_inputs(cov, offsets, cond)
        dx = self.cell_x - axis[..., 0:1]
        dy = self.cell_y - axis[..., 1:2]  # (L, n, n_lat)
        if self.config.halo_knots:
            psi = self._halo_basis(dx, dy, sin_a[..., None], sec_m1[..., None], c_raw[..., 0:1], c_raw[..., 1:2])
            return torch.einsum("lnck,lnk->lnc", psi.to(coef.dtype), coef[:, :, 0]).float() * self.halo_mask
        # sum_k b_k psi_k written out (the same as _halo_basis contracted with b, without the (L, n, n_lat, K) basis)
        k = coef[:, :, 0].float()[..., None]  # (L, n, K, 1)
        r = torch.sqrt(dx * dx + dy * dy + 1e-6)
        e3 = torch.exp(r * (-1.0 / 3.0))
        inv = 1.0 / (r + 1.0)
        out = k[:, :, 0] + k[:, :, 1] * (0.1 * r) + k[:, :, 2] * torch.log(r + 0.5) + k[:, :, 3] * e3
        out = out + (k[:, :, 4] * sec_m1[..., None]) * ((dy * dy - dx * dx) / (r * r + 1.0))
        odd_y = sin_a[..., None] * (k[:, :, 5] * inv + k[:, :, 6] * (e3 / 3.0)) + k[:, :, 7] * c_raw[..., 1:2] * inv
        out = out + dy * odd_y + (k[:, :, 8] * c_raw[..., 0:1]) * (dx * inv)
        return out * self.halo_mask

    def _halo_at(self, cov: torch.Tensor, offsets: torch.Tensor, cond: torch.Tensor, lay: torch.Tensor,
                 row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """The halo term (H, 4) of the hit logit, mu, log sigma and soft-hit weight at the hit cells, and in a 5th
        column the weight of their own laws: sin(angle) in the halo, 1 on the core block."""
        axis, sin_a, sec_m1, c_raw, coef = self._halo_inputs(cov, offsets, cond)
        ax, cx = axis[lay, row], c_raw[lay, row]
        psi = self._halo_basis(self.cell_x[col] - ax[:, 0], self.cell_y[col] - ax[:, 1], sin_a[0, row],
                               sec_m1[0, row], cx[:, 0], cx[:, 1])  # (H, K)
        m = self.halo_mask[col]
        terms = torch.einsum("hk,hjk->hj", psi.to(coef.dtype), coef[lay, row]).float() * m[:, None]
        own = 1.0 + m * (self._own_weight(cond)[row] - 1.0)
        return torch.cat([terms, own[:, None]], dim=1)

    def _own_weight(self, cond: torch.Tensor) -> torch.Tensor:
        """The weight (n,) of the halo cells' own laws: sin(angle), or with ``halo_ramp_deg`` min(1, sin(angle) /
        sin(halo_ramp_deg)) (zero at normal incidence either way)."""
        sin_a = torch.sin(cond[:, 1].float() * (math.pi / 180))
        ramp = self.config.halo_ramp_deg
        return sin_a if ramp <= 0 else torch.clamp(sin_a / math.sin(ramp * math.pi / 180), max=1.0)

    def _halo_own(self, cond: torch.Tensor) -> torch.Tensor:
        """The weight (1, n, n_lat) of the cells' own hit-logit laws: see _own_weight in the halo, 1 on the core."""
        return 1.0 + self.halo_mask * (self._own_weight(cond)[:, None] - 1.0)[None]

    def _start_halo(self) -> None:
        """Start the halo term at a least-squares fit of the halo cells' starting intercepts (axis mid-cell, normal
        incidence, centroid on the axis), per layer and law, and leave the residual as the cells' own intercepts."""
        n_l, n_lat = self.n_layers, self.n_lat
        idx = torch.nonzero(self.halo_mask > 0)[:, 0]
        zero = torch.zeros(len(idx))
        psi = self._halo_basis(self.cell_x[idx] - 0.5, self.cell_y[idx] - 0.5, zero, zero, zero, zero).double()
        rows = torch.arange(n_l)[:, None] * n_lat + idx[None]  # (L, H)
        k = self.n_halo
        eye = 1e-3 * torch.eye(k, dtype=torch.float64)
        with torch.no_grad():
            self.halo_w.zero_()
            laws = [self.cell_hit[:, 0, idx], self.cell_mu[rows, 0], self.cell_log_sigma[rows, 0]]
            if self.cell_mix is not None:
                laws.append(self.cell_mix[rows, 0])
            for law, v in enumerate(laws):
                a = torch.linalg.solve(psi.T @ psi + eye, psi.T @ v.double().T)  # (K, L)
                self.halo_w[:, 0, law * k:(law + 1) * k] = a.T.float()
                resid = v - (psi @ a).T.float()  # stays in the cells' own intercepts (weighted by sin(angle))
                if law == 0:
                    self.cell_hit[:, 0, idx] = resid
                else:
                    (self.cell_mu, self.cell_log_sigma, self.cell_mix)[law - 1][rows, 0] = resid

    def _covariates(self, feat_std: torch.Tensor, cf: torch.Tensor, offsets: torch.Tensor | None,
                    cond: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer covariates (L, n, n_cov) for the cell stage from standardised features (n, dim) (``cond``, the
        raw conditions, is needed with ``angle_basis``)."""
        n_l = self.n_layers  # shapes stay symbolic in the batch size (ONNX export)
        per_layer = self._per_layer(feat_std).reshape(-1, self.n_feat, n_l).permute(2, 0, 1)  # (L, n, n_feat)
        ones = torch.ones_like(per_layer[:, :, :1])
        parts = [ones, per_layer, cf[None].expand(n_l, -1, -1)]
        if offsets is not None:
            parts.append(offsets.to(per_layer.dtype))
        if self.config.angle_basis > 0:
            if cond is None:
                raise ValueError("layerflow: the angle_basis covariates need the raw conditions")
            parts.append(self._angle_bumps(cond)[None].expand(n_l, -1, -1).to(per_layer.dtype))
        if self.config.centroid_over_width:
            parts.append(self._centroid_over_width(per_layer) / self.cow_scale[:, None, :])
        return torch.cat(parts, dim=2)

    def _lateral_raw(self, lateral: torch.Tensor) -> torch.Tensor:
        """Standardised (cx, cy, log(r^2 + 1/4)) per layer (L, n, 3) back in raw units (cells from the axis)."""
        n_l = self.n_layers
        std, mean = self.feat_std[n_l:4 * n_l].reshape(3, n_l).T, self.feat_mean[n_l:4 * n_l].reshape(3, n_l).T
        return lateral * std[:, None] + mean[:, None]

    def _centroid_over_width(self, per_layer: torch.Tensor) -> torch.Tensor:
        """(cx, cy) / mean r^2 of each layer in raw units, (L, n, 2), from the standardised features (L, n, n_feat)
        (the flow's log feature is log(r^2 + 1/4), so the ratio stays finite for a layer with one hit; ``cow_soft``
        adds to that denominator)."""
        raw = self._lateral_raw(per_layer[:, :, 1:4])
        if self.config.cow_soft > 0:
            return raw[:, :, :2] / (torch.exp(raw[:, :, 2:3]) + self.config.cow_soft)
        return raw[:, :, :2] * torch.exp(-raw[:, :, 2:3])

    # ---- preprocessing ------------------------------------------------------------------------------
    def _fit_preprocessing(self, data: Any) -> None:
        """Standardisation of the layer features and of the flow, and a moment-based start for the cells."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        n_l, n_lat, chunk = self.n_layers, self.n_lat, 500
        cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
        energies = cond[:, 0]
        showers = data.showers
        n = len(energies)
        feats = []
        hits = torch.zeros(n_l * n_lat, dtype=torch.float64)
        s1 = torch.zeros_like(hits)
        s2 = torch.zeros_like(hits)
        cell_max = torch.zeros(n_l * n_lat)
        soft = torch.zeros_like(hits)
        mip_hist = torch.zeros(n_l, max(cfg.mip_bins, 1))
        cell_layer = torch.arange(n_l).repeat_interleave(n_lat)
        for i in range(0, n, chunk):
            x = torch.as_tensor(np.asarray(showers[i:i + chunk]), dtype=torch.float32)
            feats.append(self.layer_features(x, energies[i:i + chunk], cond=cond[i:i + chunk])[0])
            h = x > 0
            ly = torch.log(torch.where(h, x, torch.ones_like(x))).double()
            hits += h.sum(0)
            s1 += ly.sum(0)
            s2 += (ly ** 2).sum(0)
            cell_max = torch.maximum(cell_max, x.max(0).values)
            if cfg.mip_bins > 0:
                hs = h & (x < math.exp(cfg.mip_log_max))  # soft hits: what the histogram starts from
                soft += hs.sum(0)
                b = self._mip_bin(torch.log(x[hs]))
                mip_hist.view(-1).index_add_(0, cell_layer.expand(len(x), -1)[hs] * cfg.mip_bins + b,
                                             torch.ones_like(b, dtype=torch.float32))
        f = torch.cat(feats).double()
        mean, std = f.mean(0), f.std(0)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.feat_mean.copy_(mean.float())
        self.feat_std.copy_(std.float())
        # Conditional mean of the standardised features: least squares on [1, lE, lE^2, other condition features].
        cf = self.condition_features(cond).double()
        basis = self._cond_basis(cf)
        fs = (f - mean) / std
        eye = torch.eye(basis.shape[1], dtype=torch.float64)
        coef = torch.linalg.lstsq(basis.T @ basis + 1e-6 * eye, basis.T @ fs).solution
        resid = fs - basis @ coef
        rstd = resid.std(0)
        self.flow_coef.copy_(coef.float())
        self.flow_std.copy_(torch.where(rstd > 1e-6, rstd, torch.ones_like(rstd)).float())
        if cfg.clamp_features:
            y = resid / self.flow_std.double()
            lo, hi = y.min(0).values, y.max(0).values
            self.y_lo.copy_((lo - cfg.clamp_margin * (hi - lo)).float())
            self.y_hi.copy_((hi + cfg.clamp_margin * (hi - lo)).float())
        self.cell_log_e_max.copy_(torch.log(cell_max.clamp(min=0.1) * cfg.cell_cap_margin).float())
        if cfg.centroid_over_width:
            per_layer = self._per_layer(fs.float()).reshape(n, self.n_feat, n_l).permute(2, 0, 1)
            rms = self._centroid_over_width(per_layer).double().pow(2).mean(1).sqrt()  # (L, 2)
            self.cow_scale.copy_(torch.where(rms > 1e-6, rms, torch.ones_like(rms)).float())
        # Cells: hit frequency and log-energy moments as intercepts, pooled per layer where statistics are poor.
        p = (hits / max(n, 1)).clamp(cfg.min_hit_prob, 1 - 1e-4)
        mu = s1 / hits.clamp(min=1)
        var = (s2 / hits.clamp(min=1) - mu ** 2).clamp(min=0.09)
        hits_l, s1_l = hits.view(n_l, n_lat), s1.view(n_l, n_lat)
        mu_l = (s1_l.sum(1) / hits_l.sum(1).clamp(min=1))[:, None].expand(n_l, n_lat).reshape(-1)
        w = hits / (hits + 10.0)
        mu = w * mu + (1 - w) * mu_l
        sd = w * var.sqrt() + (1 - w) * 1.0
        with torch.no_grad():
            for par in (self.cell_hit, self.cell_mu, self.cell_log_sigma, self.cell_skew, self.cell_log_tail):
                par.zero_()
            if self.mip_logits is not None and self.cell_mix is not None:
                # start each cell's soft-hit weight at its fraction of soft hits (pooled where statistics are poor)
                soft_l = (soft.view(n_l, n_lat).sum(1) / hits_l.sum(1).clamp(min=1))[:, None].expand(n_l, n_lat)
                frac = w * soft / hits.clamp(min=1) + (1 - w) * soft_l.reshape(-1)
                self.cell_mix.zero_()
                self.cell_mix[:, 0] = torch.logit(frac.clamp(0.01, 0.99)).float()
                self.mip_logits.copy_(torch.log(mip_hist + 1.0) - torch.log(mip_hist + 1.0).mean(1, keepdim=True))
            self.cell_hit[:, 0, :] = torch.logit(p).view(n_l, n_lat).float()
            self.cell_mu[:, 0] = mu.float()
            self.cell_log_sigma[:, 0] = torch.log(sd).float()
            if self.halo_w is not None:  # start the halo term at the halo cells' starts (fit at normal incidence)
                self._start_halo()
            if self.core_w is not None and cfg.core_exclusive:  # start the core term where the cells start
                self.core_w.zero_()
                dx = (self.cell_x[self.core_idx] - 0.5)[None]
                dy = (self.cell_y[self.core_idx] - 0.5)[None]
                phi = self._core_basis_values(dx, dy, torch.zeros(1))[0].double()  # (B^2, K), the axis mid-cell
                rows = torch.arange(n_l)[:, None] * n_lat + self.core_idx[None]  # (L, B^2)
                starts = [self.cell_hit[:, 0, self.core_idx], self.cell_mu[rows, 0], self.cell_log_sigma[rows, 0]]
                if self.cell_mix is not None:
                    starts.append(self.cell_mix[rows, 0])
                eye = 1e-3 * torch.eye(phi.shape[1], dtype=torch.float64)
                for law, v in enumerate(starts):
                    a = torch.linalg.solve(phi.T @ phi + eye, phi.T @ v.double().T)  # (K, L)
                    self.core_w[:, 0, law * self.core_basis:(law + 1) * self.core_basis] = a.T.float()
        self.tie_mirrors()

    # ---- flow ---------------------------------------------------------------------------------------
    def _stages(self) -> list[tuple[nn.ModuleList, torch.Tensor, torch.Tensor, slice]]:
        """The flows in sampling order as (blocks, perms, inverse perms, their slice of the features); each is
        conditioned on the conditions and on the features of the stages before it."""
        main = (self.blocks, self.perms, self.inv_perms, slice(0, self.flow_dim))
        if self.count_blocks is None:
            return [main]
        k = N_FEAT * self.n_layers + self.total
        count = (self.count_blocks, self.count_perms, self.count_inv_perms, slice(k, self.dim))
        if self.total_blocks is not None:
            total = (self.total_blocks, self.total_perms, self.total_inv_perms, slice(k - 1, k))
            return [count, total, main]
        return [count, main] if self.config.counts_first else [main, count]

    def _flow_forward(self, y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (n, dim) -> latent (n, dim, same layout) and log|det J|."""
        zs, logdet, cond = {}, torch.zeros(len(y), device=y.device, dtype=y.dtype), c
        for blocks, perms, _, part in self._stages():
            x = y[:, part]
            for i, block in enumerate(blocks):
                x, ld = block(x[:, perms[i]], cond)
                logdet = logdet + ld
            zs[part.start] = x
            cond = torch.cat([cond, y[:, part]], dim=1)
        return torch.cat([zs[k] for k in sorted(zs)], dim=1), logdet

    def _flow_inverse(self, z: torch.Tensor, c: torch.Tensor, mean_fs: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> standardised features (the inverse of :meth:`_flow_forward`). With ``count_centres`` (and
        ``mean_fs``, the conditional mean of the standardised features) the hit counts are put at the centres of
        their dequantisation bins before the later stages see them."""
        ys, cond = {}, c
        k_count = N_FEAT * self.n_layers + self.total
        centre = self.config.count_centres and mean_fs is not None and self.count_blocks is not None
        for blocks, _, inv_perms, part in self._stages():
            x = z[:, part]
            for i in range(len(blocks) - 1, -1, -1):
                x = blocks[i].inverse(x, cond)[:, inv_perms[i]]
            if centre and part.start == k_count:
                x = self._count_bin_centres(x, mean_fs[:, part], part)
            ys[part.start] = x
            cond = torch.cat([cond, x], dim=1)
        return torch.cat([ys[k] for k in sorted(ys)], dim=1)

    def _count_bin_centres(self, y: torch.Tensor, mean: torch.Tensor, part: slice) -> torch.Tensor:
        """Residuals ``y`` of the log hit counts log(1 + count + u) moved to u = 1/2, the centre of each count's
        dequantisation bin (the count itself unchanged). Training dequantises the counts within their bins, so a
        count drawn near the edge between 0 and 1 hits might make the later stages interpolate between an empty
        and a one-hit layer (stop 30: not why one-hit layers get half Geant4's energy; docs/models.md, item 14)."""
        std, f_mean, f_std = self.flow_std[part], self.feat_mean[part], self.feat_std[part]
        if self.config.clamp_features:
            y = torch.minimum(torch.maximum(y, self.y_lo[part]), self.y_hi[part])
        log_count = (y * std + mean) * f_std + f_mean
        count = torch.floor(torch.exp(log_count) - 1).clamp(0, self.n_lat)
        return ((torch.log(count + 1.5) - f_mean) / f_std - mean) / std

    # ---- cell stage ---------------------------------------------------------------------------------
    def _hit_logits(self, cov: torch.Tensor, core: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                    cond: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    layers: slice = slice(None)) -> torch.Tensor:
        """Hit logits (L, n, n_lat) from covariates (L, n, n_cov): one batched matrix product (plus the core term,
        and the halo term, which needs the axis offsets and raw conditions); ``out``: a float32 buffer for the
        product (sampling reuses one, :class:`kernels.ScratchPool`). ``layers``: the layers that ``cov`` and
        ``core`` hold, a slice of all (sampling makes the logits a few layers at a time; not with the halo term)."""
        if layers != slice(None) and self.halo_w is not None:
            raise ValueError("layerflow: the halo term's logits are made for all layers at once")
        w = self.cell_hit[layers] * self.cell_keep if self.config.core_exclusive else self.cell_hit[layers]
        logit = torch.bmm(cov, w, out=out) if out is not None else torch.bmm(cov, w).float()  # f32 under bf16 autocast
        if self.halo_w is not None:
            if offsets is None or cond is None:
                raise ValueError("layerflow: the halo term needs the axis offsets and the raw conditions")
            logit = logit * self._halo_own(cond) + self._halo_logits(cov, offsets, cond)
        if core is None:
            return logit
        if torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            return logit + core[:, :, self.core_pos, 0]
        logit.index_add_(2, self.core_idx, core[:, :, :-1, 0])  # sampling: only the core block's cells (same sums)
        return logit

    def _core_basis_values(self, dx: torch.Tensor, dy: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """The core term's basis (..., B^2, K): :meth:`_core_basis` stacked."""
        return torch.stack(self._core_basis(dx, dy, angle), dim=-1)

    def _core_basis(self, dx: torch.Tensor, dy: torch.Tensor, angle: torch.Tensor) -> list[torch.Tensor]:
        """The core term's K basis functions, each (..., B^2), at displacements (dx, dy) from the axis (cells),
        angle (deg) (n,).

        Gaussians in the distance at widths core_width x 2^k and odd partners in dy. With ``core_exclusive`` also a
        constant and the distance itself (the core cells have no intercepts of their own), and the odd and
        elongated (dy^2 - dx^2) terms scaled by sin(angle) and sec(angle) - 1: at normal incidence the core is then
        symmetric by construction, as Geant4's is."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        r2 = dx * dx + dy * dy
        if not cfg.core_exclusive:
            basis = []
            for k in range(3):
                s = cfg.core_width * 2.0 ** k
                g = torch.exp(r2 * (-0.5 / s ** 2))
                basis += [g, g * (dy / s)]
            return basis
        a = angle * (math.pi / 180)
        sin_a, sec_m1 = torch.sin(a)[:, None], 1.0 / torch.cos(a)[:, None] - 1.0  # (n, 1)
        g = [torch.exp(r2 * (-0.5 / (cfg.core_width * 2.0 ** k) ** 2)) for k in range(4)]
        basis = [torch.ones_like(r2), torch.sqrt(r2 + 1e-6)] + g
        basis += [sin_a * g[k] * (dy / (cfg.core_width * 2.0 ** k)) for k in range(3)]
        basis += [sec_m1 * g[k] * ((dy * dy - dx * dx) / (cfg.core_width * 2.0 ** k) ** 2) for k in (1, 2)]
        if cfg.core_far:  # the halo: a slow fall-off with the distance (hit probability, soft-hit weight)
            r = basis[1]
            basis += [torch.log(r + 0.5), torch.exp(r * (-1.0 / 3.0))]
        return basis

    def _core_terms(self, cov: torch.Tensor, offsets: torch.Tensor | None,
                    cond: torch.Tensor | None = None) -> torch.Tensor | None:
        """The core term (L, n, B^2 + 1, laws) of the hit logit, mu, log sigma and soft-hit weight (and with
        ``core_exclusive`` the skew and log tail weight) on the core block's cells (a last all-zero row stands for
        every cell outside the block); None without a core term."""
        if self.core_w is None or offsets is None:
            return None
        ax, ay = offsets[..., 0:1] + 0.5, offsets[..., 1:2] + 0.5  # (L, n, 1): the axis in local cell units
        dx = self.cell_x[self.core_idx] - ax
        dy = self.cell_y[self.core_idx] - ay  # (L, n, B^2)
        angle = cond[:, 1].float() if cond is not None else torch.zeros_like(ax[0, :, 0])
        basis = [b.to(cov.dtype) for b in self._core_basis(dx, dy, angle)]  # K x (L, n, B^2)
        coef = torch.bmm(cov, self.core_w).reshape(self.n_layers, -1, self.core_laws, self.core_basis)
        if self.core_cw is None and (fast := basis_dot(basis, coef)) is not None:  # sampling on the CPU
            return fast  # the same sums, the zero row included
        phi = torch.stack(basis, dim=-1)  # (L, n, B^2, K)
        term = torch.einsum("lnbk,lnjk->lnbj", phi, coef).float()
        if self.core_cw is not None:  # follow the layer's centroid: zero at the axis, so symmetric where it is
            cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
            n_l = self.n_layers
            std, mean = self.feat_std[n_l:3 * n_l].reshape(2, n_l).T, self.feat_mean[n_l:3 * n_l].reshape(2, n_l).T
            c_raw = cov[:, :, 2:4] * std[:, None] + mean[:, None]  # (L, n, 2): the centroid in cells from the axis
            r2 = dx * dx + dy * dy
            odd = []
            for k in range(3):
                s = cfg.core_width * 2.0 ** k
                g = torch.exp(r2 * (-0.5 / s ** 2)) / s
                odd.append(torch.stack([dx * g, dy * g], dim=-1))
            odd_b = torch.stack(odd, dim=-1) * c_raw.float()[:, :, None, :, None]  # (L, n, B^2, 2, 3)
            term = term + torch.einsum("lnbck,ljck->lnbj", odd_b, self.core_cw.float())
        return torch.cat([term, torch.zeros_like(term[:, :, :1])], dim=2)

    def _core_at(self, core: torch.Tensor | None, lay: torch.Tensor, row: torch.Tensor,
                 col: torch.Tensor) -> torch.Tensor | None:
        """The core term (H, 4) at the hit cells (layer, shower, cell within the layer)."""
        if core is None:
            return None
        n_l, n, n_b, n_j = core.shape  # one gather of whole rows (faster than three index tensors)
        return core.reshape(-1, n_j).index_select(0, (lay * n + row) * n_b + self.core_pos[col])

    def _mip_bin(self, y: torch.Tensor) -> torch.Tensor:
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        width = (cfg.mip_log_max - cfg.mip_log_min) / cfg.mip_bins
        return ((y - cfg.mip_log_min) / width).floor().clamp(0, cfg.mip_bins - 1).long()

    def _mip_log_density(self, y: torch.Tensor, lay: torch.Tensor) -> torch.Tensor:
        """ln density of ln(E_hit) under the layer's soft-hit histogram."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        width = (cfg.mip_log_max - cfg.mip_log_min) / cfg.mip_bins
        log_prob = torch.log_softmax(self.mip_logits, dim=1)
        inside = log_prob[lay, self._mip_bin(y)] - math.log(width)
        return torch.where(y < cfg.mip_log_max, inside, torch.full_like(inside, -50.0))  # no hard hits in it

    def _mip_quantile(self, q: torch.Tensor, lay: torch.Tensor) -> torch.Tensor:
        """ln(E_hit) at quantile q of the layer's soft-hit histogram (piecewise uniform within bins)."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        k = cfg.mip_bins
        width = (cfg.mip_log_max - cfg.mip_log_min) / k
        prob = torch.softmax(self.mip_logits, dim=1)  # (L, K)
        cdf = torch.cumsum(prob, dim=1)
        if torch.onnx.is_in_onnx_export():  # no searchsorted in the exporter: compare with the whole row
            c = cdf[lay]  # (H, K)
            b = (c < q[:, None]).sum(dim=1).clamp(max=k - 1)
            upper = torch.gather(c, 1, b[:, None])[:, 0]
        else:  # the same bin: the compiled bucket search on the CPU, else a binary search over the layers' CDFs
            pos = first_bins(cdf, q, lay)
            if pos is None:  # the CDFs laid end to end, offset by the layer (exact in float64)
                flat = (cdf.double() + torch.arange(cdf.shape[0], device=cdf.device, dtype=torch.float64)[:, None])
                pos = torch.searchsorted(flat.reshape(-1), q.double() + lay.double()) - lay * k
            b = pos.clamp(max=k - 1)
            upper = cdf.reshape(-1)[lay * k + b]
        p_b = prob[lay, b]
        frac = ((q - (upper - p_b)) / p_b.clamp(min=1e-12)).clamp(0.0, 1.0)
        return cfg.mip_log_min + width * (b.float() + frac)

    def _hit_params(self, cov: torch.Tensor, lay: torch.Tensor, row: torch.Tensor, flat: torch.Tensor,
                    core_at: torch.Tensor | None = None, halo_at: torch.Tensor | None = None,
                    lin: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(mu, sigma, skew, tail) of log(E_hit) for the hit cells given by layer, shower and flat cell index (and
        the core and halo terms at those cells; ``lin``: the per-cell linear parts of mu and log sigma, if made)."""
        if lin is None:
            g = cov[lay, row]  # (H, n_cov)
            mu = (g * self.cell_mu[flat]).sum(1)
            log_sigma = (g * self.cell_log_sigma[flat]).sum(1)
        else:
            mu, log_sigma = lin
        if halo_at is not None:
            mu, log_sigma = mu * halo_at[:, 4] + halo_at[:, 1], log_sigma * halo_at[:, 4] + halo_at[:, 2]
        skew, log_tail = self.cell_skew[flat], self.cell_log_tail[flat]
        if core_at is not None and self.config.core_exclusive:  # the core cells' laws are the core term's alone
            keep = self.cell_keep[flat - lay * self.n_lat]
            mu, log_sigma, skew, log_tail = mu * keep, log_sigma * keep, skew * keep, log_tail * keep
            skew, log_tail = skew + core_at[:, 4], log_tail + core_at[:, 5]
        if core_at is not None:
            mu, log_sigma = mu + core_at[:, 1], log_sigma + core_at[:, 2]
        log_sigma = log_sigma.clamp(-5.0, 3.0)
        tail = torch.exp(log_tail.clamp(-2.0, 2.0))
        return mu, log_sigma, skew, tail

    def _mix_logit(self, cov: torch.Tensor, lay: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                   core_at: torch.Tensor | None, halo_at: torch.Tensor | None = None,
                   lin: torch.Tensor | None = None) -> torch.Tensor:
        """Logit of the soft-hit weight of the hit cells (``lin``: its per-cell linear part, if made)."""
        m = (cov[lay, row] * self.cell_mix[lay * self.n_lat + col]).sum(1) if lin is None else lin
        if halo_at is not None:
            m = m * halo_at[:, 4] + halo_at[:, 3]
        if core_at is None:
            return m
        return (m * self.cell_keep[col] if self.config.core_exclusive else m) + core_at[:, 3]

    def _shape_nll(self, showers: torch.Tensor, cov: torch.Tensor, core: torch.Tensor | None = None,
                   offsets: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of the cells given the layer covariates (and core and halo terms; the halo term
        needs the axis offsets and raw conditions), summed over cells (n,)."""
        n = showers.shape[0]
        x = showers.reshape(n, self.n_layers, self.n_lat).transpose(0, 1)  # (L, n, n_lat) view
        logit = self._hit_logits(cov, core, offsets, cond)
        hit = x > 0
        nll_hit = (F.softplus(logit) - logit * hit).sum(dim=(0, 2))
        lay, row, col = hit.nonzero(as_tuple=True)
        core_at = self._core_at(core, lay, row, col)
        halo_at = None if self.halo_w is None else self._halo_at(cov, offsets, cond, lay, row, col)
        mu, log_sigma, skew, tail = self._hit_params(cov, lay, row, lay * self.n_lat + col, core_at, halo_at)
        r = (torch.log(x[lay, row, col]) - mu) * torch.exp(-log_sigma)
        a = (tail * _asinh(r) - skew).clamp(-20.0, 20.0)
        z = _sinh(a)
        # log density of a standard logistic z, plus log |dz/dr| = log(tail) + log cosh(a) - 0.5 log(1 + r^2).
        log_pz = -z.abs() - 2 * F.softplus(-z.abs())
        log_cosh = a.abs() + F.softplus(-2 * a.abs()) - math.log(2.0)
        log_p = log_pz + torch.log(tail) + log_cosh - 0.5 * torch.log1p(r ** 2) - log_sigma
        if self.config.mip_bins > 0:
            m = self._mix_logit(cov, lay, row, col, core_at, halo_at)
            y = torch.log(x[lay, row, col])
            log_p = torch.logaddexp(F.logsigmoid(m) + self._mip_log_density(y, lay), F.logsigmoid(-m) + log_p)
        return nll_hit - torch.zeros_like(nll_hit).index_add(0, row, log_p)

    # ---- likelihood -----------------------------------------------------------------------------------
    def nll_terms(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-shower NLL of the flow (with dequantisation) and of the cells (n,), (n,)."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        cf = self.condition_features(batch.cond)
        n_l = self.n_layers
        u = batch.rand(n_l)  # noise through the batch: the same numbers in data-parallel shards
        u_count = batch.rand(n_l) if cfg.hit_count else None
        feat, e_l = self.layer_features(batch.showers, batch.energies, u, u_count, cond=batch.cond)
        fs = (feat - self.feat_mean) / self.feat_std
        # Lateral features of empty layers are arbitrary: spread them so the flow sees no point mass.
        empty = (e_l <= 0).repeat(1, self.dim // n_l + 1)[:, :self.dim]
        empty[:, :n_l] = False
        empty[:, N_FEAT * n_l:] = False  # the total, and the hit count (0) of an empty layer are meaningful
        noise = batch.randn(*fs.shape[1:], dtype=fs.dtype) * cfg.empty_layer_noise
        fs_flow = torch.where(empty, fs + noise, fs)
        if cfg.empty_logfrac > 0:  # empty layers' log energy: a compact blob, far from a one-hit layer's (item 14)
            blob = EMPTY_LOGFRAC_AT + cfg.empty_logfrac * batch.randn(n_l, dtype=fs.dtype)
            fs_flow = torch.cat([torch.where(e_l <= 0, blob, fs_flow[:, :n_l]), fs_flow[:, n_l:]], dim=1)
        y = (fs_flow - self._cond_basis(cf) @ self.flow_coef) / self.flow_std
        z, logdet = self._flow_forward(y, self._flow_cond(cf))
        flow_nll = 0.5 * (z ** 2).sum(1) + 0.5 * self.dim * math.log(2 * math.pi) - logdet
        flow_nll = flow_nll + torch.log(self.flow_std * self.feat_std).sum()
        clean_logfrac = torch.log((e_l + 0.5 * cfg.dequant_mev) / batch.energies.float()[:, None])
        parts = [clean_logfrac, feat[:, n_l:N_FEAT * n_l]]
        if self.total:
            parts.append(feat[:, N_FEAT * n_l:N_FEAT * n_l + 1])  # (not used by the cells)
        if cfg.hit_count:
            count = (batch.showers.reshape(len(batch), n_l, self.n_lat) > 0).sum(dim=2).float()
            parts.append(torch.log1p(count + 0.5))
        feat_clean = torch.cat(parts, dim=1)  # as layer_features(u=0.5, u_count=0.5)
        offsets = self._offsets(batch.cond)
        cov = self._covariates((feat_clean - self.feat_mean) / self.feat_std, cf, offsets, batch.cond)
        core = self._core_terms(cov, offsets, batch.cond)
        return flow_nll, self._shape_nll(batch.showers, cov, core, offsets, batch.cond)

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        flow_nll, shape_nll = self.nll_terms(batch)
        self._last = (float(flow_nll.detach().mean()) / self.dim, float(shape_nll.detach().mean()) / self.n_cells)
        return flow_nll.mean() / self.dim + cfg.shape_weight * shape_nll.mean() / self.n_cells

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        out = super().training_step(batch, optimizers, step, grad_clip, autocast)
        self.tie_mirrors()  # projected optimisation: the step moves the laws, the projection ties them again
        if hasattr(self, "_last"):
            out["flow"], out["cells"] = self._last
        return out

    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        """One Adam; the per-cell coefficients take 10x the flow's learning rate (they are plain GLM terms).

        With ``flow_weight_decay`` it is AdamW with that decay on the flows' weights alone."""
        cells = [p for p in (self.cell_hit, self.cell_mu, self.cell_log_sigma, self.cell_skew, self.cell_log_tail,
                             self.cell_mix, self.mip_logits, self.core_w, self.core_cw, self.halo_w) if p is not None]
        ids = {id(p) for p in cells}
        flow = [p for p in self.parameters() if id(p) not in ids]
        decay = self.config.flow_weight_decay  # type: ignore[attr-defined]
        if decay > 0:  # decoupled decay of the flows only (AdamW with no decay is Adam: the cell group is unchanged)
            if weight_decay > 0:
                raise ValueError("layerflow: model.flow_weight_decay and train.weight_decay are exclusive; "
                                 "set one of them")
            return {"main": torch.optim.AdamW([{"params": flow, "weight_decay": decay},
                                               {"params": cells, "lr": 10 * lr, "weight_decay": 0.0}], lr=lr)}
        return {"main": torch.optim.Adam([{"params": flow, "weight_decay": weight_decay},
                                          {"params": cells, "lr": 10 * lr}], lr=lr)}

    # ---- sampling -----------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        shapes = [((n, self.dim), "normal"), ((n, self.n_cells), "uniform")]
        if self.config.hit_count and not self.config.select_noise:  # energy quantiles apart from the hit choice
            shapes.append(((n, self.n_cells), "uniform"))
        return shapes

    def _tilt_to_centroids(self, e_hit: torch.Tensor, seg: torch.Tensor, col: torch.Tensor, fs: torch.Tensor,
                           e_layer: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Reweight the hits of each layer by exp(a_x (x - c_x) + a_y (y - c_y)) so that the layer's centroid becomes
        the flow's (the per-cell laws respond to the axis position only to first or second order; the flow's
        centroids carry it exactly). (a_x, a_y) solve the 2 x 2 moment equations of the linear tilt
        1 + a_x (x - c_x) + a_y (y - c_y), which keeps the layer energy; its exponential agrees to first order and
        never removes a hit. Layers with fewer than 3 hits or a degenerate spread are left alone."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        n_l = self.n_layers
        raw = fs[:, n_l:3 * n_l] * self.feat_std[n_l:3 * n_l] + self.feat_mean[n_l:3 * n_l]
        tx, ty = raw[:, :n_l], raw[:, n_l:]
        e_l = e_layer.clamp(min=1e-6)
        tx, ty = tx * (e_l + cfg.centroid_reg_mev) / e_l, ty * (e_l + cfg.centroid_reg_mev) / e_l
        if cfg.axis_features and self.cell_offsets:
            axis = (self._offsets(cond)[..., :2] + 0.5).permute(1, 0, 2)  # (n, L, 2)
            tx, ty = tx + axis[..., 0], ty + axis[..., 1]
        x, y = self.cell_x[col], self.cell_y[col]
        m = e_layer.numel()

        def ssum(v: torch.Tensor) -> torch.Tensor:
            return torch.zeros(m, dtype=v.dtype, device=v.device).scatter_add(0, seg, v)

        # Only hits well above the readout threshold are tilted (they carry the centroid); the soft hits keep their
        # energies, so the number of hits above any threshold below TILT_MIN_MEV does not change.
        hard = e_hit > TILT_MIN_MEV
        e_all = ssum(e_hit)
        e_hard = torch.where(hard, e_hit, torch.zeros_like(e_hit))
        e = ssum(e_hard)
        safe = e_all.clamp(min=1e-30)
        cx, cy = ssum(e_hit * x) / safe, ssum(e_hit * y) / safe  # the centroid of all hits
        dx, dy = x - cx[seg], y - cy[seg]
        vxx, vyy, vxy = ssum(e_hard * dx * dx), ssum(e_hard * dy * dy), ssum(e_hard * dx * dy)
        rx, ry = (tx.reshape(-1) - cx) * e_all, (ty.reshape(-1) - cy) * e_all
        det = vxx * vyy - vxy * vxy
        ok = (ssum(hard.to(e_hit.dtype)) >= 3) & (det > 1e-9 * (vxx * vyy).clamp(min=1e-30)) & (e > 0)
        det = torch.where(ok, det, torch.ones_like(det))
        ax = torch.where(ok, (vyy * rx - vxy * ry) / det, torch.zeros_like(det))
        ay = torch.where(ok, (vxx * ry - vxy * rx) / det, torch.zeros_like(det))
        # exp of the linear tilt: the same to first order, never zero, bounded to a factor e
        return torch.where(hard, e_hit * torch.exp((ax[seg] * dx + ay[seg] * dy).clamp(-1.0, 1.0)), e_hit)

    def _hits_exactly(self, logit: torch.Tensor, u: torch.Tensor, count: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hit mask (L, n, n_lat) with exactly ``count`` (n, L) hits per layer: Pareto order sampling; and the
        selection threshold (L, n, 1).

        The hit cells are the ``count`` cells with the smallest key logit(u) - logit(p): Rosen's order sampling, a
        close approximation of independent Bernoulli(p) hits conditioned on their number. The threshold is the
        next key (the (count + 1)-th smallest; +inf when every cell is hit): given it, the selected cells' keys are
        independent and below it, so u / sigmoid(threshold + logit(p)) is a fresh uniform for each hit.
        """
        u = u.clamp(1e-7, 1 - 1e-7)
        rank_key = torch.log(u)
        rank_key.sub_(torch.log1p(-u)).sub_(logit)  # logit(u) - logit(p), without temporaries
        k = count.transpose(0, 1).long()[..., None]  # (L, n, 1)
        n_lat = rank_key.shape[2]
        if torch.onnx.is_in_onnx_export():  # one top-k over all layers (k a tensor, so that ONNX keeps it dynamic)
            k_top = torch.clamp(k.max() + 1, 1, n_lat)
            smallest = torch.topk(rank_key, k_top, dim=2, largest=False, sorted=True).values
            kth = smallest.gather(2, (k - 1).clamp(min=0))
            nxt = smallest.gather(2, k.clamp(max=k_top - 1))
        else:  # a top-k per layer, each as deep as that layer needs: the same values, less work
            kth, nxt = torch.empty_like(rank_key[:, :, :1]), torch.empty_like(rank_key[:, :, :1])
            k_tops = torch.clamp(k.amax(dim=(1, 2)) + 1, 1, n_lat).tolist()
            for layer, k_top in enumerate(k_tops):
                smallest = torch.topk(rank_key[layer], k_top, dim=1, largest=False, sorted=True).values
                kth[layer] = smallest.gather(1, (k[layer] - 1).clamp(min=0))
                nxt[layer] = smallest.gather(1, k[layer].clamp(max=k_top - 1))
        nxt = torch.where(k < n_lat, nxt, torch.full_like(nxt, math.inf))
        return (rank_key <= kth) & (k > 0), nxt

    @torch.no_grad()
    def sample(self, conditions: Any, angles: Any = 0.0, seed: int | None = None,
               generator: torch.Generator | None = None, *, positions: Any = None, particles: Any = None,
               angled: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`ShowerModel.sample`. On the CPU the showers come from the hits of :meth:`sample_hits` (the same
        numbers), each chunk's scattered into its zeroed rows of the output: a dense window made per chunk and
        copied cost more than the model on the 27000-cell house window."""
        if self.cond_mean.device.type != "cpu":
            return super().sample(conditions, angles, seed, generator, positions=positions, particles=particles,
                                  angled=angled, out=out)
        c = as_conditions(conditions, angles, positions, particles)
        if angled is None:
            angled = bool(np.any(c.angle > 0))
        if out is not None:
            self._check_out(out, len(c), angled)
        n, n_win = len(c), int(np.prod(self.window_shape(angled)))
        dense = torch.empty((n, n_win), dtype=torch.float32) if out is None else out

        def scatter(i: int, m: int, row: torch.Tensor, cell: torch.Tensor, energy: torch.Tensor) -> None:
            block = dense[i:i + m]  # each chunk zeroes and fills its own rows, in its worker thread
            block.zero_()
            block.view(-1).index_put_((row * n_win + cell,), energy)

        self.hits_by_chunk(scatter, c, seed=seed, generator=generator, angled=angled)
        return dense

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        row, lay, col, flat, e = self._hits(cond, *noise)
        out = torch.zeros(cond.shape[0] * self.n_cells, dtype=e.dtype, device=e.device)
        return _put(out, row * self.n_cells + flat, e).reshape(-1, self.n_cells)

    def decode_window(self, cond: torch.Tensor, *noise: torch.Tensor, angled: bool = False) -> torch.Tensor:
        """The hits placed straight into the readout window (no dense local array in between)."""
        if self.frame == "window":
            return self.decode(cond, *noise)
        row, lay, col, flat, e = self._hits(cond, *noise)
        n_win = int(np.prod(self.window_shape(angled)))
        ny = self.shape[2]
        idx, inside = self.window_index(cond, row, lay, torch.div(col, ny, rounding_mode="floor"), col % ny, angled)
        n = cond.shape[0]
        dest = torch.where(inside, row * n_win + idx, torch.full_like(idx, n * n_win))  # outside -> a dump slot
        out = _put(torch.zeros(n * n_win + 1, dtype=e.dtype, device=e.device), dest, e)
        return out[:-1].reshape(n, n_win)

    def decode_window_hits(self, cond: torch.Tensor, *noise: torch.Tensor, angled: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The hits of :meth:`decode_window` without the dense window: row, window cell, energy (row-major)."""
        row, lay, col, flat, e = self._hits(cond, *noise)
        ny = self.shape[2]
        n_win = self.n_cells if self.frame == "window" else int(np.prod(self.window_shape(angled)))
        if self.frame != "window" and (fast := self._window_hits(cond, row, lay, col, e, angled)) is not None:
            row, idx, e, ordered = fast  # the compiled pass on the CPU (the same hits)
        else:
            if self.frame == "window":
                idx, keep = flat, e > 0
            else:
                idx, inside = self.window_index(cond, row, lay, torch.div(col, ny, rounding_mode="floor"), col % ny,
                                                angled)
                keep = inside & (e > 0)
            row, idx, e = row[keep], idx[keep], e[keep]
            key = row * n_win + idx  # each (row, cell) at most once: the local grid maps one-to-one
            ordered = key.numel() < 2 or bool((key[1:] > key[:-1]).all())  # the CPU kernels keep them in order
        if not ordered:
            order = torch.argsort(row * n_win + idx)
            row, idx, e = row[order], idx[order], e[order]
        return row, idx, e

    def _window_hits(self, cond: torch.Tensor, row: torch.Tensor, lay: torch.Tensor, col: torch.Tensor,
                     e: torch.Tensor, angled: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
        """:func:`kernels.window_hits` at the showers' axis shifts (None where the kernels do not apply)."""
        if not kernels_apply([e]):
            return None
        sx, sy, _, _ = self.axis_cells(cond)
        return window_hits(row, lay, col, e, sx.long(), sy.long(), self.shape[2], tuple(self.window_shape(angled)))

    def _flow_layers(self, cond: torch.Tensor, cf: torch.Tensor, z_flow: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flow stage of sampling: residuals ``y``, their conditional mean, the standardised features and the
        layer energies (MeV; layers below ``dequant_mev`` empty), before the layers share the visible energy."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        n_l = self.n_layers
        mean_fs = self._cond_basis(cf) @ self.flow_coef
        y = self._flow_inverse(z_flow, self._flow_cond(cf), mean_fs)
        if cfg.clamp_features:
            y = torch.minimum(torch.maximum(y, self.y_lo), self.y_hi)
        fs = y * self.flow_std + mean_fs  # standardised features
        logfrac = (fs[:, :n_l] * self.feat_std[:n_l] + self.feat_mean[:n_l]).clamp(max=0.0)
        e_layer = torch.exp(logfrac) * cond[:, 0].float()[:, None]
        e_layer = torch.where(e_layer > cfg.dequant_mev, e_layer, torch.zeros_like(e_layer))  # (n, L)
        if cfg.empty_logfrac > 0:  # the counts say which layers are empty (their log energy was a stand-in)
            e_layer = torch.where(self._flow_counts(fs) == 0, torch.zeros_like(e_layer), e_layer)
        return y, mean_fs, fs, e_layer

    def _flow_counts(self, fs: torch.Tensor) -> torch.Tensor:
        """Hit counts per layer (n, L) from the standardised features (``hit_count``)."""
        k = N_FEAT * self.n_layers + self.total
        log_count = fs[:, k:] * self.feat_std[k:] + self.feat_mean[k:]
        return torch.floor(torch.exp(log_count) - 1).clamp(0, self.n_lat)  # (no expm1 in ONNX)

    def _sparse_variable(self, e_layer: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log(layer energy x cos(angle)): the energy per unit of silicon path, so that one map serves all angles."""
        cos = torch.cos(cond[:, 1].float() * (math.pi / 180)).clamp(min=0.1)  # (no deg2rad in ONNX)
        return torch.log(e_layer.clamp(min=1e-30)) + torch.log(cos)[:, None]

    def _map_sparse(self, e_layer: torch.Tensor, count: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``sparse_map``: the energy of each layer with 1..K hits through its fitted quantile map, flow -> Geant4
        (piecewise linear between the stored quantiles, shifted by the end differences outside them)."""
        k_max = self.sparse_q_flow.shape[1]
        v = self._sparse_variable(e_layer, cond)
        kk = (count.long() - 1).clamp(0, k_max - 1)
        lay = torch.arange(self.n_layers, device=e_layer.device).expand_as(kk)
        qf, qd = self.sparse_q_flow[lay, kk], self.sparse_q_data[lay, kk]  # (n, L, Q)
        vc = torch.minimum(torch.maximum(v, qf[..., 0]), qf[..., -1])
        j = (vc[..., None] > qf).sum(-1).clamp(1, qf.shape[-1] - 1)[..., None]
        x0, x1 = qf.gather(-1, j - 1)[..., 0], qf.gather(-1, j)[..., 0]
        y0, y1 = qd.gather(-1, j - 1)[..., 0], qd.gather(-1, j)[..., 0]
        t = ((vc - x0) / (x1 - x0).clamp(min=1e-6)).clamp(0, 1)
        mapped = y0 + t * (y1 - y0) + (v - vc)
        sparse = (count >= 1) & (count <= k_max) & (e_layer > 0)
        return torch.where(sparse, torch.exp(mapped - (v - torch.log(e_layer.clamp(min=1e-30)))), e_layer)

    @torch.no_grad()
    def fit_sparse_map(self, cond: torch.Tensor, e_data: torch.Tensor, count_data: torch.Tensor, k_max: int,
                       generator: torch.Generator | None = None) -> None:
        """Fit ``sparse_map = k_max``: per layer and hit count 1..k_max the quantiles of log(energy x cos(angle)) of
        the flow's layers (sampled at ``cond``) and of the training showers' (``e_data``, ``count_data``, (n, L)
        in the model's own cells). A pair with fewer than SPARSE_MAP_MIN layers on either side maps to itself."""
        cf = self.condition_features(cond)
        z = torch.randn(len(cond), self.dim, generator=generator)
        _, _, fs, e_flow = self._flow_layers(cond, cf, z)
        count_flow = torch.where(e_flow > 0, self._flow_counts(fs), torch.zeros_like(e_flow))
        levels = torch.linspace(0.0, 1.0, SPARSE_MAP_Q + 2)[1:-1]
        v_flow, v_data = self._sparse_variable(e_flow, cond), self._sparse_variable(e_data, cond)
        q_flow = torch.zeros(self.n_layers, k_max, SPARSE_MAP_Q)
        q_data = torch.zeros_like(q_flow)
        for layer in range(self.n_layers):
            for k in range(1, k_max + 1):
                a = v_flow[(count_flow[:, layer] == k) & (e_flow[:, layer] > 0), layer]
                b = v_data[(count_data[:, layer] == k) & (e_data[:, layer] > 0), layer]
                if min(len(a), len(b)) < SPARSE_MAP_MIN:
                    a = b = torch.linspace(-20.0, 20.0, SPARSE_MAP_Q)  # the identity
                q_flow[layer, k - 1] = torch.quantile(a.double(), levels.double()).float()
                q_data[layer, k - 1] = torch.quantile(b.double(), levels.double()).float()
        q_flow = torch.cummax(q_flow, dim=-1).values  # (quantiles are sorted; cummax guards against ties' rounding)
        self.config.sparse_map = k_max
        self.register_buffer("sparse_q_flow", q_flow.to(self.feat_mean.device))
        self.register_buffer("sparse_q_data", q_data.to(self.feat_mean.device))

    def _hits(self, cond: torch.Tensor, *noise: torch.Tensor):
        """The hit cells (shower row, layer, cell within the layer, flat cell index) and their energies (MeV)."""
        z_flow, u_cells = noise[:2]
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        n_l, n_lat = self.n_layers, self.n_lat
        energies = cond[:, 0]
        cf = self.condition_features(cond)
        y, mean_fs, fs, e_layer = self._flow_layers(cond, cf, z_flow)
        if cfg.sparse_map:
            e_layer = self._map_sparse(e_layer, self._flow_counts(fs), cond)
        if self.total:  # the layers share the flow's visible energy in the proportions of its layer energies
            k = N_FEAT * n_l
            log_total = fs[:, k] * self.feat_std[k] + self.feat_mean[k]
            e_vis = torch.exp(log_total.clamp(max=0.0)) * energies.float()
            e_layer = e_layer * (e_vis / e_layer.sum(dim=1).clamp(min=1e-30))[:, None]
        offsets = self._offsets(cond)
        cov = self._covariates(self._centroids_scaled(y, mean_fs, cfg.centroid_gain), cf, offsets, cond)
        core = self._core_terms(cov, offsets, cond)
        cov_halo = None
        if cfg.halo_centroid_gain != 1.0 and core is not None and self.halo_w is None and not cfg.core_exclusive:
            cov_halo = self._covariates(self._centroids_scaled(y, mean_fs, cfg.centroid_gain * cfg.halo_centroid_gain),
                                        cf, offsets, cond)
        # Hurdle: a cell is hit when u < p; then v = u / p is a fresh uniform for the energy quantile.
        n = cond.shape[0]
        count = torch.where(e_layer > 0, self._flow_counts(fs), torch.zeros_like(e_layer)) if cfg.hit_count else None
        if count is not None and self.halo_w is None and kernels_apply([cov]):
            # the compiled selection (the reference's hits, below), its logits made LOGIT_BLOCK layers at a time into
            # one small reused buffer: each block is still in the cache when the kernel reads it
            buf = SCRATCH.take((LOGIT_BLOCK, n, n_lat), cov)

            def logits_of(l0: int, l1: int) -> torch.Tensor:
                part = slice(l0, l1)
                return self._sampling_logits(cov[part], None if cov_halo is None else cov_halo[part],
                                             None if core is None else core[part], offsets, cond,
                                             out=buf[:l1 - l0], layers=part)

            # the scan order is made once: it sets the kernel's speed, never the hits
            (lay, row, col, logit_hit, u_hit, thr_hit), self._scan_order = select_hits_by_layers(
                logits_of, (n_l, n, n_lat), u_cells, count, self._scan_order, LOGIT_BLOCK)
            SCRATCH.give(buf)
        else:
            buf = SCRATCH.take((n_l, n, n_lat), cov)  # given back once the hits are chosen
            logit = self._sampling_logits(cov, cov_halo, core, offsets, cond, out=buf)
            u = _made(u_cells).reshape(-1, n_l, n_lat).transpose(0, 1)  # (L, n, n_lat) view
            if count is not None:  # exactly the flow's number of hits per layer
                mask, threshold = self._hits_exactly(logit, u, count)
                lay, row, col = mask.nonzero(as_tuple=True)
                if cfg.select_noise:
                    logit_hit, thr_hit = logit[lay, row, col], threshold[lay, row, 0]
                    u_hit = u[lay, row, col].clamp(1e-7, 1 - 1e-7)
            else:  # independent hits
                p = torch.sigmoid(logit)
                lay, row, col = (u < p).nonzero(as_tuple=True)
                v_free = (u[lay, row, col] / p[lay, row, col]).clamp(1e-6, 1 - 1e-6)
            del logit, u
            SCRATCH.give(buf)
        flat = lay * n_lat + col
        if count is None:
            v = v_free
        elif cfg.select_noise:  # the energy quantile from the selection noise (see _hits_exactly)
            v = (u_hit / torch.sigmoid(thr_hit + logit_hit)).clamp(1e-6, 1 - 1e-6)
        else:  # the energy quantile from its own noise (made at the hits only where it is not made yet)
            v_all = noise[2]
            v = (v_all.at(row, flat) if isinstance(v_all, UniformBlock)
                 else v_all.reshape(-1, n_l, n_lat).transpose(0, 1)[lay, row, col]).clamp(1e-6, 1 - 1e-6)
        if cov_halo is None:
            e_hit = self._hit_energies(cov, lay, row, col, flat, v, core, offsets, cond)
        else:  # the core block's hits from cov, the others from cov_halo
            in_core = self.core_pos[col] < self.core_idx.numel()
            if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():  # one graph: both laws for every hit
                e_hit = torch.where(in_core, self._hit_energies(cov, lay, row, col, flat, v, core, offsets, cond),
                                    self._hit_energies(cov_halo, lay, row, col, flat, v, core, offsets, cond))
            else:  # each hit's laws once
                e_hit = torch.empty_like(v)
                for part, c in ((in_core, cov), (~in_core, cov_halo)):
                    i = part.nonzero().squeeze(1)
                    e_hit[i] = self._hit_energies(c, lay[i], row[i], col[i], flat[i], v[i], core, offsets, cond)
        seg = row * n_l + lay
        if cfg.match_centroids:
            e_hit = self._tilt_to_centroids(e_hit, seg, col, fs, e_layer, cond)
        # Rescale each layer to the flow's layer energy.
        target = e_layer.reshape(-1)
        total = torch.zeros_like(target).scatter_add(0, seg, e_hit)  # (index_add exports without the add)
        scale = torch.where(total > 0, target / total.clamp(min=1e-30), torch.zeros_like(total))
        e_hit = e_hit * scale[seg]
        if cfg.cap_rescaled:
            e_hit = self._cap_hits(e_hit, torch.exp(self.cell_log_e_max[flat]), seg, target)
        return row, lay, col, flat, e_hit

    def _sampling_logits(self, cov: torch.Tensor, cov_halo: torch.Tensor | None, core: torch.Tensor | None,
                         offsets: torch.Tensor | None, cond: torch.Tensor, out: torch.Tensor | None = None,
                         layers: slice = slice(None)) -> torch.Tensor:
        """Hit logits for sampling: :meth:`_hit_logits` of ``cov``, except that with ``cov_halo`` (the covariates
        at ``halo_centroid_gain``) the cells outside the core block take theirs from ``cov_halo``. ``layers``: as
        in :meth:`_hit_logits` (``cov``, ``cov_halo`` and ``core`` then hold those layers only)."""
        if cov_halo is None:
            return self._hit_logits(cov, core, offsets, cond, out=out, layers=layers)
        if core is None:
            raise ValueError("layerflow: halo_centroid_gain needs a core block")
        logit = self._hit_logits(cov_halo, None, offsets, cond, out=out, layers=layers)
        # (bf16 under autocast: cast to the buffer's type)
        core_logit = torch.bmm(cov, self.cell_hit[layers][:, :, self.core_idx])
        logit.index_copy_(2, self.core_idx, core_logit.to(logit.dtype))
        logit.index_add_(2, self.core_idx, core[:, :, :-1, 0].to(logit.dtype))
        return logit

    def _centroids_scaled(self, y: torch.Tensor, mean_fs: torch.Tensor, gain: float) -> torch.Tensor:
        """Standardised features from the flow's residuals ``y`` and conditional mean, the layer centroids'
        deviations from that mean scaled by ``gain`` (``centroid_gain``; 1: the features themselves)."""
        if gain == 1.0:
            return y * self.flow_std + mean_fs
        g = torch.ones_like(self.flow_std)
        g[self.n_layers:3 * self.n_layers] = gain
        return y * (self.flow_std * g) + mean_fs

    def _hit_energies(self, cov: torch.Tensor, lay: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                      flat: torch.Tensor, v: torch.Tensor, core: torch.Tensor | None, offsets: torch.Tensor | None,
                      cond: torch.Tensor) -> torch.Tensor:
        """The hits' energies (MeV) before the layer rescaling, from their uniforms ``v`` and their cells' laws at
        the covariates ``cov``."""
        cfg: LayerFlowConfig = self.config  # type: ignore[assignment]
        core_at = self._core_at(core, lay, row, col)
        halo_at = None if self.halo_w is None else self._halo_at(cov, offsets, cond, lay, row, col)
        # the per-cell linear laws at the hits: one compiled pass on the CPU (None elsewhere: torch inside)
        lin = gathered_dots(cov, lay, row, flat, [self.cell_mu, self.cell_log_sigma]
                            + ([self.cell_mix] if cfg.mip_bins > 0 else []))
        mu, log_sigma, skew, tail = self._hit_params(cov, lay, row, flat, core_at, halo_at,
                                                     None if lin is None else (lin[0], lin[1]))
        if cfg.mip_bins > 0:  # v < pi: the soft-hit component at quantile v / pi; else the cell's own law
            pi = torch.sigmoid(self._mix_logit(cov, lay, row, col, core_at, halo_at, None if lin is None else lin[2]))
            soft = v < pi
            y_soft = self._mip_quantile((v / pi.clamp(min=1e-6)).clamp(1e-6, 1 - 1e-6), lay)
            v = torch.where(soft, torch.full_like(v, 0.5), ((v - pi) / (1 - pi).clamp(min=1e-6)).clamp(1e-6, 1 - 1e-6))
        r = _sinh((_asinh(torch.log(v) - torch.log1p(-v)) + skew) / tail)
        y_hit = mu + torch.exp(log_sigma) * r
        if cfg.mip_bins > 0:
            y_hit = torch.where(soft, y_soft, y_hit)
        return torch.exp(torch.minimum(y_hit, self.cell_log_e_max[flat]))

    @staticmethod
    def _cap_hits(e: torch.Tensor, cap: torch.Tensor, seg: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Hit energies ``e`` held at their cells' caps, each layer's excess shared by its hits below the cap in
        proportion to their energies (two rounds; what no hit can take is lost). Layers without a hit over the
        cap are unchanged bit for bit. ``seg`` is each hit's (shower, layer) segment; ``target``, the segments'
        energies, only sizes the sums."""
        if not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():  # eager: only the layers that need it
            over = e > cap
            if not bool(over.any()):
                return e
            sel = (torch.zeros_like(target).scatter_add(0, seg, over.to(target.dtype)) > 0)[seg]
            if not bool(sel.all()):
                out = e.clone()
                out[sel] = LayerFlow._cap_hits(e[sel], cap[sel], seg[sel], target)
                return out
        for _ in range(2):
            over = e > cap
            full = e >= cap  # hits at their cap take no more
            excess = torch.zeros_like(target).scatter_add(0, seg, torch.where(over, e - cap, torch.zeros_like(e)))
            free = torch.zeros_like(target).scatter_add(0, seg, torch.where(full, torch.zeros_like(e), e))
            gain = torch.where(free > 0, excess / free.clamp(min=1e-30), torch.zeros_like(free))
            e = torch.where(full, torch.minimum(e, cap), e * (1 + gain[seg]))
        return torch.minimum(e, cap)
