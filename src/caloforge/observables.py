"""Shower observables, vectorised over a batch, for any readout geometry described as data.

Every function takes showers as an array (N, n_cells) in MeV and a geometry: either a
:class:`~caloforge.detector.Detector` (with the cell-array ``shape``) or any object following the
:class:`Geometry` protocol (per-cell ``cell_x``, ``cell_y``, ``cell_layer`` arrays, per-layer ``layer_z`` and
``layer_weights``), such as the CaloChallenge binning in :mod:`caloforge.calochallenge`. Nothing is hard-coded
to a 30 x 30 x 30 window.

Conventions (see docs/evaluation.md): cells at or below ``threshold_mev`` are zeroed before any observable is
computed, identically for every sample; positions are in mm; longitudinal quantities in layer-index units are
named ``shower_depth``/``layer``; quantities undefined for a shower (e.g. the centroid of an empty layer) are NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np

from caloforge.detector import Detector

DEFAULT_THRESHOLD_MEV = 0.075  # 0.5 MIP in 0.5 mm Si
PER_LAYER_FAMILIES = ("e_layer", "frac", "eratio", "cog_x", "cog_y", "width_x", "width_y")
GLOBAL_OBSERVABLES = (
    "e_vis", "e_vis_weighted", "e_ratio", "e_ratio_weighted", "n_hits", "hit_e_mean",
    "cog_x", "cog_y", "cog_z", "r_mean", "shower_depth", "shower_depth_width", "deepest_layer", "axis_angle_y",
)


# ---- geometry ---------------------------------------------------------------------------------------------
@runtime_checkable
class Geometry(Protocol):
    """What the observables need to know about a readout: per-cell position and layer, per-layer z and weight."""

    cell_x: np.ndarray  # (n_cells,) mm
    cell_y: np.ndarray  # (n_cells,) mm
    cell_layer: np.ndarray  # (n_cells,) int, 0..n_layers-1, non-decreasing
    layer_z: np.ndarray  # (n_layers,) mm
    layer_weights: np.ndarray  # (n_layers,) sampling weights


@dataclass(frozen=True, eq=False)
class CellGeometry:
    """A plain :class:`Geometry`: cells must be grouped by layer (layer index non-decreasing)."""

    cell_x: np.ndarray
    cell_y: np.ndarray
    cell_layer: np.ndarray
    layer_z: np.ndarray
    layer_weights: np.ndarray
    name: str = ""
    layer_slices: tuple[slice, ...] = field(init=False)

    def __post_init__(self) -> None:
        layer = np.asarray(self.cell_layer)
        if np.any(np.diff(layer) < 0):
            raise ValueError("CellGeometry: cells must be ordered by layer")
        n_layers = len(self.layer_z)
        bounds = np.searchsorted(layer, np.arange(n_layers + 1))
        object.__setattr__(self, "layer_slices", tuple(slice(int(a), int(b)) for a, b in zip(bounds, bounds[1:])))

    @property
    def n_cells(self) -> int:
        return len(self.cell_x)

    @property
    def n_layers(self) -> int:
        return len(self.layer_z)


@lru_cache(maxsize=16)
def _detector_geometry(detector: Detector, shape: tuple[int, ...]) -> CellGeometry:
    if not detector.is_uniform:  # per-layer cells: every cell's centre from the description
        if shape != detector.shape():
            raise ValueError(f"detector {detector.name!r} has no window of shape {shape}")
        t = detector.cell_table()
        return CellGeometry(cell_x=t["x"], cell_y=t["y"], cell_layer=t["layer"], layer_z=detector.layer_z_mm(),
                            layer_weights=np.asarray(detector.sampling_weights(), float), name=detector.name)
    n_l, n_x, n_y = shape
    x, y, z = detector.cell_centers_mm(angled=shape == detector.shape(True) and shape != detector.shape(False))
    if len(x) != n_x or len(y) != n_y or len(z) != n_l:
        raise ValueError(f"detector {detector.name!r} has no window of shape {shape}")
    cx, cy = np.meshgrid(x, y, indexing="ij")
    return CellGeometry(
        cell_x=np.tile(cx.ravel(), n_l), cell_y=np.tile(cy.ravel(), n_l),
        cell_layer=np.repeat(np.arange(n_l), n_x * n_y), layer_z=np.asarray(z, float),
        layer_weights=np.asarray(detector.sampling_weights(), float), name=detector.name,
    )


def as_geometry(detector: Detector | Geometry, shape: tuple[int, ...] | None = None) -> CellGeometry:
    """A :class:`CellGeometry` for a Detector (window ``shape``, default normal incidence) or any Geometry."""
    if isinstance(detector, CellGeometry):
        return detector
    if isinstance(detector, Detector):
        return _detector_geometry(detector, tuple(shape) if shape is not None else detector.shape(False))
    if isinstance(detector, Geometry):
        return CellGeometry(np.asarray(detector.cell_x, float), np.asarray(detector.cell_y, float),
                            np.asarray(detector.cell_layer, int), np.asarray(detector.layer_z, float),
                            np.asarray(detector.layer_weights, float), getattr(detector, "name", ""))
    raise TypeError(f"expected a Detector or a Geometry, got {type(detector).__name__}")


def apply_threshold(showers: np.ndarray, threshold_mev: float = DEFAULT_THRESHOLD_MEV) -> np.ndarray:
    """Cells with energy <= threshold set to zero (a copy; float32 kept). threshold 0 returns the input."""
    showers = np.asarray(showers)
    if threshold_mev <= 0:
        return showers
    return np.where(showers > threshold_mev, showers, np.zeros((), showers.dtype))


# ---- contract functions (used by training loops) ----------------------------------------------------------
def visible_energy(showers: np.ndarray) -> np.ndarray:
    """Sum of all cell energies per shower (N,), MeV."""
    return np.asarray(showers, dtype=np.float64).reshape(len(showers), -1).sum(axis=1)


def n_hits(showers: np.ndarray, threshold_mev: float = DEFAULT_THRESHOLD_MEV) -> np.ndarray:
    """Number of cells with energy above ``threshold_mev`` per shower (N,)."""
    return (np.asarray(showers).reshape(len(showers), -1) > threshold_mev).sum(axis=1)


def layer_energies(showers: np.ndarray, shape: tuple[int, ...] | Geometry) -> np.ndarray:
    """Energy per layer (N, L), MeV. ``shape`` is the (layer, x, y) window shape or a Geometry."""
    showers = np.asarray(showers).reshape(len(showers), -1)
    if isinstance(shape, tuple | list):
        return showers.reshape(len(showers), int(shape[0]), -1).sum(axis=2, dtype=np.float64)
    geom = as_geometry(shape)
    return np.stack([showers[:, sl].sum(axis=1, dtype=np.float64) for sl in geom.layer_slices], axis=1)


def longitudinal_cog(showers: np.ndarray, detector: Detector | Geometry,
                     shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Energy-weighted mean layer index per shower (N,), in layer units (CaloGAN shower depth s_d)."""
    e_l = layer_energies(showers, as_geometry(detector, shape))
    return _shower_depth(e_l)[0]


