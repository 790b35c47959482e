"""The one model abstraction: :class:`ShowerModel`, and saving/loading models as safetensors + JSON.

A shower model maps :class:`~caloforge.conditions.Conditions` (incident energy in MeV, incidence angle in degrees,
impact point in mm, particle) to showers in MeV for one detector. Networks see the conditions as a raw tensor
``cond`` (n, 5) with the columns :data:`~caloforge.conditions.CONDITION_COLUMNS`, turned into standardised
*condition features* (``log_e``, ``angle``, ``sec_angle``, ``frac_x``, ``frac_y``, ``is_photon``, ``charge``; the list
a model uses is saved with it, so adding a condition is one more feature). Every model is split into a *noise draw*
and a *deterministic decoder*::

    showers = model.decode_window(cond, *model.draw_noise(n, generator), angled=...)

``sample`` is exactly that, and the ONNX export wraps ``decode_window`` with the noise as explicit inputs, so
torch and ONNX give identical showers for identical noise.

The shower axis frame (``frame = "axis"``, every model trained since impact points and angles became conditions):
a family models the cells of a local grid of the normal-incidence window's shape that moves with the shower axis,
by whole cells: in layer ``l`` the axis crosses the active layer at ``(x, y + tan(angle) z_l)``, and local cell
``(i, j)`` is window cell ``(i + floor(x / c), j + floor((y + tan(angle) z_l) / c))``. What is left, the axis's
offset within its cell, is a condition feature. The readout window (normal or angled) thus follows from the
conditions, and a shower may be placed anywhere on the face. Models saved before (``frame = "window"``) model the
window itself at the impact point they were trained for. Families that declare ``readouts = "any"`` (``calogan``,
``densewgan``) work in the ``cells`` frame: the model's cells are the detector's stored cells in the file's order
(any per-layer readout, or a uniform grid's normal-incidence window), ``to_window`` and ``to_local`` are the
identity, and the model generates normal incidence at the origin only (the seeds' fixed-gun setups).

Training goes through per-family hooks that the generic :class:`caloforge.train.Trainer` calls:
``fit_preprocessing`` (constants stored as buffers, computed once from the training data), ``configure_optimizers``
and ``training_step`` (the default does one optimiser step on ``loss``; adversarial families override it).

A saved model is a directory with ``model.safetensors`` (weights and preprocessing buffers) and ``model.json``
(family, architecture config, detector description, training conditions range, provenance, version).
Loading reads only those two files and never executes code from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from caloforge import __version__
from caloforge.conditions import HADRON_PDG, PARTICLE_PDG, PDG_PARTICLE, Conditions, ConditionsError
from caloforge.detector import Detector, DetectorError, load_detector
from caloforge.models import kernels

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class ModelError(ValueError):
    """A model file is missing, malformed, or does not fit what was asked of it."""


class ConditionsWarning(UserWarning):
    """Conditions requested outside the range the model was trained on."""


#: Condition features: name -> (the condition it reads, its computation from the raw (n, 5) tensor and the model).
def _frac(u: torch.Tensor) -> torch.Tensor:
    return u - torch.floor(u)


CONDITION_FEATURES: dict[str, tuple[str, Any]] = {
    "log_e": ("energy", lambda c, m: torch.log(c[:, 0])),
    "angle": ("angle", lambda c, m: c[:, 1]),
    "sec_angle": ("angle", lambda c, m: 1.0 / torch.cos(c[:, 1] * (math.pi / 180))),
    # odd in the angle and convex: with "angle" it lets a law's lean towards +y grow faster than linearly (a model
    # whose laws are mirror-tied has no lean at 0 degrees, so its lean must come from odd features)
    "tan_angle": ("angle", lambda c, m: torch.tan(c[:, 1] * (math.pi / 180))),
    "frac_x": ("position", lambda c, m: _frac(c[:, 2] / m.detector.cell_size_mm)),
    "frac_y": ("position", lambda c, m: _frac(c[:, 3] / m.detector.cell_size_mm)),
    # The offset within the cell as a phase: a shift by a whole cell is the same shower one cell over, so the
    # features are periodic and the edges of the cell are no boundary of the training range.
    "sin_x": ("position", lambda c, m: torch.sin(2 * math.pi * c[:, 2] / m.detector.cell_size_mm)),
    "cos_x": ("position", lambda c, m: torch.cos(2 * math.pi * c[:, 2] / m.detector.cell_size_mm)),
    "sin_y": ("position", lambda c, m: torch.sin(2 * math.pi * c[:, 3] / m.detector.cell_size_mm)),
    "cos_y": ("position", lambda c, m: torch.cos(2 * math.pi * c[:, 3] / m.detector.cell_size_mm)),
    # The impact point itself (mm): for families in frame "cells" that declare ``cells_positions`` (no axis frame).
    "pos_x": ("position", lambda c, m: c[:, 2]),
    "pos_y": ("position", lambda c, m: c[:, 3]),
    "is_photon": ("particle", lambda c, m: (c[:, 4] == 22).float()),
    # PDG codes: leptons carry the opposite sign of their charge (11 is e-), hadrons the same (211 is pi+)
    "charge": ("particle", lambda c, m: torch.where(c[:, 4] == 22, torch.zeros_like(c[:, 4]),
                                                    torch.where(c[:, 4].abs() > 100, 1.0, -1.0) * torch.sign(c[:, 4]))),
}
#: Features of models saved before impact points and particles were conditions.
LEGACY_FEATURES: tuple[str, ...] = ("log_e", "angle")
DEFAULT_FEATURES: tuple[str, ...] = ("log_e", "angle", "sec_angle", "sin_x", "cos_x", "sin_y", "cos_y", "is_photon",
                                     "charge")
#: Features the label regressors of adversarial families reconstruct.
REGRESSED_FEATURES: tuple[str, ...] = ("log_e", "angle", "frac_x", "frac_y", "sin_x", "cos_x", "sin_y", "cos_y",
                                       "pos_x", "pos_y")


@dataclass
class TrainBatch:
    """One training batch on the model's device: raw conditions ``cond`` (n, 5) (columns
    :data:`~caloforge.conditions.CONDITION_COLUMNS`) and showers (n, n_cells) MeV in the model's own cells.

    In data-parallel training (:mod:`caloforge.distributed`) it is one process's shard: ``rows`` of a global batch
    of ``total`` rows. Draw training noise with :meth:`rand` and :meth:`randn`: they draw it for the whole batch and
    keep this shard's rows, so the shards see the numbers one process would and the random streams stay in step.
    """

    cond: torch.Tensor
    showers: torch.Tensor
    rows: slice | None = None
    total: int | None = None

    @property
    def share(self) -> float:
        """This shard's fraction of the global batch (1 for a whole batch)."""
        return len(self) / self.total if self.total else 1.0

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform noise (n, *shape) for the rows of this batch."""
        return self._noise(torch.rand, shape, dtype)

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal noise (n, *shape) for the rows of this batch."""
        return self._noise(torch.randn, shape, dtype)

    def _noise(self, draw: Any, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        x = draw((self.total or len(self), *shape), device=self.cond.device, dtype=dtype)
        return x if self.rows is None else x[self.rows]

    @property
    def energies(self) -> torch.Tensor:
        return self.cond[:, 0]

    @property
    def angles(self) -> torch.Tensor:
        return self.cond[:, 1]

    def __len__(self) -> int:
        return int(self.cond.shape[0])


def as_conditions(conditions: Conditions | torch.Tensor | np.ndarray | float, angles: Any = 0.0,
                  positions: Any = None, particles: Any = None) -> Conditions:
    """A :class:`Conditions` from one, or from energies (MeV) with angles, positions (n, 2) mm and particles."""
    if isinstance(conditions, Conditions):
        return conditions
    e = torch.as_tensor(conditions).detach().cpu().double().numpy().reshape(-1)
    a = torch.as_tensor(angles).detach().cpu().double().numpy().reshape(-1)
    if a.size == 1:
        a = np.full(e.shape, float(a[0]))
    if a.shape != e.shape:
        raise ConditionsError(f"energies {e.shape} and angles {a.shape} differ in length")
    pos = np.zeros((len(e), 2)) if positions is None else np.asarray(positions, np.float64).reshape(-1, 2)
    if len(pos) == 1 and len(e) != 1:
        pos = np.repeat(pos, len(e), axis=0)
    p = "gamma" if particles is None else particles
    if not isinstance(p, str):
        p = np.asarray(p).reshape(-1)
        if p.size == 1:
            p = p[0] if p.dtype.kind in "US" else int(p[0])
    return Conditions(e, a, pos[:, 0], pos[:, 1], p if not isinstance(p, str) else PARTICLE_PDG.get(p, p))


@dataclass
class ModelConfig:
    """Base of the per-family architecture configs (plain dataclasses of JSON-able values).

    ``from_dict`` checks every value before anything is allocated: booleans must be JSON booleans, numbers numbers
    (not strings, null or tables), within ``bounds`` (inclusive (lo, hi) per option, declared by each family;
    integers without declared bounds lie in [0, :data:`caloforge.validate.INT_LIMIT`], floats must be finite), and
    :meth:`weight_estimate` must stay under ``max_weights``.
    """

    #: Inclusive (lo, hi) bounds of numeric options (choices for strings); families declare theirs.
    bounds: ClassVar[dict[str, tuple]] = {}
    #: Largest architecture (by :meth:`weight_estimate`) a config may ask for: 2^28 weights, 1 GiB in float32.
    max_weights: ClassVar[int] = 2**28

    def weight_estimate(self) -> int:
        """A rough count of the weights the architecture allocates (families with large options override it)."""
        return 0

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        from caloforge.validate import coerce_option

        if not isinstance(d, dict):
            raise ModelError(f"{source}: is {type(d).__name__} {d!r:.60}; expected a table of model options")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ModelError(f"{source}: unknown model option(s) {unknown}; known: {sorted(names)}")
        defaults = cls()
        kw = {k: coerce_option(k, v, getattr(defaults, k), f"{source}:", cls.bounds.get(k), ModelError)
              for k, v in d.items()}
        config = cls(**kw)
        n = config.weight_estimate()
        if n > cls.max_weights:
            raise ModelError(f"{source}: the architecture options make about {n:.3g} weights; expected at most "
                             f"{cls.max_weights:.3g} (lower the widths or block counts)")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ShowerModel(nn.Module):
    """Base class of all shower models: conditions -> non-negative showers (n, n_cells) in MeV.

    Subclasses set ``family`` and ``Config`` and implement ``_fit_preprocessing``, ``noise_shapes``,
    ``decode`` and either ``loss`` (likelihood models) or ``training_step`` (e.g. GANs).
    """

    family: ClassVar[str] = ""
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    #: Readouts the family takes: "grid" (image models of one (layer, x, y) grid, frames "axis" and "window") or
    #: "any" (the detector's flat cell vector, frame "cells": per-layer readouts and uniform grids alike).
    readouts: ClassVar[str] = "grid"
    #: Condition features of a new model (None: :data:`DEFAULT_FEATURES`); "cells" families read energy and particle.
    default_features: ClassVar[tuple[str, ...] | None] = None
    #: An image family ("grid") that declares it also takes per-layer readouts, in frame "cells" (it maps each layer
    #: onto an image itself), with the impact point as a condition there (features ``pos_x``, ``pos_y``).
    cells_positions: ClassVar[bool] = False
    #: ``sample`` decodes in chunks of this many showers (cache-friendly on CPU); 0 = one call.
    sample_chunk: ClassVar[int] = 0
    #: whether ``decode`` takes uniform noise as :class:`kernels.UniformBlock` (made where needed) in sampling loops
    takes_uniform_blocks: ClassVar[bool] = False
    #: whether sampling on the CPU decodes several chunks at once, one thread each (see ``_over_chunks``)
    parallel_chunks: ClassVar[bool] = False
    _out_lock = threading.Lock()

    def __init__(self, detector: Detector, n_cells: int | None = None, config: ModelConfig | None = None,
                 features: tuple[str, ...] | list[str] | None = None, frame: str | None = None):
        super().__init__()
        if self.readouts == "any" or frame == "cells" or (self.cells_positions and not detector.is_uniform):
            self._init_cells_frame(detector, n_cells, config, features, frame)
            return
        if not detector.is_uniform:  # the image families model (layer, x, y) windows
            raise ModelError(f"model family {self.family!r} represents (layer, x, y) grids of one cell size "
                             f"(detectors like ild-ecal, clic-ecal); detector {detector.name!r} has per-layer cells "
                             f"({detector.readout_summary()}), which no shipped family can represent yet")
        self.detector = detector
        self.config = config if config is not None else self.Config()
        #: cells added on both sides of the shower-axis frame's local grid along y, the tilt direction (a family
        #: config's ``pad_y``): the far halo of an inclined shower reaches beyond the normal window's half-width
        self.pad_y = int(getattr(self.config, "pad_y", 0))
        n_local = self.local_n_cells(detector, self.config)
        self.n_cells = int(n_cells if n_cells is not None else n_local)
        try:
            self.shape: tuple[int, int, int] = (self.local_shape(detector, self.config) if self.n_cells == n_local
                                                else detector.shape_for_cells(self.n_cells))
        except DetectorError as err:
            raise ModelError(str(err)) from None
        self.features = tuple(features) if features is not None else DEFAULT_FEATURES
        unknown = [f for f in self.features if f not in CONDITION_FEATURES]
        if unknown or not self.features or self.features[0] != "log_e":
            raise ModelError(f"condition features {list(self.features)}: expected 'log_e' first and names from "
                             f"{list(CONDITION_FEATURES)}")
        self.frame = frame if frame is not None else ("axis" if self.n_cells == n_local else "window")
        if self.frame not in ("axis", "window") or (self.frame == "axis" and self.n_cells != n_local):
            raise ModelError(f"frame {self.frame!r}: expected 'window', or 'axis' with the normal-incidence window's "
                             f"{n_local} cells{f' (padded by {self.pad_y} in y)' if self.pad_y else ''} "
                             f"(got {self.n_cells})")
        if self.pad_y and self.frame != "axis":
            raise ModelError(f"pad_y = {self.pad_y}: a padded local grid needs the shower-axis frame (got frame "
                             f"{self.frame!r} with {self.n_cells} cells)")
        # Condition standardisation: every feature -> zero mean, unit variance (set by fit_preprocessing).
        self.register_buffer("cond_mean", torch.zeros(len(self.features)))
        self.register_buffer("cond_std", torch.ones(len(self.features)))
        self.register_buffer("layer_z", torch.as_tensor(detector.layer_z_mm(), dtype=torch.float32), persistent=False)
        #: Metadata saved with the model: training conditions range, provenance (filled by the trainer).
        self.meta: dict[str, Any] = {}

    def _init_cells_frame(self, detector: Detector, n_cells: int | None, config: ModelConfig | None,
                          features: tuple[str, ...] | list[str] | None, frame: str | None) -> None:
        """The ``cells`` frame: the detector's stored normal-incidence cells, as they are, at the origin."""
        if (self.readouts != "any" and not (self.cells_positions and not detector.is_uniform)) or (
                frame or "cells") != "cells":
            raise ModelError(f"frame {frame!r}: model family {self.family!r} takes "
                             f"{'grid windows (frames axis, window)' if self.readouts != 'any' else 'frame cells'}")
        self.detector = detector
        self.n_cells = int(n_cells if n_cells is not None else detector.n_cells(False))
        if self.n_cells != detector.n_cells(False):
            raise ModelError(f"model family {self.family!r} takes detector {detector.name!r}'s "
                             f"{detector.n_cells(False)} normal-incidence cells ({detector.readout_summary()}); "
                             f"got {self.n_cells} cells per shower")
        self.shape = detector.shape(False)
        self.config = config if config is not None else self.Config()
        self.features = tuple(features) if features is not None else (self.default_features or ("log_e",))
        bad = [f for f in self.features if f not in CONDITION_FEATURES or CONDITION_FEATURES[f][0] in ("angle",
                                                                                                       "position")]
        bad = [f for f in bad if not (self.cells_positions and f in ("pos_x", "pos_y"))]
        if bad or not self.features or self.features[0] != "log_e":
            raise ModelError(f"condition features {list(self.features)}: a model in frame 'cells' expects 'log_e' "
                             f"first and energy or particle features only (log_e, is_photon, charge)"
                             + (", or the impact point (pos_x, pos_y)" if self.cells_positions else ""))
        self.frame = "cells"
        self.register_buffer("cond_mean", torch.zeros(len(self.features)))
        self.register_buffer("cond_std", torch.ones(len(self.features)))
        self.register_buffer("layer_z", torch.as_tensor(detector.layer_z_mm(), dtype=torch.float32), persistent=False)
        self.meta = {}

    # ---- conditions -------------------------------------------------------------------------------
    @property
    def condition_names(self) -> tuple[str, ...]:
        """The conditions this model takes (energy, angle, position, particle), from its features."""
        names: list[str] = []
        for f in self.features:
            c = CONDITION_FEATURES[f][0]
            if c not in names:
                names.append(c)
        return tuple(names)

    @property
    def particles(self) -> list[str]:
        """The particles the model was trained on (empty when its file does not say)."""
        return list(self.meta.get("particles") or ([str(self.meta["particle"])] if self.meta.get("particle") else []))

    @property
    def default_particle(self) -> str:
        """What commands generate when no particle is asked for: photons where the model takes them, else its first
        particle."""
        return "gamma" if "gamma" in self.particles or not self.particles else self.particles[0]

    @property
    def n_cond_features(self) -> int:
        return len(self.features)

    def raw_condition_features(self, cond: torch.Tensor) -> torch.Tensor:
        """The unstandardised condition features (n, n_features) of raw conditions (n, 5)."""
        cond = cond.float()
        return torch.stack([CONDITION_FEATURES[f][1](cond, self) for f in self.features], dim=1)

    def condition_features(self, cond: torch.Tensor) -> torch.Tensor:
        """Standardised condition features (n, n_features) that every network sees."""
        return (self.raw_condition_features(cond) - self.cond_mean) / self.cond_std

    def fit_preprocessing(self, data: Any) -> None:
        """Compute the preprocessing constants (buffers) from the training data (a ``dataset.Batch`` whose showers
        are in the model's own cells)."""
        cond = torch.as_tensor(data.conditions.as_array(), dtype=torch.float32)
        raw = self.raw_condition_features(cond).double().numpy()
        std = raw.std(axis=0)
        self.cond_mean.copy_(torch.as_tensor(raw.mean(axis=0), dtype=torch.float32))
        self.cond_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        c = data.conditions
        self.meta.setdefault("conditions", {
            "energy_mev": [float(c.energy.min()), float(c.energy.max())],
            "angle_deg": [float(c.angle.min()), float(c.angle.max())],
        })
        self.meta.setdefault("particles", sorted({PDG_PARTICLE[int(p)] for p in np.unique(c.pdg)}))
        self._check_particles_told_apart(np.unique(c.pdg))
        self._fit_preprocessing(data)

    def _check_particles_told_apart(self, codes: np.ndarray) -> None:
        """Refuse training data whose particles this model's particle features cannot tell apart (e+ and pi+ look
        the same to ``is_photon`` and ``charge``), and hadrons mixed with e/gamma in a model without particle
        features: the model would learn their mixture as one shower. (A model without particle features may learn
        e/gamma mixtures, as before.)"""
        if len(codes) < 2:
            return
        cond = torch.zeros(len(codes), 5)
        cond[:, 0], cond[:, 4] = 1e4, torch.as_tensor(codes, dtype=torch.float32)
        keep = [i for i, f in enumerate(self.features) if CONDITION_FEATURES[f][0] == "particle"]
        rows = self.raw_condition_features(cond)[:, keep]
        hadron = [int(c) in HADRON_PDG for c in codes]
        for i in range(len(codes)):
            for j in range(i):
                if torch.equal(rows[i], rows[j]) and (keep or hadron[i] != hadron[j]):
                    raise ModelError(f"training data holds {PDG_PARTICLE[int(codes[j])]} and "
                                     f"{PDG_PARTICLE[int(codes[i])]}, which this {self.family} model's condition "
                                     f"features {list(self.features)} cannot tell apart; train one model per particle")

    def _fit_preprocessing(self, data: Any) -> None:
        """Family-specific constants; ``data`` has ``conditions`` and ``showers`` (numpy, the model's own cells)."""

    # ---- the shower-axis frame ----------------------------------------------------------------------
    @classmethod
    def local_shape(cls, detector: Detector, config: ModelConfig | None = None) -> tuple[int, int, int]:
        """(layers, x, y) of the shower-axis frame's local grid: the normal-incidence window, ``pad_y`` cells wider
        on both sides in y."""
        n_l, n_x, n_y = detector.shape(False)
        return n_l, n_x, n_y + 2 * int(getattr(config, "pad_y", 0))

    @classmethod
    def local_n_cells(cls, detector: Detector, config: ModelConfig | None = None) -> int:
        """Cells per shower in the shower-axis frame (what ``cls(detector, None, config)`` models)."""
        if not detector.is_uniform:
            return detector.n_cells(False)
        return int(np.prod(cls.local_shape(detector, config)))

    def local_cell_centers_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres (x, y) in mm of the model's own columns and rows: in the ``axis`` frame relative to the corner of
        the cell the axis crosses (the window's coordinates when that is the cell at the origin), in the ``window``
        frame the window's."""
        n_x, n_y = self.shape[1], self.shape[2]
        c = self.detector.cell_size_mm
        x = self.detector.readout.x_min_mm + (np.arange(n_x) + 0.5) * c
        y = self.detector.readout.y_min_mm + (np.arange(n_y) - self.pad_y + 0.5) * c
        return x, y

    def axis_cells(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole-cell shifts of the shower axis, x (n,) and y per layer (n, L), and its offsets within the cell
        (same shapes, in [0, 1)); all zero shifts in the ``window`` frame."""
        if self.frame == "cells":
            raise ModelError(f"{self.family} model: frame 'cells' has no shower axis (normal incidence only)")
        c = self.detector.cell_size_mm
        cond = cond.float()
        ux = cond[:, 2] / c
        uy = (cond[:, 3:4] + torch.tan(cond[:, 1:2] * (math.pi / 180)) * self.layer_z[None]) / c
        sx, sy = torch.floor(ux), torch.floor(uy) - self.pad_y  # where the local grid's first column and row lie
        if self.frame == "window":
            sx, sy = torch.zeros_like(sx), torch.zeros_like(sy)
        return sx, sy, ux - torch.floor(ux), uy - torch.floor(uy)

    def window_shape(self, angled: bool) -> tuple[int, int, int]:
        """Cell-array shape of the output window (the model's own shape in the legacy ``window`` frame)."""
        return self.shape if self.frame in ("window", "cells") else self.detector.shape(angled)

    def window_index(self, cond: torch.Tensor, row: torch.Tensor, lay: torch.Tensor, i: torch.Tensor,
                     j: torch.Tensor, angled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat window index (within a shower) of the model's cells (row, layer, i, j), and whether it is inside."""
        _, nxw, nyw = self.window_shape(angled)
        sx, sy, _, _ = self.axis_cells(cond)
        wx = i + sx.long()[row]
        wy = j + sy.long()[row, lay]
        inside = (wx >= 0) & (wx < nxw) & (wy >= 0) & (wy < nyw)
        return (lay * nxw + wx.clamp(0, nxw - 1)) * nyw + wy.clamp(0, nyw - 1), inside

    def to_window(self, cells: torch.Tensor, cond: torch.Tensor, angled: bool) -> torch.Tensor:
        """Showers in the model's cells (n, n_cells) -> the readout window (n, n_window_cells); cells that fall
        outside the window are dropped (as Geant4's readout drops them)."""
        if self.frame in ("window", "cells"):
            return cells
        n = cells.shape[0]
        n_l, nx, ny = self.shape
        lw, nxw, nyw = self.window_shape(angled)
        n_win = lw * nxw * nyw
        row, lay, i, j = (g.reshape(-1) for g in torch.meshgrid(
            torch.arange(n, device=cells.device), torch.arange(n_l, device=cells.device),
            torch.arange(nx, device=cells.device), torch.arange(ny, device=cells.device), indexing="ij"))
        idx, inside = self.window_index(cond, row, lay, i, j, angled)
        flat = torch.where(inside, row * n_win + idx, torch.full_like(idx, n * n_win))  # outside -> a dump slot
        out = torch.zeros(n * n_win + 1, dtype=cells.dtype, device=cells.device)
        out = out.index_put((flat,), cells.reshape(-1))
        return out[:-1].reshape(n, n_win)

    def to_local(self, showers: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """Window showers (n, n_window_cells) from a file -> the model's own cells (n, n_cells), numpy; the inverse
        of :meth:`to_window` on the cells the local grid covers."""
        showers = np.asarray(showers, np.float32)
        if self.frame in ("window", "cells"):
            return showers
        n = len(showers)
        lw, nxw, nyw = self.detector.shape_for_cells(showers.shape[1])
        n_l, nx, ny = self.shape
        with torch.no_grad():
            sx, sy, _, _ = self.axis_cells(torch.as_tensor(cond, dtype=torch.float32))
        sx, sy = sx.long().numpy(), sy.long().numpy()
        wx = np.arange(nx)[None, :] + sx[:, None]  # (n, nx)
        wy = np.arange(ny)[None, None, :] + sy[:, :, None]  # (n, L, ny)
        ok = ((wx >= 0) & (wx < nxw))[:, None, :, None] & ((wy >= 0) & (wy < nyw))[:, :, None, :]
        src = showers.reshape(n, lw, nxw, nyw)
        out = src[np.arange(n)[:, None, None, None], np.arange(n_l)[None, :, None, None],
                  wx.clip(0, nxw - 1)[:, None, :, None], wy.clip(0, nyw - 1)[:, :, None, :]]
        return np.where(ok, out, 0.0).astype(np.float32).reshape(n, -1)

    # ---- sampling ---------------------------------------------------------------------------------
    def noise_shapes(self, n: int) -> list[tuple[tuple[int, ...], str]]:
        """The noise tensors ``decode`` takes: a list of (shape, "normal" | "uniform")."""
        raise NotImplementedError

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Draw the noise tensors for ``n`` showers on the model's device."""
        return [_rows(src, 0, n) for src in self._noise_sources(n, generator)]

    def _chunk(self, noise: torch.Tensor | kernels.UniformRows, start: int, stop: int
               ) -> torch.Tensor | kernels.UniformBlock:
        """Rows start..stop of a noise source for ``decode`` (a block not made yet where the family takes them)."""
        if isinstance(noise, kernels.UniformRows) and self.takes_uniform_blocks:
            return noise.block(start, stop)
        return _rows(noise, start, stop)

    def _noise_sources(self, n: int, generator: torch.Generator | None) -> list[torch.Tensor | kernels.UniformRows]:
        """The noise of ``n`` showers: normal noise as tensors; uniforms on the CPU as a counter-based hash
        (:class:`kernels.UniformRows`: 5x faster than torch's CPU generator, made chunk by chunk)."""
        device = self.cond_mean.device
        out: list[torch.Tensor | kernels.UniformRows] = []
        for shape, kind in self.noise_shapes(n):
            if kind == "normal":
                out.append(torch.randn(shape, generator=generator, device=device))
            elif device.type == "cpu":
                out.append(kernels.UniformRows(shape, generator))
            else:
                out.append(torch.rand(shape, generator=generator, device=device))
        return out

    def decode(self, cond: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        """Deterministic map (raw conditions (n, 5), noise) -> showers (n, n_cells) in MeV, >= 0, in the model's
        own cells (the local axis frame, or the window for legacy models)."""
        raise NotImplementedError

    def decode_window(self, cond: torch.Tensor, *noise: torch.Tensor, angled: bool = False) -> torch.Tensor:
        """Showers in the readout window (normal or ``angled``) that the conditions call for (families with sparse
        hits override this to place them directly)."""
        return self.to_window(self.decode(cond, *noise), cond, angled)

    def check_conditions(self, conditions: Conditions, source: str = "conditions") -> None:
        """Refuse conditions this model cannot take (``ModelError``); warn (``ConditionsWarning``) outside the
        training range."""
        c = conditions
        try:
            c.validate(source)
        except ConditionsError as err:
            raise ModelError(str(err)) from None
        if self.frame == "cells" and len(c):
            self._check_cells_frame(c, source)
        takes = self.condition_names
        particles = self.particles
        if particles:
            want = {PARTICLE_PDG[p] for p in particles if p in PARTICLE_PDG}
            bad = ~np.isin(c.pdg, list(want)) if want else np.zeros(len(c), bool)
            if np.any(bad):
                raise ModelError(f"{source}: particle {PDG_PARTICLE.get(int(c.pdg[bad][0]), int(c.pdg[bad][0]))!r} "
                                 f"requested; this {self.family} model was trained for {', '.join(particles)} only")
        if "position" not in takes and len(c) and (np.any(c.x != 0) or np.any(c.y != 0)):
            raise ModelError(f"{source}: impact points other than (0, 0) requested; this {self.family} model was "
                             f"trained before impact positions were conditions (it knows the origin only)")
        if "position" in takes and len(c):
            (lo_x, hi_x), (lo_y, hi_y) = self.detector.impact_region()
            bad = (c.x < lo_x) | (c.x > hi_x) | (c.y < lo_y) | (c.y > hi_y)
            if np.any(bad):
                k = int(np.flatnonzero(bad)[0])
                raise ModelError(f"{source}: impact point ({c.x[k]:g}, {c.y[k]:g}) mm at row {k} lies outside "
                                 f"x {lo_x:g}..{hi_x:g}, y {lo_y:g}..{hi_y:g} mm (the readout window less a margin)")
        if len(c) and np.any(c.angle > 0):
            if self.frame == "window":  # a legacy model writes its own window only
                limit = 60.0 if self.shape != self.detector.shape(False) else 0.0
            else:
                limit = 60.0 if self.detector.readout.n_y_angled else 0.0
            if float(c.angle.max()) > limit:
                raise ModelError(f"{source}: angle {float(c.angle.max()):g} deg requested; the {self.detector.name} "
                                 f"readout window of this model holds angles up to {limit:g} deg")
        rng = self.meta.get("conditions")
        if not rng:
            return
        for name, values, key, unit in (("energy", c.energy, "energy_mev", "MeV"), ("angle", c.angle, "angle_deg",
                                                                                     "deg")):
            lo, hi = rng.get(key, (-math.inf, math.inf))
            if len(values) and (float(values.min()) < lo * (1 - 1e-6) - 1e-9
                                or float(values.max()) > hi * (1 + 1e-6) + 1e-9):
                warnings.warn(
                    f"{self.family} model: requested {name} [{float(values.min()):g}, {float(values.max()):g}] {unit} "
                    f"lies outside the training range [{lo:g}, {hi:g}] {unit}; showers there are extrapolations",
                    ConditionsWarning, stacklevel=3)

    def covers(self, conditions: Conditions, angled: bool = False) -> bool:
        """Whether the model takes every row of ``conditions`` inside its training range (:meth:`check_conditions`
        neither refuses them nor warns) and, with ``angled``, writes the detector's angled readout window."""
        if angled and tuple(self.window_shape(True)) != tuple(self.detector.shape(True)):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConditionsWarning)
            try:
                self.check_conditions(conditions)
            except (ModelError, ConditionsWarning):
                return False
        return True

    def _check_cells_frame(self, c: Conditions, source: str) -> None:
        """A ``cells`` model generates normal incidence at the origin (where its training showers were)."""
        if np.any(c.angle > 0):
            raise ModelError(f"{source}: angle {float(c.angle.max()):g} deg requested; this {self.family} model of "
                             f"{self.detector.name} generates normal incidence only (frame 'cells')")
        bad = (c.x != 0) | (c.y != 0)
        if np.any(bad) and "position" not in self.condition_names:  # else: check_conditions' impact region
            k = int(np.flatnonzero(bad)[0])
            raise ModelError(f"{source}: impact point ({c.x[k]:g}, {c.y[k]:g}) mm at row {k} requested; this "
                             f"{self.family} model of {self.detector.name} generates showers at the detector's "
                             f"default impact point (0, 0) only (frame 'cells')")

    def decode_window_hits(self, cond: torch.Tensor, *noise: torch.Tensor, angled: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The showers of :meth:`decode_window` as hits: shower row (H,), window cell index (H,) and energy (H,) of
        every non-zero cell, ordered by row, then cell. Families that make hits directly override this to skip the
        dense window."""
        return dense_hits(self.decode_window(cond, *noise, angled=angled))

    def _prepare(self, conditions: Any, angles: Any, seed: int | None, generator: torch.Generator | None,
                 positions: Any, particles: Any, angled: bool | None
                 ) -> tuple[torch.Tensor, list[torch.Tensor | kernels.UniformRows], bool, int]:
        """Checked conditions as the raw tensor, the noise sources, the window and the decoding chunk of a sampling
        call."""
        device = self.cond_mean.device
        c = as_conditions(conditions, angles, positions, particles)
        self.check_conditions(c)
        if angled is None:
            angled = bool(np.any(c.angle > 0))
        cond = torch.as_tensor(c.as_array(), dtype=torch.float32, device=device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        n = len(c)
        noise = self._noise_sources(n, generator)
        chunk = self.sample_chunk if self.sample_chunk > 0 and device.type == "cpu" else n
        return cond, noise, angled, max(chunk, 1)

    def _over_chunks(self, n: int, chunk: int, decode: Any) -> None:
        """``decode(i)`` for the chunks i = 0, chunk, 2 chunk, ... of n showers, in eval mode without gradients.

        Families with ``parallel_chunks`` on the CPU with several torch threads decode that many chunks at once, each
        on one thread (their small per-hit tensors gain little from torch's intra-op threads; whole chunks scale).
        Chunks are independent (their noise is fixed by their rows), so the numbers are the same either way."""
        was_training = self.training
        toggle = any(m.training for m in self.modules())  # (eval() and train() set every submodule's flag: 1-2 ms)
        if toggle:
            self.eval()
        starts = range(0, max(n, 1), chunk)  # an empty call decodes one empty chunk (the output's shape)
        threads = torch.get_num_threads()
        try:
            if not (self.parallel_chunks and threads > 1 and len(starts) > 1 and self.cond_mean.device.type == "cpu"):
                for i in starts:
                    decode(i)
                return
            from concurrent.futures import ThreadPoolExecutor

            def work(i: int) -> None:
                with torch.no_grad():
                    decode(i)

            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
                    for f in [pool.submit(work, i) for i in starts]:
                        f.result()
            finally:
                torch.set_num_threads(threads)
        finally:
            if toggle:
                self.train(was_training)

    @torch.no_grad()
    def sample(self, conditions: Conditions | torch.Tensor | np.ndarray | float, angles: Any = 0.0,
               seed: int | None = None, generator: torch.Generator | None = None, *, positions: Any = None,
               particles: Any = None, angled: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Showers (n, n_window_cells) in MeV for :class:`Conditions` (or energies in MeV with angles in deg, impact
        points (n, 2) in mm and particles); seeded via ``seed`` or ``generator``. ``angled`` picks the readout
        window (default: the angled one when any angle is > 0). ``out``: a float32 tensor of that shape on the
        model's device to fill and return (a caller that reuses one per batch saves the first touch of fresh
        memory, about 1 ms per MB on a small virtual machine; the numbers are the same)."""
        cond, noise, angled, chunk = self._prepare(conditions, angles, seed, generator, positions, particles, angled)
        n = cond.shape[0]
        if out is not None:
            self._check_out(out, n, angled)

        def decode(i: int) -> None:
            nonlocal out
            part = self.decode_window(cond[i:i + chunk], *(self._chunk(t, i, i + chunk) for t in noise), angled=angled)
            if out is None:
                with self._out_lock:
                    if out is None:  # chunks written into one output: no concatenation afterwards
                        out = torch.empty((n, part.shape[1]), dtype=part.dtype, device=part.device)
            out[i:i + len(part)] = part

        self._over_chunks(n, chunk, decode)
        return self.zero_dead_cells(out, angled)

    @torch.no_grad()
    def sample_hits(self, conditions: Conditions | torch.Tensor | np.ndarray | float, angles: Any = 0.0,
                    seed: int | None = None, generator: torch.Generator | None = None, *, positions: Any = None,
                    particles: Any = None, angled: bool | None = None, cell_dtype: torch.dtype = torch.int64
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The showers of :meth:`sample` (same arguments, same noise, the same numbers) as hits: the number of hits
        per shower (n,), their window cell indices (H,) and energies (H,) in MeV, shower by shower, cells in
        order. The sparse form that point-cloud models and DD4hep use; it never builds the dense window where the
        family makes hits directly. ``cell_dtype``: the indices' integer type (int64 or int32)."""
        counts, cells, energies = self.sample_hit_pieces(conditions, angles, seed, generator, positions=positions,
                                                         particles=particles, angled=angled, cell_dtype=cell_dtype)
        return torch.cat(counts), torch.cat(cells), torch.cat(energies)

    @torch.no_grad()
    def sample_hit_pieces(self, conditions: Conditions | torch.Tensor | np.ndarray | float, angles: Any = 0.0,
                          seed: int | None = None, generator: torch.Generator | None = None, *,
                          positions: Any = None, particles: Any = None, angled: bool | None = None,
                          cell_dtype: torch.dtype = torch.int64
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`sample_hits` before its pieces are joined: the counts, cells and energies of each decoding chunk,
        in order (``generate`` lets its writer thread join them while the next batch is made). The counts and the
        cast to ``cell_dtype`` are made in the chunks' worker threads."""
        if cell_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sample_hits: cell_dtype {cell_dtype}; expected torch.int32 or torch.int64")
        parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def keep(i: int, m: int, row: torch.Tensor, cell: torch.Tensor, energy: torch.Tensor) -> None:
            parts[i] = (torch.bincount(row, minlength=m), cell.to(cell_dtype), energy)

        self.hits_by_chunk(keep, conditions, angles, seed, generator, positions=positions, particles=particles,
                           angled=angled)
        counts, cells, energies = zip(*(parts[i] for i in sorted(parts)))
        return list(counts), list(cells), list(energies)

    @torch.no_grad()
    def hits_by_chunk(self, sink: Any, conditions: Conditions | torch.Tensor | np.ndarray | float, angles: Any = 0.0,
                      seed: int | None = None, generator: torch.Generator | None = None, *, positions: Any = None,
                      particles: Any = None, angled: bool | None = None) -> None:
        """The hits of :meth:`sample_hits` handed over chunk by chunk, as each is made: ``sink(i, m, row, cell,
        energy)`` for the showers i..i + m, ``row`` the shower within the chunk (0..m - 1; dead cells dropped). On
        the CPU with several threads the sink runs in the chunk's worker thread, so that what it does with the hits
        (count them, scatter them into a dense window) runs in parallel too; chunks may come in any order."""
        cond, noise, angled, chunk = self._prepare(conditions, angles, seed, generator, positions, particles, angled)
        n = cond.shape[0]
        dead = self.dead_cells(angled, cond.device) if self.detector.dead_cells else None

        def decode(i: int) -> None:
            row, cell, e = self.decode_window_hits(cond[i:i + chunk], *(self._chunk(t, i, i + chunk) for t in noise),
                                                   angled=angled)
            if dead is not None:
                live = ~torch.isin(cell, dead)
                row, cell, e = row[live], cell[live], e[live]
            sink(i, min(chunk, n - i), row, cell, e)

        self._over_chunks(n, chunk, decode)

    def _check_out(self, out: torch.Tensor, n: int, angled: bool) -> None:
        """A caller's output buffer for :meth:`sample`: (n, window cells), float32, contiguous, on the device."""
        shape = (n, int(np.prod(self.window_shape(angled))))
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() \
                or out.device != self.cond_mean.device:
            raise ValueError(f"sample: out is {tuple(out.shape)} {out.dtype} on {out.device}; expected a contiguous "
                             f"{shape} float32 tensor on {self.cond_mean.device}")

    def dead_cells(self, angled: bool, device: Any = None) -> torch.Tensor:
        """Window indices of the detector's dead cells (they read zero in every shower the model makes)."""
        dead = self.detector.dead_cell_indices(angled) if self.frame != "cells" else self.detector.dead_cell_indices()
        return torch.as_tensor(dead, dtype=torch.long, device=device)

    def zero_dead_cells(self, showers: torch.Tensor, angled: bool) -> torch.Tensor:
        """``showers`` (n, n_window_cells) with the detector's dead cells set to zero (a no-op without any)."""
        if not self.detector.dead_cells:
            return showers
        return showers.index_fill(1, self.dead_cells(angled, showers.device), 0.0)

    # ---- training hooks ---------------------------------------------------------------------------
    def configure_optimizers(self, lr: float, weight_decay: float = 0.0) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers; the default is one Adam over all parameters under the name ``"main"``."""
        return {"main": torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)}

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """Scalar loss of a batch (likelihood families)."""
        raise NotImplementedError

    def training_step(self, batch: TrainBatch, optimizers: dict[str, torch.optim.Optimizer], step: int,
                      grad_clip: float = 0.0, autocast: Any = None) -> dict[str, float]:
        """One optimisation step; returns the losses to log. Non-finite values make the trainer roll back."""
        from caloforge.distributed import reduce_gradients, weighted_sum

        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        with autocast if autocast is not None else _nullcontext():
            loss = self.loss(batch)
        if not torch.isfinite(weighted_sum(loss.detach(), batch.share)):  # the whole batch's loss (all shards)
            return {"loss": float(loss.detach())}
        loss.backward()
        reduce_gradients(self.parameters(), batch.share)  # data-parallel: the whole batch's gradient
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        opt.step()
        return {"loss": float(loss.detach())}

    # ---- description --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The JSON metadata written next to the weights."""
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "config": self.config.to_dict(),
            "detector": self.detector.to_dict(),
            "n_cells": self.n_cells,
            "shape": list(self.shape),
            "condition_names": list(self.condition_names),
            "condition_features": list(self.features),
            "frame": self.frame,
            "n_parameters": sum(p.numel() for p in self.parameters()),
            "caloforge_version": __version__,
            **self.meta,
        }


def _rows(noise: torch.Tensor | kernels.UniformRows, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of a noise tensor or of a lazily made draw."""
    return noise.rows(start, stop) if isinstance(noise, kernels.UniformRows) else noise[start:stop]


def dense_hits(showers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shower row, cell index and energy of every non-zero cell of dense showers (n, n_cells), row-major."""
    n_cells = showers.shape[1]
    flat = showers.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    row = torch.div(idx, n_cells, rounding_mode="floor")
    return row, idx - row * n_cells, flat[idx]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---- saving and loading -----------------------------------------------------------------------------------
def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the state dict (parameters and buffers) for safetensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(model: ShowerModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json`` (each atomically). Returns the directory."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = model.describe()
    meta.update(extra or {})
    _atomic_write_bytes(path / WEIGHTS_FILE, save(state_tensors(model), metadata={"family": model.family}))
    _atomic_write_bytes(path / META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return path


def shipped_model_path(name: str) -> Path | None:
    """The directory of a model shipped inside the package: ``default`` (``caloforge/pretrained``) or the name of one
    of its subdirectories (``multi``); None if there is no such model."""
    from importlib import resources

    root = Path(str(resources.files("caloforge").joinpath("pretrained")))
    path = root if name == "default" else root / name
    if name != "default" and (not name or "/" in name or "\\" in name or name.startswith(".")):
        return None
    return path if (path / META_FILE).is_file() else None


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if not p.exists():
        shipped = shipped_model_path(str(path))
        p = shipped if shipped is not None else p
    if p.is_file() and p.name in (WEIGHTS_FILE, META_FILE):
        p = p.parent
    if not p.exists():
        raise ModelError(f"{p}: model not found (expected a directory with {WEIGHTS_FILE} and {META_FILE})")
    if not p.is_dir():
        raise ModelError(f"{p}: not a model directory (expected a directory with {WEIGHTS_FILE} and {META_FILE})")
    for name in (WEIGHTS_FILE, META_FILE):
        if not (p / name).is_file():
            raise ModelError(f"{p}: missing {name}; a saved model has {WEIGHTS_FILE} and {META_FILE}")
    return p / META_FILE, p / WEIGHTS_FILE


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``model.json`` of a saved model, validated for the fields every loader needs."""
    meta_path, _ = _resolve(path)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{meta_path}: invalid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path}: expected a JSON object")
    for key in ("family", "config", "detector", "n_cells"):
        if key not in meta:
            raise ModelError(f"{meta_path}: missing field {key!r}")
    _check_meta_fields(meta, meta_path)
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ModelError(f"{meta_path}: field 'format_version' is {meta['format_version']}; this caloforge reads "
                         f"<= {FORMAT_VERSION} (upgrade caloforge)")
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta_fields(meta: dict[str, Any], meta_path: Path) -> None:
    """The types and ranges of the ``model.json`` fields loaders read (a ModelError naming the field)."""
    def bad(key: str, want: str) -> ModelError:
        return ModelError(f"{meta_path}: field {key!r} is {meta[key]!r:.80}; expected {want}")

    if not isinstance(meta["family"], str):
        raise bad("family", "a model family name")
    for key in ("config", "detector"):
        if not isinstance(meta[key], dict):
            raise bad(key, "a JSON object")
    if not _is_int(meta["n_cells"]) or not 0 < meta["n_cells"] <= 10**7:
        raise bad("n_cells", "a positive integer (cells per shower)")
    if "format_version" in meta and (not _is_int(meta["format_version"]) or meta["format_version"] < 1):
        raise bad("format_version", "a positive integer")
    if "conditions" in meta:
        rng = meta["conditions"]
        if not isinstance(rng, dict):
            raise bad("conditions", "a JSON object of [lo, hi] ranges")
        for key, v in rng.items():
            if not (isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] <= v[1]):
                raise ModelError(f"{meta_path}: field 'conditions.{key}' is {v!r:.80}; expected [lo, hi], finite "
                                 f"numbers with lo <= hi")
    if "particles" in meta and not (isinstance(meta["particles"], list) and meta["particles"]
                                    and all(p in PARTICLE_PDG for p in meta["particles"])):
        raise bad("particles", f"a list of particle names from {list(PARTICLE_PDG)}")
    if "particle" in meta and not isinstance(meta["particle"], str):
        raise bad("particle", "a particle name")


def load_model(path: str | Path, expected_detector: Detector | str | None = None,
               device: str | torch.device = "cpu") -> ShowerModel:
    """Load a saved model (safetensors + JSON only, no code execution) in eval mode.

    ``expected_detector``: raise :class:`ModelError` if the model was trained for another detector.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from caloforge.models import get_family

    meta_path, weights_path = _resolve(path)
    meta = read_meta(path)
    try:
        detector = Detector.from_dict(meta["detector"], f"{meta_path}: field 'detector'")
    except DetectorError as err:
        raise ModelError(str(err)) from None
    if expected_detector is not None:
        want = expected_detector if isinstance(expected_detector, Detector) else load_detector(expected_detector)
        if want.to_dict() != detector.to_dict():
            raise ModelError(f"{meta_path}: field 'detector' is {detector.name!r}; expected detector {want.name!r} "
                             f"(the model was trained for another detector)")
    cls = get_family(str(meta["family"]))
    config = cls.Config.from_dict(meta["config"], f"{meta_path}: field 'config'")
    features = meta.get("condition_features", list(LEGACY_FEATURES))
    frame = meta.get("frame", "window")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ModelError(f"{meta_path}: field 'condition_features' is {features!r}; expected a list of names")
    if not isinstance(frame, str):
        raise ModelError(f"{meta_path}: field 'frame' is {frame!r}; expected 'axis', 'window' or 'cells'")
    try:
        model = cls(detector, int(meta["n_cells"]), config, features=features, frame=frame)
    except ModelError as err:
        raise ModelError(f"{meta_path}: {err}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{weights_path}: unreadable safetensors file ({err})") from None
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{weights_path}: tensor {name!r} holds NaN or inf; expected finite weights (a diverged "
                             f"or damaged model)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{weights_path}: weights do not match the architecture in {meta_path}: {err}") from None
    known = {"format_version", "family", "config", "detector", "n_cells", "shape", "condition_names",
             "condition_features", "frame", "n_parameters", "caloforge_version"}
    model.meta = {k: v for k, v in meta.items() if k not in known}
    model.meta["path"] = str(meta_path.parent)
    return model.to(device).eval()
