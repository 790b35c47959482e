"""Evaluation in the seed's manner (BIB-AE, ILD): per grid point, and labels recovered by reconstruction.

* **Grid points.** When the reference holds few distinct conditions (:func:`grid_points`: at most
  ``GRID_MAX_POINTS`` = 30 distinct (energy, angle, particle) combinations), every combination with at least
  ``GRID_MIN_SHOWERS`` = 50 reference showers is a point. Per point and per sample: the visible energy (mu90,
  sigma90, sigma90/mu90), the number of hits, the mean hit energy, the longitudinal centre of gravity, the mean
  distance to the shower axis, the reconstructed angle (mean and sigma90) and the calibrated energy response
  E_cal / E_true (mu90 and sigma90/mu90, "after reconstruction", see :mod:`caloforge.reconstruction`), each with a
  statistical error. The candidate is compared with the reference by pulls (difference over the combined error).
* **Label checks** ("the HGCAL way"): over the whole sample, the reconstructed impact x and y, angle and
  calibrated energy are fitted against the true ones, reco = a + b * true: slope b, residual RMS about the fit,
  and the mean bias reco - true, with bootstrap errors; the candidate's numbers are compared with Geant4's by pulls.

Errors: mu90/sigma90 and every label-fit number by bootstrap (``n_boot`` resamples, seeded), means by std/sqrt(n).
Flags: on its own, this module flags a pull above 3 sigma Bonferroni-corrected over the rows of its section;
``caloforge evaluate`` re-decides every row as one two-sided test in the candidate's family of tests
(:func:`caloforge.flags.apply_rule`). See docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caloforge.conditions import PDG_PARTICLE, Conditions
from caloforge.metrics import bootstrap_mu90, pull_threshold
from caloforge.reconstruction import (
    MIN_LAYER_FRACTION,
    Calibration,
    Reconstruction,
    Window,
    fit_calibration,
    reconstruct,
)

GRID_MAX_POINTS = 30
GRID_MIN_SHOWERS = 50
N_BOOT = 100
PROFILE_BINS = 10  # truth bins of the label profiles when the truth takes more than 30 values

#: (quantity, statistic) pairs compared per grid point, with a label for tables and plots.
GRID_QUANTITIES: tuple[tuple[str, str, str], ...] = (
    ("e_vis", "mu90", "visible energy mu90 [MeV]"),
    ("e_vis", "resolution", "visible energy sigma90/mu90"),
    ("e_cal_response", "mu90", "calibrated E / E_true mu90"),
    ("e_cal_response", "resolution", "calibrated E sigma90/mu90"),
    ("n_hits", "mean", "mean number of hits"),
    ("hit_e_mean", "mean", "mean hit energy [MeV]"),
    ("cog_z", "mean", "mean centre of gravity z [mm]"),
    ("r_mean", "mean", "mean distance to axis [mm]"),
    ("angle", "mean", "mean reconstructed angle [deg]"),
    ("angle", "sigma90", "angular resolution sigma90 [deg]"),
)
#: Labels checked by the reco-vs-true fits: name -> unit.
LABEL_UNITS = {"x": "mm", "y": "mm", "angle": "deg", "energy": "MeV"}


@dataclass(frozen=True)
class GridPoint:
    """One grid point: incident energy (MeV), angle (deg) and particle (PDG code, 0 = not recorded)."""

    energy: float
    angle: float
    pdg: int

    @property
    def particle(self) -> str:
        return PDG_PARTICLE.get(self.pdg, "unknown")

    @property
    def name(self) -> str:
        return f"{self.particle} {self.energy / 1e3:g} GeV {self.angle:g} deg"

    def to_dict(self) -> dict:
        return {"energy": self.energy, "angle": self.angle, "pdg": self.pdg, "particle": self.particle,
                "name": self.name}


def _keys(conditions: Conditions) -> np.ndarray:
    """Rounded (energy to 1 keV, angle to 0.001 deg, pdg) per row: equal for equal grid conditions."""
    return np.stack([np.round(conditions.energy, 3), np.round(conditions.angle, 3),
                     conditions.pdg.astype(float)], axis=1)


def grid_points(conditions: Conditions, max_points: int = GRID_MAX_POINTS,
                min_showers: int = GRID_MIN_SHOWERS) -> tuple[list[GridPoint], list[dict]] | None:
    """The grid points of a reference sample, or None when it is not a grid.

    Rule: the sample is a grid when it holds at most ``max_points`` distinct (energy, angle, particle)
    combinations; the combinations with at least ``min_showers`` rows are the points (the others are returned as
    skipped, with their counts). None also when no combination has enough rows.
    """
    if len(conditions) == 0:
        return None
    values, counts = np.unique(_keys(conditions), axis=0, return_counts=True)
    if len(values) > max_points:
        return None
    points = [GridPoint(float(e), float(a), int(p)) for (e, a, p), n in zip(values, counts) if n >= min_showers]
    skipped = [{**GridPoint(float(e), float(a), int(p)).to_dict(), "n": int(n)}
               for (e, a, p), n in zip(values, counts) if n < min_showers]
    return (points, skipped) if points else None


def point_mask(conditions: Conditions, point: GridPoint) -> np.ndarray:
    """Rows of ``conditions`` at ``point``."""
    k = _keys(conditions)
    return (k[:, 0] == round(point.energy, 3)) & (k[:, 1] == round(point.angle, 3)) & (k[:, 2] == point.pdg)


# ---- one sample ---------------------------------------------------------------------------------------------
@dataclass
class SampleData:
    """What the grid and label checks need of one sample, row by row: its conditions, the scalar observables of
    :mod:`caloforge.observables` (``n_hits``, ``hit_e_mean``, ``cog_z``, ``r_mean``) and the reconstruction."""

    conditions: Conditions
    observables: dict[str, np.ndarray]
    reco: Reconstruction

    def __post_init__(self) -> None:
        n = len(self.conditions)
        if len(self.reco) != n or any(len(v) != n for v in self.observables.values()):
            raise ValueError("SampleData: conditions, observables and reconstruction differ in length")

    def quantities(self, calibration: Calibration) -> dict[str, np.ndarray]:
        """Per-row values of every grid quantity (the calibrated energy with the reference's ``calibration``)."""
        e_cal = calibration.apply(self.reco.e_vis_weighted, self.conditions.pdg)
        return {"e_vis": self.reco.e_vis, "e_cal_response": e_cal / self.conditions.energy,
                "n_hits": self.observables["n_hits"], "hit_e_mean": self.observables["hit_e_mean"],
                "cog_z": self.observables["cog_z"], "r_mean": self.observables["r_mean"], "angle": self.reco.angle}

    def labels(self, calibration: Calibration) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Label name -> (true, reconstructed) per row."""
        c = self.conditions
        e_cal = calibration.apply(self.reco.e_vis_weighted, c.pdg)
        return {"x": (c.x, self.reco.x0), "y": (c.y, self.reco.y0), "angle": (c.angle, self.reco.angle),
                "energy": (c.energy, e_cal)}


class SampleCollector:
    """Collects conditions and :func:`~caloforge.reconstruction.reconstruct` of streamed batches (called with each
    batch that a :class:`~caloforge.observables.SampleSummary` is built from, in the same order)."""

    def __init__(self, window: Window, threshold_mev: float) -> None:
        self.window, self.threshold_mev = window, threshold_mev
        self._conditions: list[Conditions] = []
        self._reco: list[Reconstruction] = []

    def __call__(self, batch) -> None:
        self._conditions.append(batch.conditions)
        self._reco.append(reconstruct(batch.showers, self.window, self.threshold_mev))

    def sample_data(self, summary) -> SampleData:
        """The collected rows with the observables of ``summary`` (built from the same batches)."""
        keep = ("n_hits", "hit_e_mean", "cog_z", "r_mean")
        return SampleData(Conditions.concat(self._conditions), {k: summary.observables[k] for k in keep},
                          Reconstruction.concat(self._reco))


def describe(values: np.ndarray, rng: np.random.Generator, n_boot: int = N_BOOT) -> dict[str, float]:
    """n, mean (+- std/sqrt(n)), std, and mu90, sigma90, sigma90/mu90 with bootstrap errors (finite values only)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    nan = float("nan")
    if len(v) < 2:
        return {"n": int(len(v)), "mean": float(v.mean()) if len(v) else nan, "mean_err": nan, "std": nan,
                "mu90": nan, "mu90_err": nan, "sigma90": nan, "sigma90_err": nan, "resolution": nan,
                "resolution_err": nan}
    with np.errstate(invalid="ignore", divide="ignore"):
        robust = bootstrap_mu90(v, n_boot, rng)
    return {**robust, "mean": float(v.mean()), "mean_err": float(v.std(ddof=1) / np.sqrt(len(v))),
            "std": float(v.std(ddof=1))}


def point_stats(sample: SampleData, points: list[GridPoint], calibration: Calibration, rng: np.random.Generator,
                n_boot: int = N_BOOT) -> list[dict]:
    """Per point: {quantity: :func:`describe`} of the sample's rows at that point (plus ``n``)."""
    values = sample.quantities(calibration)
    out = []
    for p in points:
        sel = point_mask(sample.conditions, p)
        out.append({"n": int(sel.sum()), **{q: describe(v[sel], rng, n_boot) for q, v in values.items()}})
    return out


# ---- comparisons --------------------------------------------------------------------------------------------
def _pull_row(ref: float, ref_err: float, cand: float, cand_err: float) -> dict:
    """Candidate minus reference with the combined error, the pull, and the relative difference."""
    diff = cand - ref
    err = float(np.hypot(ref_err, cand_err))
    ok = np.isfinite(diff) and np.isfinite(err) and err > 0
    significant = np.isfinite(diff) and abs(ref) > (ref_err if np.isfinite(ref_err) else 0.0)
    rel = diff / abs(ref) if significant else float("nan")  # only for a reference value distinct from zero
    return {"reference": ref, "reference_err": ref_err, "candidate": cand, "candidate_err": cand_err,
            "diff": float(diff), "diff_err": err, "rel_diff": float(rel), "pull": float(diff / err) if ok else None}


def _section(rows: list[dict]) -> dict:
    """A comparison section: its rows, each flagged (standalone rule) when its |pull| exceeds 3 sigma
    Bonferroni-corrected over the rows with a pull, and the counts."""
    n_tests = sum(r["pull"] is not None for r in rows)
    thr = pull_threshold(n_tests)
    for r in rows:
        r["flagged"] = bool(r["pull"] is not None and abs(r["pull"]) > thr)
    return {"n_tests": n_tests, "n_flagged": sum(r["flagged"] for r in rows), "rows": rows}


def compare_points(points: list[GridPoint], ref_stats: list[dict], cand_stats: list[dict]) -> dict:
    """Pulls of every :data:`GRID_QUANTITIES` entry at every point, candidate minus reference."""
    rows = []
    for i, (p, r, c) in enumerate(zip(points, ref_stats, cand_stats)):
        for q, stat, _ in GRID_QUANTITIES:
            row = _pull_row(r[q][stat], r[q][f"{stat}_err"], c[q][stat], c[q][f"{stat}_err"])
            rows.append({"point": i, "name": p.name, "quantity": q, "statistic": stat, **row})
    return _section(rows)


# ---- label checks -------------------------------------------------------------------------------------------
def _line_fit(t: np.ndarray, r: np.ndarray, varies: bool) -> tuple[float, float, float, float]:
    """(slope, intercept, residual RMS, bias) of reco = a + b * true; without a spread in truth: no slope, the
    residual RMS about the mean."""
    bias = float(np.mean(r - t))
    if not varies:
        return float("nan"), float("nan"), float(np.std(r)), bias
    tm, rm = t.mean(), r.mean()
    b = float(np.sum((t - tm) * (r - rm)) / np.sum((t - tm) ** 2))
    a = float(rm - b * tm)
    return b, a, float(np.sqrt(np.mean((r - a - b * t) ** 2))), bias


def truth_bins(true: np.ndarray, max_values: int = 30, n_bins: int = PROFILE_BINS) -> np.ndarray:
    """Bin edges of a truth variable for the profiles: one bin per value for few values, else quantile bins."""
    t = np.asarray(true, float)
    values = np.unique(np.round(t, 6))
    if not len(values):
        return np.array([0.0, 0.0])
    if len(values) <= max_values:
        mids = 0.5 * (values[1:] + values[:-1])
        return np.concatenate([[values[0] - 0.5], mids, [values[-1] + 0.5]]) if len(values) > 1 else \
            np.array([values[0] - 0.5, values[0] + 0.5])
    edges = np.unique(np.quantile(t, np.linspace(0, 1, n_bins + 1)))
    edges[-1] = np.nextafter(edges[-1], np.inf)
    return edges


def profile(true: np.ndarray, reco: np.ndarray, edges: np.ndarray) -> dict[str, list]:
    """Mean truth, mean reco (+- error) and count per truth bin (bins of ``edges``, empty bins left out)."""
    b = np.searchsorted(edges, true, side="right") - 1
    out: dict[str, list] = {"true_mean": [], "reco_mean": [], "reco_err": [], "reco_std": [], "n": []}
    for i in range(len(edges) - 1):
        sel = b == i
        if sel.sum() < 1:
            continue
        r = reco[sel]
        out["true_mean"].append(float(true[sel].mean()))
        out["reco_mean"].append(float(r.mean()))
        out["reco_std"].append(float(r.std(ddof=1)) if len(r) > 1 else float("nan"))
        out["reco_err"].append(float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan"))
        out["n"].append(int(sel.sum()))
    return out


def label_fit(true: np.ndarray, reco: np.ndarray, rng: np.random.Generator, edges: np.ndarray | None = None,
              n_boot: int = N_BOOT) -> dict:
    """Fit reco = a + b * true over the rows with a defined reconstruction; bootstrap errors; truth profile."""
    true, reco = np.asarray(true, float), np.asarray(reco, float)
    ok = np.isfinite(true) & np.isfinite(reco)
    t, r = true[ok], reco[ok]
    varies = bool(len(t) >= 3 and np.ptp(t) > 1e-9 * max(1.0, float(np.abs(t).max())))
    nan = float("nan")
    res: dict = {"n": int(len(t)), "n_undefined": int((~ok).sum()), "truth_varies": varies}
    if len(t) < 3:
        return {**res, **dict.fromkeys(("slope", "slope_err", "intercept", "residual_rms", "residual_rms_err",
                                        "bias", "bias_err"), nan), "profile": profile(t, r, np.array([0.0, 0.0]))}
    slope, intercept, rms, bias = _line_fit(t, r, varies)
    boots = np.array([_line_fit(t[i], r[i], varies) for i in (rng.integers(0, len(t), len(t)) for _ in range(n_boot))])
    with np.errstate(invalid="ignore"):
        err = np.nanstd(boots, axis=0, ddof=1) if varies else np.std(boots, axis=0, ddof=1)
    edges = truth_bins(t) if edges is None else edges
    return {**res, "slope": slope, "slope_err": float(err[0]) if varies else nan, "intercept": intercept,
            "residual_rms": rms, "residual_rms_err": float(err[2]), "bias": bias, "bias_err": float(err[3]),
            "profile": profile(t, r, edges)}


def compare_labels(ref_fits: dict[str, dict], cand_fits: dict[str, dict]) -> dict:
    """Pulls of slope (where the truth varies), residual RMS and bias of every label, candidate minus reference."""
    rows = []
    for name, r in ref_fits.items():
        c = cand_fits[name]
        for stat in ("slope", "residual_rms", "bias"):
            if stat == "slope" and not (r["truth_varies"] and c["truth_varies"]):
                continue
            rows.append({"label": name, "statistic": stat,
                         **_pull_row(r[stat], r[f"{stat}_err"], c[stat], c[f"{stat}_err"])})
    return _section(rows)


# ---- everything -----------------------------------------------------------------------------------------------
def evaluate_seed_manner(reference: SampleData, candidates: dict[str, SampleData], reference_label: str = "reference",
                         seed: int = 0, max_points: int = GRID_MAX_POINTS, min_showers: int = GRID_MIN_SHOWERS,
                         n_boot: int = N_BOOT) -> dict:
    """Calibration, grid-point statistics and label fits of every sample, and each candidate's comparison.

    Returns {"reconstruction": calibration and settings, "grid": per-point stats of every sample or None,
    "labels": label fits of every sample, "comparisons": {label: {"grid": ..., "labels": ...}}}.
    """
    c = reference.conditions
    calibration = fit_calibration(c.energy, reference.reco.e_vis_weighted, c.pdg)
    samples = {reference_label: reference, **candidates}

    def rng(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, k])

    comparisons: dict[str, dict] = {label: {} for label in candidates}
    grid = grid_points(c, max_points, min_showers)
    grid_out = None
    if grid is not None:
        points, skipped = grid
        stats = {label: point_stats(s, points, calibration, rng(k), n_boot) for k, (label, s) in
                 enumerate(samples.items())}
        grid_out = {"rule": {"max_points": max_points, "min_showers": min_showers}, "skipped": skipped,
                    "points": [{**p.to_dict(), "n": {label: st[i]["n"] for label, st in stats.items()},
                                "stats": {label: st[i] for label, st in stats.items()}} for i, p in enumerate(points)]}
        for label in candidates:
            comparisons[label]["grid"] = compare_points(points, stats[reference_label], stats[label])
    ref_labels = reference.labels(calibration)
    edges = {name: truth_bins(t[np.isfinite(t)]) for name, (t, _) in ref_labels.items()}
    fits = {label: {name: label_fit(t, r, rng(100 + k), edges[name], n_boot)
                    for name, (t, r) in s.labels(calibration).items()} for k, (label, s) in enumerate(samples.items())}
    for label in candidates:
        comparisons[label]["labels"] = compare_labels(fits[reference_label], fits[label])
    return {"reconstruction": {"calibration": calibration.to_dict(), "min_layer_fraction": MIN_LAYER_FRACTION},
            "grid": grid_out,
            "labels": {"units": LABEL_UNITS, "fits": fits}, "comparisons": comparisons}


def add_to_results(results: dict, reference: SampleData, candidates: dict[str, SampleData], seed: int = 0,
                   min_showers: int = GRID_MIN_SHOWERS) -> None:
    """Run :func:`evaluate_seed_manner` and store it in an evaluation's ``results``: ``results["reconstruction"]``,
    ``results["grid"]`` (None when the reference is no grid), ``results["labels"]``, and per candidate its
    ``grid`` and ``labels`` comparisons, their flags appended to its ``flags`` (``n_flags`` updated)."""
    out = evaluate_seed_manner(reference, candidates, results["reference"]["label"], seed=seed,
                               min_showers=min_showers)
    results["reconstruction"] = out["reconstruction"]
    results["grid"] = out["grid"]
    results["labels"] = out["labels"]
    for label, comparison in out["comparisons"].items():
        res = results["candidates"][label]
        res.update(comparison)
        res["flags"].extend(flags(comparison))
        res["n_flags"] = len(res["flags"])


def flags(comparison: dict) -> list[dict]:
    """The flagged grid and label tests of one candidate, in the flat form of ``res["flags"]``."""
    out = []
    for row in comparison.get("grid", {}).get("rows", []):
        if row["flagged"]:
            out.append({"test": "grid", "name": f"{row['quantity']}.{row['statistic']}@{row['name']}",
                        "metric": "pull", "value": abs(row["pull"]), "floor": 0.0, "floor_std": 1.0,
                        "z": row["pull"], "p_adjusted": row.get("p_adjusted", float("nan"))})
    for row in comparison.get("labels", {}).get("rows", []):
        if row["flagged"]:
            out.append({"test": "labels", "name": f"{row['label']}.{row['statistic']}", "metric": "pull",
                        "value": abs(row["pull"]), "floor": 0.0, "floor_std": 1.0, "z": row["pull"],
                        "p_adjusted": row.get("p_adjusted", float("nan"))})
    return out