# ---- building blocks --------------------------------------------------------------------------------------
def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _shower_depth(e_l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s_d, sigma_sd) in layer units from layer energies (N, L)."""
    idx = np.arange(e_l.shape[1], dtype=float)
    tot = e_l.sum(axis=1)
    sd = _safe_div(e_l @ idx, tot)
    sd2 = _safe_div(e_l @ idx**2, tot)
    return sd, np.sqrt(np.clip(sd2 - sd**2, 0, None))


def layer_moments(showers: np.ndarray, geom: CellGeometry) -> dict[str, np.ndarray]:
    """Per layer (N, L): energy ``e``, centroids ``cog_x``/``cog_y`` and widths ``width_x``/``width_y`` (mm)."""
    n = len(showers)
    out = {k: np.empty((n, geom.n_layers)) for k in ("e", "cog_x", "cog_y", "width_x", "width_y")}
    for i, sl in enumerate(geom.layer_slices):
        x, y = geom.cell_x[sl], geom.cell_y[sl]
        basis = np.stack([np.ones_like(x), x, y, x * x, y * y], axis=1)
        m = showers[:, sl].astype(np.float64) @ basis
        e = m[:, 0]
        mx, my = _safe_div(m[:, 1], e), _safe_div(m[:, 2], e)
        out["e"][:, i] = e
        out["cog_x"][:, i], out["cog_y"][:, i] = mx, my
        out["width_x"][:, i] = np.sqrt(np.clip(_safe_div(m[:, 3], e) - mx**2, 0, None))
        out["width_y"][:, i] = np.sqrt(np.clip(_safe_div(m[:, 4], e) - my**2, 0, None))
    return out


def energy_ratio_per_layer(showers: np.ndarray, geom: CellGeometry) -> np.ndarray:
    """CaloGAN E_ratio per layer (N, L): (I1 - I2) / (I1 + I2) of the two hottest cells; NaN for empty layers."""
    out = np.full((len(showers), geom.n_layers), np.nan)
    for i, sl in enumerate(geom.layer_slices):
        cells = showers[:, sl]
        if cells.shape[1] < 2:
            out[:, i] = np.where(cells[:, 0] > 0, 1.0, np.nan) if cells.shape[1] else np.nan
            continue
        top = np.partition(cells, -2, axis=1)[:, -2:].astype(np.float64)
        out[:, i] = _safe_div(top[:, 1] - top[:, 0], top[:, 1] + top[:, 0])
    return out


def shower_axis(moments: dict[str, np.ndarray], geom: CellGeometry) -> dict[str, np.ndarray]:
    """Straight shower axis per shower from a layer-energy-weighted fit of the layer centroids against z.

    Returns offsets ``x0``, ``y0`` (mm at z = 0) and slopes ``sx``, ``sy`` (dx/dz, dy/dz); for angled incidence
    ``degrees(arctan(sy))`` is the reconstructed incidence angle. Showers with fewer than two layers hit get
    slope 0 and the overall centroid.
    """
    w = moments["e"]
    z = geom.layer_z[None, :]
    sw, sz, szz = w.sum(1), (w * z).sum(1), (w * z * z).sum(1)
    result = {}
    for axis in ("x", "y"):
        c = np.nan_to_num(moments[f"cog_{axis}"])
        sc, szc = (w * c).sum(1), (w * z * c).sum(1)
        den = sw * szz - sz**2
        ok = den > 1e-9 * np.maximum(sw * szz, 1e-300)
        slope = np.where(ok, (sw * szc - sz * sc) / np.where(ok, den, 1.0), 0.0)
        mean_c, mean_z = _safe_div(sc, sw), _safe_div(sz, sw)
        result[f"s{axis}"] = slope
        result[f"{axis}0"] = mean_c - slope * mean_z
    return result


def radial_edges(geom: CellGeometry, n_bins: int = 20) -> np.ndarray:
    """Radial bin edges (mm) from 0 to the half-width of the readout, with an overflow edge at +inf."""
    half = 0.5 * min(np.ptp(geom.cell_x), np.ptp(geom.cell_y) or np.ptp(geom.cell_x))
    half = half if half > 0 else float(np.max(np.hypot(geom.cell_x, geom.cell_y)) or 1.0)
    return np.append(np.linspace(0.0, half, n_bins + 1), np.inf)


def spectrum_edges(threshold_mev: float = DEFAULT_THRESHOLD_MEV, per_decade: int = 15) -> np.ndarray:
    """Log-spaced cell-energy bin edges (MeV) from threshold/100 to threshold*1e5, one edge exactly at threshold."""
    ref = threshold_mev if threshold_mev > 0 else DEFAULT_THRESHOLD_MEV
    return ref * np.logspace(-2, 5, 7 * per_decade + 1)


def _sparse_hist(rows: np.ndarray, values: np.ndarray, weights: np.ndarray, edges: np.ndarray,
                 n_rows: int) -> np.ndarray:
    """Per-row histograms (n_rows, len(edges)-1) of ``values`` with ``weights``, from flat (row, value) lists."""
    nb = len(edges) - 1
    b = np.searchsorted(edges, values, side="right") - 1
    keep = (b >= 0) & (b < nb)
    flat = np.bincount(rows[keep] * nb + b[keep], weights=weights[keep], minlength=n_rows * nb)
    return flat.reshape(n_rows, nb)


def radial_profile(showers: np.ndarray, geom: CellGeometry, axis: dict[str, np.ndarray],
                   edges: np.ndarray) -> np.ndarray:
    """Energy per radial bin about the fitted shower axis (N, n_bins), MeV."""
    rows, cols = np.nonzero(showers)
    z = geom.layer_z[geom.cell_layer[cols]]
    dx = geom.cell_x[cols] - (np.nan_to_num(axis["x0"][rows]) + axis["sx"][rows] * z)
    dy = geom.cell_y[cols] - (np.nan_to_num(axis["y0"][rows]) + axis["sy"][rows] * z)
    return _sparse_hist(rows, np.hypot(dx, dy), showers[rows, cols].astype(np.float64), edges, len(showers))


def cell_energy_spectrum(showers: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per-shower counts of cells per energy bin (N, n_bins): the hit-energy spectrum with its MIP peak."""
    rows, cols = np.nonzero(showers)
    vals = showers[rows, cols]
    return _sparse_hist(rows, vals, np.ones(len(vals)), edges, len(showers))


