"""A simple shower reconstruction, applied alike to Geant4 and generated showers (the seed's "after reconstruction").

Three quantities per shower, from the cells above the readout threshold of a cartesian window (N, L, X, Y):

* **calibrated energy** ``E_cal = c_p * E_w`` with the sampling-weighted visible energy
  ``E_w = sum_l w_l E_l`` (``w_l`` = :meth:`~caloforge.detector.Detector.sampling_weights`, ``E_l`` the layer
  energy) and one constant ``c_p`` per particle type fitted on the *reference* sample only
  (:func:`fit_calibration`), then applied to every sample: a model is judged with Geant4's calibration, so an
  energy-scale error of the model shows up as a response different from 1;
* **shower axis**: per layer the energy-weighted centroid (x_l, y_l) in mm, then a straight-line fit
  x(z) = x0 + s_x z, y(z) = y0 + s_y z over the layers weighted by the layer energy, using only layers that hold
  more than ``min_fraction`` (1 %) of the shower's visible energy, so the sparse halo of the first and last layers
  does not pull the fit;
* **reconstructed incidence angle** ``degrees(arctan(s_y))`` and **impact point** (x0, y0), the axis at the front
  face z = 0 (the generator shoots along (0, sin a, cos a) from (x, y, 0), so the true axis is
  (x, y + tan(a) z)).

Undefined values (fewer than two layers above the cut, so no slope) are NaN. See docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caloforge.detector import Detector
from caloforge.observables import DEFAULT_THRESHOLD_MEV, apply_threshold

MIN_LAYER_FRACTION = 0.01  # layers below 1 % of the shower's visible energy are left out of the axis fit

__all__ = [
    "MIN_LAYER_FRACTION", "Calibration", "Reconstruction", "Window", "fit_axis", "fit_calibration",
    "layer_centroids", "reconstruct",
]


@dataclass(frozen=True, eq=False)
class Window:
    """A cartesian readout window: cell centres ``x`` (X,), ``y`` (Y,), layer depths ``z`` (L,) in mm and the
    per-layer sampling ``weights`` (L,)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    weights: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.x), len(self.y))

    @property
    def n_cells(self) -> int:
        return int(np.prod(self.shape))

    @classmethod
    def from_detector(cls, detector: Detector, shape: tuple[int, ...] | int | None = None) -> Window:
        """The window of ``detector`` with the cell-array ``shape`` (or a number of cells; default normal
        incidence); works for the normal (30, 30, 30) and the angled (30, 30, 60) window alike."""
        if isinstance(shape, int | np.integer):
            shape = detector.shape_for_cells(int(shape))
        shape = tuple(shape) if shape is not None else detector.shape(False)
        angled = shape == detector.shape(True) and shape != detector.shape(False)
        if shape != detector.shape(angled):
            raise ValueError(f"detector {detector.name!r} has no window of shape {shape}")
        x, y, z = detector.cell_centers_mm(angled)
        return cls(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float),
                   np.asarray(detector.sampling_weights(), float))


@dataclass
class Reconstruction:
    """Per-shower reconstructed quantities (each (N,)); see the module docstring."""

    e_vis: np.ndarray  # MeV, cells above threshold
    e_vis_weighted: np.ndarray  # MeV, layer energies times sampling weights
    angle: np.ndarray  # deg, arctan(dy/dz) of the fitted axis
    x0: np.ndarray  # mm, axis at z = 0
    y0: np.ndarray  # mm, axis at z = 0
    slope_x: np.ndarray  # dx/dz
    slope_y: np.ndarray  # dy/dz
    n_fit_layers: np.ndarray  # layers used in the axis fit

    FIELDS = ("e_vis", "e_vis_weighted", "angle", "x0", "y0", "slope_x", "slope_y", "n_fit_layers")

    def __len__(self) -> int:
        return len(self.e_vis)

    @classmethod
    def concat(cls, parts: list[Reconstruction]) -> Reconstruction:
        if not parts:
            return cls(*(np.zeros(0) for _ in cls.FIELDS))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))

    def subset(self, rows: np.ndarray) -> Reconstruction:
        return Reconstruction(*(getattr(self, f)[rows] for f in self.FIELDS))


def _as_cells(showers: np.ndarray, window: Window) -> np.ndarray:
    """Showers (N, n_cells) or (N, L, X, Y) as a (N, L, X, Y) view."""
    showers = np.asarray(showers)
    if showers.ndim == 2 and showers.shape[1] == window.n_cells:
        return showers.reshape(len(showers), *window.shape)
    if showers.shape[1:] == window.shape:
        return showers
    raise ValueError(f"showers of shape {showers.shape} do not fit the window {window.shape}")


