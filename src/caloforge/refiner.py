"""The simulation refiner (``caloforge refine``): a residual network that makes simulated showers look like data.

Trained adversarially on *unpaired* samples (simulated showers, "data" showers) with a WGAN-GP critic, plus a
closeness term that keeps each refined shower near its input (the SimGAN / arXiv:1802.03325 recipe of the RWTH
talk). Why this form (docs/refiner.md): the mismatch between a simulation and a real readout is mostly local and
per channel (calibration per layer, dead cells, noise, a threshold), so the refiner is the identity plus an explicit,
readable residual correction, and a small residual convolutional network for whatever else is local:

    v = x * exp(g_layer + g_cell + r(x)) + sigma * z          (z ~ N(0, 1) per cell)
    y = v  where v > t, else 0

``x``: the shower (layers as channels of 30 x 30 images), ``g``: learned log-gains per layer and per cell (zero at
the start, except cells that never fire in the data although the simulation fills them: dead, started at -10),
``r``: a residual CNN on log(1 + x / scale) with a zero-initialised output, bounded to +-``max_log_correction``
(0 turns it off); ``sigma``: learned noise (the refiner is stochastic: a seeded noise draw adds noise the simulation
lacks); ``t``: a learned threshold (started at the smallest non-zero cell energy of the data; trained through a
sigmoid gate of width ``tau_mev`` with the hard cut in the forward pass, a straight-through estimator).

The critic sees u = log1p(y / scale) as images (three strided convolutions), per-layer energies, energy fractions and
occupancies, and the incident energy (a test beam knows it; without it the refiner learns the difference between
the two samples' energy spectra, which is itself a bias). The gradient penalty acts in u. The saved refiner is an
exponential moving average of the weights (``ema_decay``), which damps the adversarial oscillation.

A run directory holds ``run.json`` (configuration, data fingerprints), ``checkpoint.safetensors`` (refiner, its
average, critic, optimisers and RNG state: exact resume), ``history.jsonl`` and the refiner as
``refiner.safetensors`` + ``refiner.json`` (what ``caloforge refine apply`` reads; no code is ever loaded).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.jsonl"
WEIGHTS = "refiner.safetensors"
META = "refiner.json"
FORMAT = "caloforge-refiner-1"


class RefinerError(ValueError):
    """A refiner run or file is malformed, or does not fit the showers given to it."""


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture and training settings (all stored in run.json and refiner.json)."""

    hidden: int = 16  # channels of the residual CNN
    blocks: int = 1  # residual blocks
    critic_channels: int = 16
    critic_hidden: int = 128
    scale_mev: float = 0.015  # u = log1p(E / scale): 0.1 MIP, so MIP-like cells are well resolved
    max_log_correction: float = 0.0  # bound of the CNN's log-gain correction; 0: the CNN is off (docs/refiner.md)
    tau_mev: float = 0.005  # width of the soft threshold gate (gradients only)
    steps: int = 300
    batch_size: int = 32
    n_critic: int = 3
    lr: float = 5e-4  # the critic
    lr_net: float = 1e-4  # the residual CNN: slow, a correction on top of the explicit terms
    lr_params: float = 2e-3  # per-layer log-gains
    lr_readout: float = 1e-2  # log noise sigma and threshold (per layer)
    lr_cells: float = 1e-4  # per-cell gains: slow, so that they do not follow the critic's noise
    gp_lambda: float = 10.0
    closeness: float = 1.0  # weight of the closeness term (relative L1 between refined and input shower)
    match_window: int = 5  # pair each data shower with one of the 2k+1 simulated ones nearest in energy (0: off)
    threshold_mev: float = -1.0  # the readout threshold when known (DAQ settings); < 0: from the data sample
    noise_mev: float = -1.0  # the noise sigma when known (pedestal runs); < 0: start at 5 % of the threshold
    ema_decay: float = 0.99  # the saved refiner is this moving average of the weights (damps the GAN's oscillation)
    checkpoint_every: int = 100
    log_every: int = 25
    threads: int = 1  # torch CPU threads: 1 is fastest on a machine shared with other jobs
    seed: int = 0

    bounds: ClassVar[dict[str, tuple]] = {
        "hidden": (1, 512), "blocks": (0, 16), "critic_channels": (1, 512), "critic_hidden": (1, 4096),
        "scale_mev": (1e-6, 1e3), "max_log_correction": (0.0, 5.0), "tau_mev": (1e-6, 10.0), "steps": (1, 10**7),
        "batch_size": (1, 4096), "n_critic": (1, 100), "lr": (1e-9, 1.0), "lr_params": (1e-9, 1.0),
        "lr_cells": (0.0, 1.0), "lr_net": (0.0, 1.0), "lr_readout": (0.0, 1.0),
        "gp_lambda": (0.0, 1e4),
        "threshold_mev": (-1.0, 1e4), "match_window": (0, 10**6), "noise_mev": (-1.0, 1e3),
        "ema_decay": (0.0, 0.9999), "closeness": (0.0, 1e4),
        "checkpoint_every": (1, 10**7), "log_every": (1, 10**7), "threads": (0, 256), "seed": (0, 2**63 - 1),
    }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> RefinerConfig:
        from caloforge.validate import coerce_option

        if not isinstance(d, dict):
            raise RefinerError(f"{source}: expected a table of options, got {d!r:.60}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RefinerError(f"{source}: unknown option {unknown[0]!r}; expected some of {', '.join(sorted(names))}")
        defaults = cls()
        vals = {k: coerce_option(k, v, getattr(defaults, k), source, cls.bounds.get(k), RefinerError)
                for k, v in d.items()}
        return cls(**vals)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the networks -----------------------------------------------------------------------------------------
def _modules():
    """The torch modules (built lazily so that importing this module stays light)."""
    import torch
    from torch import nn

    class Refiner(nn.Module):
        """Shower (B, L, X, Y) MeV in, refined shower out; see the module docstring for the form."""

        def __init__(self, shape: tuple[int, int, int], cfg: RefinerConfig, threshold_mev: float = 0.0,
                     noise_mev: float | None = None):
            super().__init__()
            n_l, n_x, n_y = shape
            self.shape, self.cfg = tuple(shape), cfg
            self.log_gain_layer = nn.Parameter(torch.zeros(n_l))
            self.log_gain_cell = nn.Parameter(torch.zeros(n_l, n_x, n_y))
            noise = 0.05 * threshold_mev if noise_mev is None else noise_mev
            self.log_noise = nn.Parameter(torch.full((1,), math.log(max(noise, 1e-6))))
            # threshold = scale * softplus(raw): positive; softplus^-1(a) = a + log(1 - exp(-a))
            a = max(threshold_mev / cfg.scale_mev, 1e-4)
            self.raw_threshold = nn.Parameter(torch.full((1,), a + math.log(-math.expm1(-a))))
            h = cfg.hidden
            self.inp = nn.Conv2d(n_l, h, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(h, h, 3, padding=1),
                                                      nn.LeakyReLU(0.2), nn.Conv2d(h, h, 3, padding=1))
                                        for _ in range(cfg.blocks))
            self.out = nn.Conv2d(h, n_l, 3, padding=1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def threshold(self) -> torch.Tensor:
            return self.cfg.scale_mev * nn.functional.softplus(self.raw_threshold)

        def noise_sigma(self) -> torch.Tensor:
            return torch.exp(self.log_noise)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            cfg = self.cfg
            gain = self.log_gain_layer[:, None, None] + self.log_gain_cell
            m = cfg.max_log_correction
            if m > 0:  # the residual CNN
                h = self.inp(torch.log1p(x / cfg.scale_mev))
                for blk in self.blocks:
                    h = h + blk(h)
                gain = gain + m * torch.tanh(self.out(nn.functional.leaky_relu(h, 0.2)) / m)
            v = x * torch.exp(gain) + self.noise_sigma() * z
            t = self.threshold()
            hard = (v > t).to(v.dtype)
            soft = torch.sigmoid((v - t) / cfg.tau_mev)
            return v.clamp_min(0.0) * (hard + soft - soft.detach())  # forward: the hard cut; backward: the gate

    class Critic(nn.Module):
        """WGAN critic on u = log1p(y / scale) (B, L, X, Y): three strided convolutions, flattened into a dense
        layer (so positions count) + per-layer energies, energy fractions, occupancies and the incident energy."""

        def __init__(self, shape: tuple[int, int, int], cfg: RefinerConfig):
            super().__init__()
            n_l, n_x, n_y = shape
            c = cfg.critic_channels
            self.scale = cfg.scale_mev
            self.conv = nn.Sequential(
                nn.Conv2d(n_l, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Flatten())
            with torch.no_grad():
                n_flat = self.conv(torch.zeros(1, n_l, n_x, n_y)).shape[1]
            self.head = nn.Sequential(nn.Linear(n_flat + 3 * n_l + 1, cfg.critic_hidden), nn.LeakyReLU(0.2),
                                      nn.Linear(cfg.critic_hidden, 1))
            self.n_cells_layer = n_x * n_y

        def forward(self, u: torch.Tensor, log_e: torch.Tensor) -> torch.Tensor:
            e = torch.expm1(u).sum(dim=(2, 3))  # layer energies in scale units
            e_layer = torch.log1p(e / 100.0)
            frac = torch.log(e / e.sum(dim=1, keepdim=True).clamp_min(1e-6) + 1e-4)  # the longitudinal shape
            occupancy = torch.tanh(u).sum(dim=(2, 3)) / math.sqrt(self.n_cells_layer)
            return self.head(torch.cat([self.conv(u), e_layer, frac, occupancy, log_e[:, None]], dim=1)).squeeze(1)

    return Refiner, Critic


def make_refiner(shape: tuple[int, int, int], cfg: RefinerConfig, threshold_mev: float = 0.0,
                 noise_mev: float | None = None):
    return _modules()[0](shape, cfg, threshold_mev, noise_mev)


def make_critic(shape: tuple[int, int, int], cfg: RefinerConfig):
    return _modules()[1](shape, cfg)


# ---- saving and loading the refiner ---------------------------------------------------------------------
def save_refiner(refiner, directory: str | Path, detector, extra: dict[str, Any] | None = None) -> Path:
    """``refiner.safetensors`` + ``refiner.json`` in ``directory`` (each written atomically)."""
    from safetensors.torch import save

    from caloforge.models.base import _atomic_write_bytes, state_tensors

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "shape": list(refiner.shape), "config": refiner.cfg.to_dict(),
            "detector": json.loads(detector.to_json()), "caloforge_version": _version(), **(extra or {})}
    _atomic_write_bytes(d / WEIGHTS, save(state_tensors(refiner)))
    _atomic_write_bytes(d / META, (json.dumps(meta, indent=1) + "\n").encode())
    return d


def _version() -> str:
    from caloforge import __version__

    return __version__


def load_refiner(directory: str | Path):
    """(refiner, meta, detector) from a run directory or a directory holding refiner.json/.safetensors."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from caloforge.detector import Detector, DetectorError

    d = Path(directory)
    meta_path, weights_path = d / META, d / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise RefinerError(f"{p}: not found; expected a refiner (run `caloforge refine train` first)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RefinerError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise RefinerError(f"{meta_path}: field 'format' is {got!r:.60}; expected {FORMAT!r}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and 0 < s <= 4096 for s in shape)):
        raise RefinerError(f"{meta_path}: field 'shape' is {shape!r:.60}; expected [layers, x, y] positive integers")
    cfg = RefinerConfig.from_dict(meta.get("config"), f"{meta_path} field 'config'")
    try:
        detector = Detector.from_dict(meta["detector"], f"{meta_path} field 'detector'")
    except (KeyError, TypeError, DetectorError) as err:
        raise RefinerError(f"{meta_path}: field 'detector' is missing or invalid ({err})") from None
    refiner = make_refiner(tuple(shape), cfg)
    try:
        tensors = load_file(str(weights_path))
        refiner.load_state_dict(tensors, strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise RefinerError(f"{weights_path}: does not hold this refiner's weights ({err})") from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise RefinerError(f"{weights_path}: weights hold NaN or inf; expected finite weights")
    refiner.eval()
    return refiner, meta, detector


# ---- applying ---------------------------------------------------------------------------------------------
def row_noise(seed: int, first_row: int, n: int, shape: tuple[int, ...]):
    """Standard normal noise (n, *shape), row i from its own stream (seed, first_row + i): batch-size independent."""
    import torch

    out = torch.empty((n, *shape))
    g = torch.Generator()
    for i in range(n):
        g.manual_seed(int(np.random.SeedSequence([seed, first_row + i]).generate_state(1, np.uint64)[0] >> 1))
        out[i] = torch.randn(shape, generator=g)
    return out


def refine_array(refiner, showers: np.ndarray, seed: int = 0, first_row: int = 0) -> np.ndarray:
    """Refined copy (n, n_cells) float32 of ``showers`` (n, n_cells) MeV."""
    import torch

    n = len(showers)
    x = torch.from_numpy(np.ascontiguousarray(showers, np.float32)).reshape(n, *refiner.shape)
    with torch.no_grad():
        y = refiner(x, row_noise(seed, first_row, n, refiner.shape))
    return y.reshape(n, -1).numpy()


def refine_file(run_dir: str | Path, src: str | Path, dst: str | Path, seed: int = 0, batch_size: int = 250,
                quiet: bool = True) -> int:
    """Refine every shower of ``src`` into ``dst`` (same format; attribute ``refined_by``). Returns the count."""
    from caloforge.dataset import DatasetError, ShowerFile, ShowerWriter
    from caloforge.progress import progress

    refiner, meta, detector = load_refiner(run_dir)
    with ShowerFile(src, expected_detector=detector) as f:
        if tuple(f.shape) != refiner.shape:
            raise DatasetError(f"{src}: field 'showers' has window {f.shape}; the refiner in {run_dir} was trained "
                               f"on {refiner.shape}")
        skip = {"complete", "n_showers", "layout", "compression", "n_cells"}
        attrs = {k: v for k, v in f.attrs.items() if k not in skip}
        attrs.update(refined_by=str(run_dir), refine_seed=int(seed), source=f"refined:{attrs.get('source', '')}")
        with ShowerWriter(dst, f.detector, f.n_cells, attrs) as w, progress(len(f), "refine", "shower", quiet) as bar:
            for start in range(0, len(f), batch_size):
                b = f.read(start, start + batch_size)
                w.append(b.conditions, refine_array(refiner, b.showers, seed, start))
                bar.update(len(b))
        return len(f)


# ---- training -----------------------------------------------------------------------------------------------
def _load_sample(path: str | Path, max_showers: int | None, detector=None):
    from caloforge.dataset import ShowerFile

    with ShowerFile(path, expected_detector=detector) as f:
        n = len(f) if max_showers is None else min(len(f), max_showers)
        if n < 2:
            raise RefinerError(f"{path}: {len(f)} showers; expected at least 2 to train a refiner")
        b = f.read(0, n)
        return b.showers.reshape(n, *f.shape), f.detector, f.attrs, b.energies


def data_threshold(showers: np.ndarray) -> float:
    """The threshold a data sample shows: its 0.1 % quantile of non-zero cell energies (0 for an empty sample)."""
    pos = showers[showers > 0]
    return float(np.quantile(pos, 0.001)) if pos.size else 0.0


def init_dead_cells(refiner, sim: np.ndarray, data: np.ndarray, threshold: float, min_hits: float = 10.0) -> int:
    """Start the gain of cells that never fire in the data, though the simulation puts more than the data threshold in
    them ``min_hits`` times or more (scaled to the data sample's size), at exp(-10): the occupancy-map way of finding
    dead channels (a live cell would fire about ``min_hits`` times; the chance of none is exp(-10) = 5e-5).
    Returns the count."""
    import torch

    expected = (sim > threshold).sum(axis=0) * (len(data) / len(sim))
    dead = (expected >= min_hits) & ~(data > 0).any(axis=0)
    with torch.no_grad():
        refiner.log_gain_cell[torch.from_numpy(dead)] = -10.0
    return int(dead.sum())


class RefinerTrainer:
    """Adversarial training of a refiner on two in-memory samples; seeded, checkpointed, exactly resumable."""

    def __init__(self, sim: np.ndarray, data: np.ndarray, cfg: RefinerConfig, out: str | Path, detector,
                 run: dict[str, Any] | None = None, quiet: bool = True, sim_energies: np.ndarray | None = None,
                 data_energies: np.ndarray | None = None):
        import torch

        if sim.shape[1:] != data.shape[1:]:
            raise RefinerError(f"simulation window {sim.shape[1:]} and data window {data.shape[1:]} differ; expected "
                               f"the same detector window")
        self.cfg, self.out, self.detector, self.quiet = cfg, Path(out), detector, quiet
        self.run = run or {}
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.sim = torch.from_numpy(np.ascontiguousarray(sim, np.float32))
        self.data = torch.from_numpy(np.ascontiguousarray(data, np.float32))
        # The critic compares showers at the same incident energy (a test beam knows its energy): otherwise the
        # refiner would learn the difference between the two samples' energy spectra, which is a bias.
        self.matched = sim_energies is not None and data_energies is not None
        if not self.matched:
            self.sim_le, self.data_le = torch.zeros(len(sim)), torch.zeros(len(data))
        else:
            le_d, le_s = np.log(np.asarray(data_energies, float)), np.log(np.asarray(sim_energies, float))
            mu, sd = le_d.mean(), le_d.std() or 1.0
            self.sim_le = torch.from_numpy(((le_s - mu) / sd).astype(np.float32))
            self.data_le = torch.from_numpy(((le_d - mu) / sd).astype(np.float32))
        self.sim_le_sorted, self.sim_order = torch.sort(self.sim_le)
        self.shape = tuple(sim.shape[1:])
        threshold = data_threshold(data) if cfg.threshold_mev < 0 else cfg.threshold_mev
        self.refiner = make_refiner(self.shape, cfg, threshold, None if cfg.noise_mev < 0 else cfg.noise_mev)
        self.n_dead_init = init_dead_cells(self.refiner, sim, data, threshold)
        self.critic = make_critic(self.shape, cfg)
        self.ema = copy.deepcopy(self.refiner).requires_grad_(False)  # the weights' moving average: the result
        self.nets = torch.nn.ModuleDict({"refiner": self.refiner, "critic": self.critic, "ema": self.ema})
        r = self.refiner
        named = [r.log_gain_layer, r.log_gain_cell, r.log_noise, r.raw_threshold]
        nets = [p for p in r.parameters() if all(p is not q for q in named)]
        groups = [{"params": [r.log_gain_layer], "lr": cfg.lr_params},
                  {"params": [r.log_gain_cell], "lr": cfg.lr_cells},
                  {"params": [r.log_noise, r.raw_threshold], "lr": cfg.lr_readout},
                  {"params": nets, "lr": cfg.lr_net}]
        self.optimizers = {
            "refiner": torch.optim.Adam(groups, betas=(0.5, 0.9)),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, betas=(0.5, 0.9)),
        }
        self.step = 0

    def _u(self, y):
        import torch

        return torch.log1p(y / self.cfg.scale_mev)

    def _batches(self):
        """A data batch and a simulation batch of matched incident energies: for each data shower, a simulated one
        among the ``match_window`` nearest in energy. Unmatched samples differ in their energy spectra by chance
        (2-3 % in the mean for samples of 800 uniform 10-100 GeV showers), and the refiner would learn that too."""
        import torch

        n = self.cfg.batch_size
        rows_d = torch.randint(len(self.data), (n,))
        if self.cfg.match_window > 0 and self.matched:
            k = self.cfg.match_window
            pos = torch.searchsorted(self.sim_le_sorted, self.data_le[rows_d]) + torch.randint(-k, k + 1, (n,))
            rows_s = self.sim_order[pos.clamp(0, len(self.sim) - 1)]
        else:
            rows_s = torch.randint(len(self.sim), (n,))
        return (self.sim[rows_s], self.sim_le[rows_s]), (self.data[rows_d], self.data_le[rows_d])

    def train_step(self) -> dict[str, float]:
        """``n_critic`` critic updates, then one refiner update. Returns the losses."""
        import torch

        cfg = self.cfg
        out: dict[str, float] = {}
        for _ in range(cfg.n_critic):
            (x, le_x), (d, le_d) = self._batches()
            with torch.no_grad():
                u_fake = self._u(self.refiner(x, torch.randn_like(x)))
            u_real = self._u(d)
            eps = torch.rand(len(x), 1, 1, 1)
            u_hat = (eps * u_real + (1 - eps) * u_fake).requires_grad_(True)
            le_hat = eps.flatten() * le_d + (1 - eps.flatten()) * le_x
            grad, = torch.autograd.grad(self.critic(u_hat, le_hat).sum(), u_hat, create_graph=True)
            gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            w = self.critic(u_real, le_d).mean() - self.critic(u_fake, le_x).mean()
            loss_c = -w + cfg.gp_lambda * gp
            self.optimizers["critic"].zero_grad(set_to_none=True)
            loss_c.backward()
            self.optimizers["critic"].step()
            out.update(w=float(w.detach()), gp=float(gp.detach()))
        (x, le_x), _ = self._batches()
        y = self.refiner(x, torch.randn_like(x))
        close = ((y - x).abs().sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3)).clamp_min(1e-6)).mean()
        loss_r = -self.critic(self._u(y), le_x).mean() + cfg.closeness * close
        self.optimizers["refiner"].zero_grad(set_to_none=True)
        loss_r.backward()
        self.optimizers["refiner"].step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.refiner.parameters()):
                e.lerp_(p, 1.0 - cfg.ema_decay)
        out.update(refiner=float(loss_r.detach()), closeness=float(close.detach()))
        if not all(math.isfinite(v) for v in out.values()):
            raise RefinerError(f"training diverged at step {self.step + 1} (losses {out}); try a lower lr")
        return out

    def summary(self) -> dict[str, Any]:
        """The readable part of the refiner: per-layer gains, thresholds and noise."""
        import torch

        r = self.ema
        with torch.no_grad():
            return {"gain_layer": torch.exp(r.log_gain_layer).tolist(), "threshold_mev": r.threshold().tolist(),
                    "noise_mev": r.noise_sigma().tolist(), "dead_cells": int((r.log_gain_cell < -5).sum()),
                    "dead_cells_init": self.n_dead_init}

    def save_checkpoint(self) -> None:
        from caloforge.train import save_checkpoint

        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.out / CHECKPOINT, self.nets, self.optimizers, {"step": self.step})

    def load_checkpoint(self) -> None:
        from caloforge.train import load_checkpoint

        state = load_checkpoint(self.out / CHECKPOINT, self.nets, self.optimizers, "cpu")
        self.step = int(state["step"])
        _truncate_history(self.out / HISTORY, self.step)

    def fit(self, steps: int | None = None) -> dict[str, Any]:
        """Train up to ``steps`` (default the configured number), checkpointing; write the refiner at the end."""
        from caloforge.progress import progress

        steps = self.cfg.steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with progress(steps, "refine train", "step", self.quiet, initial=self.step) as bar, \
                open(self.out / HISTORY, "a") as hist:
            while self.step < steps:
                losses = self.train_step()
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == steps:
                    s = self.summary()
                    rec = {"step": self.step, **{k: round(v, 6) for k, v in losses.items()},
                           "gain_mean": float(np.mean(s["gain_layer"])),
                           "threshold_mean": float(np.mean(s["threshold_mev"])),
                           "noise_mean": float(np.mean(s["noise_mev"])), "time_s": round(time.time() - t0, 1)}
                    hist.write(json.dumps(rec) + "\n")
                    hist.flush()
                    bar.set_postfix(w=f"{losses['w']:.3f}", close=f"{losses['closeness']:.3f}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == steps:
                    self.save_checkpoint()
        save_refiner(self.ema, self.out, self.detector, {"training": {**self.run, "steps": self.step},
                                                             "summary": self.summary()})
        return {"step": self.step, **self.summary()}


def _truncate_history(path: Path, step: int) -> None:
    """Drop history lines logged after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(k + "\n" for k in keep))


def create_run(sim_path: str | Path, data_path: str | Path, out: str | Path, cfg: RefinerConfig,
               max_showers: int | None = None, quiet: bool = True) -> RefinerTrainer:
    """A new run: check the samples, write run.json, return the trainer (not yet trained)."""
    from caloforge.train import data_fingerprint

    sim, det, _, e_sim = _load_sample(sim_path, max_showers)
    data, _, data_attrs, e_data = _load_sample(data_path, max_showers, det)
    run = {"sim": str(sim_path), "data": str(data_path), "max_showers": max_showers, "config": cfg.to_dict(),
           "sim_fingerprint": data_fingerprint(sim_path), "data_fingerprint": data_fingerprint(data_path),
           "data_effects": data_attrs.get("detector_effects"), "command": sys.argv}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
    return RefinerTrainer(sim, data, cfg, out, det, {k: run[k] for k in ("sim", "data", "max_showers")}, quiet,
                          e_sim, e_data)


def resume_run(out: str | Path, quiet: bool = True) -> RefinerTrainer:
    """The trainer of an existing run, restored from its last checkpoint (the data files must be unchanged)."""
    from caloforge.train import data_fingerprint

    out = Path(out)
    try:
        run = json.loads((out / RUN_FILE).read_text())
    except FileNotFoundError:
        raise RefinerError(f"{out / RUN_FILE}: not found; expected a refiner run directory to resume") from None
    except json.JSONDecodeError as err:
        raise RefinerError(f"{out / RUN_FILE}: not valid JSON ({err})") from None
    cfg = RefinerConfig.from_dict(run.get("config"), f"{out / RUN_FILE} field 'config'")
    for key in ("sim", "data"):
        if data_fingerprint(run[key]) != run[f"{key}_fingerprint"]:
            raise RefinerError(f"{run[key]}: changed since the run started ({out / RUN_FILE}); expected the same file")
    sim, det, _, e_sim = _load_sample(run["sim"], run.get("max_showers"))
    data, _, _, e_data = _load_sample(run["data"], run.get("max_showers"), det)
    trainer = RefinerTrainer(sim, data, cfg, out, det, {k: run[k] for k in ("sim", "data", "max_showers")}, quiet,
                             e_sim, e_data)
    trainer.load_checkpoint()
    return trainer


# ---- the command ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a refiner on unpaired simulation and data samples")
    t.add_argument("sim", help="simulated showers (true energies)")
    t.add_argument("data", help="data showers (e.g. from `caloforge digitize`)")
    t.add_argument("-o", "--output", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in -o from its last checkpoint")
    t.add_argument("--steps", type=int, help=f"refiner updates (default {RefinerConfig.steps})")
    t.add_argument("--closeness", type=float, help=f"weight of the closeness term (default {RefinerConfig.closeness})")
    t.add_argument("--max-showers", type=int, help="use at most this many showers of each file (memory)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any RefinerConfig option, e.g. --set batch_size=64")
    t.add_argument("--seed", type=int, help="training seed (default 0)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = sub.add_parser("apply", help="refine the showers of a file with a trained refiner")
    a.add_argument("run_dir", metavar="RUN", help="refiner run directory")
    a.add_argument("input", help="shower file to refine")
    a.add_argument("-o", "--output", required=True, help="output shower file")
    a.add_argument("--seed", type=int, default=0, help="seed of the refiner's noise (default 0)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RefinerError(f"--set {item}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    from caloforge.validate import check_int, check_output_dir, check_output_file, check_seed, same_file

    if args.action == "apply":
        check_seed(args.seed)
        if same_file(args.input, args.output):
            raise ValueError(f"-o {args.output}: is the input file; expected another path")
        check_output_file(args.output, overwrite=args.overwrite)
        t0 = time.time()
        n = refine_file(args.run_dir, args.input, args.output, args.seed, quiet=args.quiet)
        print(f"{args.output}: {n} showers refined in {time.time() - t0:.1f} s")
        return 0
    check_output_dir(args.output)
    check_int(args.steps, "--steps", 1, 10**7)
    check_int(args.max_showers, "--max-showers", 2)
    check_seed(args.seed)
    if args.resume:
        trainer = resume_run(args.output, args.quiet)
    else:
        if (Path(args.output) / RUN_FILE).exists():
            raise ValueError(f"-o {args.output}: holds a refiner run; use --resume to continue it or another -o")
        over = _parse_overrides(args.overrides)
        for key, val in (("steps", args.steps), ("closeness", args.closeness), ("seed", args.seed)):
            if val is not None:
                over[key] = val
        cfg = RefinerConfig.from_dict(over, "refine train options")
        trainer = create_run(args.sim, args.data, args.output, cfg, args.max_showers, args.quiet)
    t0 = time.time()
    state = trainer.fit(args.steps if args.resume else None)
    gains = np.asarray(state["gain_layer"])
    print(f"{args.output}: refiner trained for {state['step']} steps in {time.time() - t0:.0f} s; layer gains "
          f"{gains.min():.3f}-{gains.max():.3f}, threshold {np.mean(state['threshold_mev']):.4f} MeV, noise "
          f"{np.mean(state['noise_mev']):.4f} MeV")
    return 0