# ---- the observable set -----------------------------------------------------------------------------------
def compute_observables(showers: np.ndarray, energies: np.ndarray, angles: np.ndarray | None,
                        detector: Detector | Geometry, shape: tuple[int, ...] | None = None,
                        threshold_mev: float = DEFAULT_THRESHOLD_MEV) -> dict[str, np.ndarray]:
    """Per-shower scalar observables, name -> (N,) float array (names in docs/evaluation.md).

    Global: ``e_vis`` (MeV), ``e_vis_weighted`` (layers times the detector's sampling weights), ``e_ratio`` and
    ``e_ratio_weighted`` (over the incident energy), ``n_hits``, ``hit_e_mean``, ``cog_x``/``cog_y``/``cog_z``
    (mm), ``r_mean`` (energy-weighted mean distance to the shower axis, mm), ``shower_depth`` (s_d) and
    ``shower_depth_width`` (sigma_sd) in layers, ``deepest_layer``, ``axis_angle_y`` (deg, incidence angle from
    the centroid fit). Per layer i (suffix ``_lNN``): ``e_layer``, ``frac``, ``eratio``, ``cog_x``, ``cog_y``,
    ``width_x``, ``width_y``. ``angles`` is accepted for symmetry with the file format and not used.
    """
    return _observables_and_profiles(showers, energies, detector, shape, threshold_mev, profiles=False)[0]