def layer_centroids(cells: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer energies ``e`` (N, L) in MeV and energy-weighted centroids ``cx``, ``cy`` (N, L) in mm (NaN for empty
    layers) of showers (N, L, X, Y)."""
    proj_x = cells.sum(axis=3, dtype=np.float64)  # (N, L, X)
    proj_y = cells.sum(axis=2, dtype=np.float64)  # (N, L, Y)
    e = proj_x.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.where(e > 0, (proj_x @ window.x) / np.where(e > 0, e, 1.0), np.nan)
        cy = np.where(e > 0, (proj_y @ window.y) / np.where(e > 0, e, 1.0), np.nan)
    return e, cx, cy


def fit_axis(e: np.ndarray, cx: np.ndarray, cy: np.ndarray, z: np.ndarray,
             min_fraction: float = MIN_LAYER_FRACTION) -> dict[str, np.ndarray]:
    """Weighted straight-line fit of the layer centroids against depth, per shower.

    Weights are the layer energies ``e`` (N, L) of the layers holding more than ``min_fraction`` of the shower's
    energy; others get weight 0. Returns ``x0``, ``y0`` (mm at z = 0), ``slope_x``, ``slope_y`` (dx/dz, dy/dz) and
    ``n_layers`` (layers used); the fit is NaN for showers with fewer than two layers above the cut.
    """
    z = np.asarray(z, float)[None, :]
    total = e.sum(axis=1, keepdims=True)
    w = np.where((e > min_fraction * total) & (e > 0), e, 0.0)
    n_used = (w > 0).sum(axis=1)
    sw, sz, szz = w.sum(1), (w * z).sum(1), (w * z * z).sum(1)
    den = sw * szz - sz**2
    ok = (n_used >= 2) & (den > 1e-12 * np.maximum(sw * szz, 1e-300))
    out: dict[str, np.ndarray] = {"n_layers": n_used}
    for axis, c in (("x", cx), ("y", cy)):
        c = np.where(w > 0, np.nan_to_num(c), 0.0)
        sc, szc = (w * c).sum(1), (w * z * c).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(ok, (sw * szc - sz * sc) / np.where(ok, den, 1.0), np.nan)
            out[f"slope_{axis}"] = slope
            out[f"{axis}0"] = np.where(ok, (sc - slope * sz) / np.where(sw > 0, sw, 1.0), np.nan)
    return out


def reconstruct(showers: np.ndarray, window: Window, threshold_mev: float = DEFAULT_THRESHOLD_MEV,
                min_fraction: float = MIN_LAYER_FRACTION) -> Reconstruction:
    """Reconstruct showers (N, n_cells) or (N, L, X, Y) in MeV: visible energies, axis, angle, impact point.

    Cells at or below ``threshold_mev`` are dropped first (as in every observable), identically for every sample.
    """
    cells = _as_cells(apply_threshold(showers, threshold_mev), window)
    e, cx, cy = layer_centroids(cells, window)
    axis = fit_axis(e, cx, cy, window.z, min_fraction)
    return Reconstruction(
        e_vis=e.sum(axis=1), e_vis_weighted=e @ window.weights,
        angle=np.degrees(np.arctan(axis["slope_y"])), x0=axis["x0"], y0=axis["y0"],
        slope_x=axis["slope_x"], slope_y=axis["slope_y"], n_fit_layers=axis["n_layers"].astype(float),
    )


# ---- calibration --------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Energy-calibration constants ``c_p`` (MeV of incident energy per MeV of weighted visible energy), one per
    PDG code, and ``pooled`` (all particles together) for particles the reference does not hold."""

    constants: dict[int, float]
    pooled: float

    def apply(self, e_vis_weighted: np.ndarray, pdg: np.ndarray | None = None) -> np.ndarray:
        """Calibrated energies E_cal = c_p * E_w (MeV)."""
        e_w = np.asarray(e_vis_weighted, float)
        if pdg is None:
            return self.pooled * e_w
        pdg = np.asarray(pdg).reshape(-1)
        c = np.array([self.constants.get(int(p), self.pooled) for p in pdg]) if len(pdg) else np.zeros(0)
        return c * e_w

    def to_dict(self) -> dict:
        return {"per_pdg": {str(k): v for k, v in self.constants.items()}, "pooled": self.pooled,
                "definition": "c = 1 / mean(E_vis_weighted / E_true) over the reference showers of each particle"}


def _constant(e_true: np.ndarray, e_w: np.ndarray) -> float:
    """1 / mean response: the constant that makes the mean of E_cal / E_true exactly 1 on these showers."""
    ok = (e_w > 0) & (e_true > 0) & np.isfinite(e_w)
    if not ok.any():
        return float("nan")
    return float(1.0 / np.mean(e_w[ok] / e_true[ok]))


def fit_calibration(e_true: np.ndarray, e_vis_weighted: np.ndarray, pdg: np.ndarray | None = None) -> Calibration:
    """Fit the calibration on reference showers: per particle type, c_p = 1 / mean(E_w / E_true).

    The inverse of the mean response rather than the mean of E_true / E_w, which a few showers with little visible
    energy would pull; after calibration the mean response E_cal / E_true of the reference is 1 per particle.
    """
    e_true, e_w = np.asarray(e_true, float).reshape(-1), np.asarray(e_vis_weighted, float).reshape(-1)
    pdg = np.zeros(len(e_true), int) if pdg is None else np.asarray(pdg).reshape(-1)
    constants = {int(p): _constant(e_true[pdg == p], e_w[pdg == p]) for p in np.unique(pdg)}
    return Calibration(constants=constants, pooled=_constant(e_true, e_w))