def compute_profiles(showers: np.ndarray, detector: Detector | Geometry, shape: tuple[int, ...] | None = None,
                     threshold_mev: float = DEFAULT_THRESHOLD_MEV) -> dict[str, np.ndarray]:
    """Per-shower binned profiles: ``longitudinal`` (N, L), ``radial`` (N, R), ``spectrum`` (N, S).

    Sums over showers give the mean profiles; bin edges come from :func:`radial_edges`/:func:`spectrum_edges`.
    The spectrum is taken before the threshold (to show the MIP peak and the cut); the others after it.
    """
    energies = np.ones(len(showers))
    return _observables_and_profiles(showers, energies, detector, shape, threshold_mev, profiles=True)[1]


def _observables_and_profiles(showers, energies, detector, shape, threshold_mev, profiles: bool):
    geom = as_geometry(detector, shape)
    raw = np.asarray(showers).reshape(len(showers), -1)
    if raw.shape[1] != geom.n_cells:
        raise ValueError(f"showers have {raw.shape[1]} cells; the geometry has {geom.n_cells}")
    cells = apply_threshold(raw, threshold_mev)
    energies = np.asarray(energies, float).reshape(-1)
    mom = layer_moments(cells, geom)
    e_l = mom["e"]
    e_vis = e_l.sum(axis=1)
    e_w = e_l @ geom.layer_weights
    hits = (cells > 0).sum(axis=1)
    axis = shower_axis(mom, geom)
    sd, sd_width = _shower_depth(e_l)
    hit_layers = e_l > 0
    deepest = np.where(hit_layers.any(1), geom.n_layers - 1 - np.argmax(hit_layers[:, ::-1], axis=1), np.nan)
    r_edges = radial_edges(geom)
    radial = radial_profile(cells, geom, axis, r_edges)
    r_centres = np.append(0.5 * (r_edges[:-2] + r_edges[1:-1]), r_edges[-2])
    obs: dict[str, np.ndarray] = {
        "e_vis": e_vis,
        "e_vis_weighted": e_w,
        "e_ratio": e_vis / energies,
        "e_ratio_weighted": e_w / energies,
        "n_hits": hits.astype(float),
        "hit_e_mean": _safe_div(e_vis, hits.astype(float)),
        "cog_x": _safe_div((mom["cog_x"] * e_l).sum(1, where=hit_layers), e_vis),
        "cog_y": _safe_div((mom["cog_y"] * e_l).sum(1, where=hit_layers), e_vis),
        "cog_z": _safe_div(e_l @ geom.layer_z, e_vis),
        "r_mean": _safe_div(radial @ r_centres, e_vis),
        "shower_depth": sd,
        "shower_depth_width": sd_width,
        "deepest_layer": deepest,
        "axis_angle_y": np.degrees(np.arctan(axis["sy"])),
    }
    per_layer = {"e_layer": e_l, "frac": _safe_div(e_l, e_vis[:, None]), "eratio": energy_ratio_per_layer(cells, geom),
                 "cog_x": mom["cog_x"], "cog_y": mom["cog_y"], "width_x": mom["width_x"], "width_y": mom["width_y"]}
    for fam in PER_LAYER_FAMILIES:
        for i in range(geom.n_layers):
            obs[layer_name(fam, i)] = per_layer[fam][:, i]
    prof = {}
    if profiles:
        prof = {"longitudinal": e_l, "radial": radial,
                "spectrum": cell_energy_spectrum(raw, spectrum_edges(threshold_mev))}
    return obs, prof


def layer_name(family: str, layer: int) -> str:
    """Name of a per-layer observable, e.g. ``frac_l07``."""
    return f"{family}_l{layer:02d}"


# ---- streaming summary of a sample ------------------------------------------------------------------------
@dataclass
class SampleSummary:
    """Everything the metrics and the report need from one sample, accumulated batch by batch.

    ``observables``: name -> (N,), ``profiles``: name -> (N, bins) per-shower histograms, ``image_sum``: summed
    cell energies after threshold (n_cells,), so the mean image is ``image_sum / n``.
    """

    energies: np.ndarray
    angles: np.ndarray
    observables: dict[str, np.ndarray]
    profiles: dict[str, np.ndarray]
    image_sum: np.ndarray
    image_n: int
    geometry: CellGeometry
    threshold_mev: float

    @property
    def n(self) -> int:
        return len(self.energies)

    def mean_image(self) -> np.ndarray:
        """Mean cell energies after threshold (over all summarised showers, also for a subset)."""
        return self.image_sum / max(self.image_n, 1)

    def subset(self, rows: np.ndarray) -> SampleSummary:
        """The summary of the showers ``rows`` (the mean image stays that of the whole sample)."""
        return SampleSummary(
            energies=self.energies[rows], angles=self.angles[rows],
            observables={k: v[rows] for k, v in self.observables.items()},
            profiles={k: v[rows] for k, v in self.profiles.items()},
            image_sum=self.image_sum, image_n=self.image_n, geometry=self.geometry, threshold_mev=self.threshold_mev,
        )


def summarise(batches: Iterable, detector: Detector | Geometry, shape: tuple[int, ...] | None = None,
              threshold_mev: float = DEFAULT_THRESHOLD_MEV) -> SampleSummary:
    """Stream batches (objects with ``energies``, ``angles``, ``showers``) into a :class:`SampleSummary`.

    Only per-shower scalars and small per-shower histograms are kept; the cells are dropped after each batch.
    """
    geom = as_geometry(detector, shape)
    parts: dict[str, list] = {"e": [], "a": []}
    obs_parts: dict[str, list] = {}
    prof_parts: dict[str, list] = {}
    image = np.zeros(geom.n_cells)
    for b in batches:
        showers = np.asarray(b.showers).reshape(len(b.energies), -1)
        obs, prof = _observables_and_profiles(showers, b.energies, geom, None, threshold_mev, profiles=True)
        for k, v in obs.items():
            obs_parts.setdefault(k, []).append(v)
        for k, v in prof.items():
            prof_parts.setdefault(k, []).append(v.astype(np.float32))
        parts["e"].append(np.asarray(b.energies, float))
        parts["a"].append(np.asarray(b.angles, float))
        image += apply_threshold(showers, threshold_mev).sum(axis=0, dtype=np.float64)
    if not parts["e"]:
        raise ValueError("summarise: no showers")
    return SampleSummary(
        energies=np.concatenate(parts["e"]), angles=np.concatenate(parts["a"]),
        observables={k: np.concatenate(v) for k, v in obs_parts.items()},
        profiles={k: np.concatenate(v) for k, v in prof_parts.items()},
        image_sum=image, image_n=sum(len(e) for e in parts["e"]), geometry=geom, threshold_mev=threshold_mev,
    )


# ---- feature matrices for multivariate metrics ------------------------------------------------------------
def feature_names(observables: dict[str, np.ndarray], families: tuple[str, ...] = ("frac",)) -> list[str]:
    """The high-level feature set: every global observable plus the chosen per-layer families."""
    names = [n for n in GLOBAL_OBSERVABLES if n in observables]
    return names + sorted(n for n in observables if n.rsplit("_l", 1)[0] in families and n not in names)


def feature_matrices(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray],
                     names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reference and candidate feature matrices standardised with the reference's mean and std.

    Undefined entries (NaN) become 0, the reference mean; columns constant in both samples are dropped.
    Returns (X_ref, X_cand, kept names).
    """
    xr = np.column_stack([np.asarray(ref[n], float) for n in names])
    xc = np.column_stack([np.asarray(cand[n], float) for n in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (layers never hit) are dropped below
        mu, sd, sd_c = np.nanmean(xr, axis=0), np.nanstd(xr, axis=0), np.nanstd(xc, axis=0)
    keep = np.isfinite(mu) & ((sd > 0) | (sd_c > 0))
    mu, sd = mu[keep], np.where(sd[keep] > 0, sd[keep], 1.0)
    xr, xc = np.nan_to_num((xr[:, keep] - mu) / sd), np.nan_to_num((xc[:, keep] - mu) / sd)
    return xr, xc, [n for n, k in zip(names, keep) if k]
