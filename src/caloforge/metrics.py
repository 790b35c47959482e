"""Distances between a reference and a candidate shower sample, each beside its statistical floor.

The floor of a metric is its value between two disjoint halves of the reference (N/2 vs N/2). Because most
metrics shrink with sample size (W1 and KS ~ 1/sqrt(N), separation power ~ n_bins/N), the candidate is scored
at the same size: reference half A vs a random candidate subset of N/2 (``value``), averaged over several
random splits, beside the floor averaged over the same splits (``floor``, ``floor_std`` = spread of single
splits). The full-size value (all reference vs all candidate) is reported too, as ``value_full``.

Each comparison also carries the errors of both: ``err_value`` from a bootstrap (:func:`bootstrap_replicas`:
both samples resampled with replacement, each replica scored like the data; N_BOOT replicas, N_BOOT_REFINE for the
tests whose z lies in REFINE_Z) and ``err_floor`` = floor_std / sqrt(number of splits), the error of the floor's
mean; ``z`` = (value - floor) / sqrt(err_value^2 + err_floor^2) and its one-sided ``p_value``. Whether a test is
*flagged* is decided over all tests of a candidate at once, by Holm-Bonferroni at a family-wise level of 5 %
(:mod:`caloforge.flags`, called at the end of :func:`compare_summaries`); a lone comparison is flagged when its own
p-value is below that level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

FLOOR_SIGMAS = 3.0
N_BINS = 40
N_BOOT = 20  # bootstrap replicas for err_value
BOOT_SPLITS = 3  # half-splits per bootstrap replica (the variance is corrected to the data's number of splits)
N_BOOT_REFINE = 200  # replicas for the tests whose z after N_BOOT replicas lies in REFINE_Z
REFINE_Z = (2.5, 8.0)  # a 20-replica error scatters by ~30 %: enough to make a 2.5-sigma fluctuation look like 4


# ---- one-dimensional distances ----------------------------------------------------------------------------
def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def wasserstein1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 (earth mover's) distance between two 1D samples, in the observable's unit; NaNs dropped."""
    a, b = np.sort(_finite(a)), np.sort(_finite(b))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    grid = np.sort(np.concatenate([a, b]))  # scipy.stats.wasserstein_distance's algorithm, without its overhead
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max CDF difference, 0..1); NaNs dropped."""
    a, b = np.sort(_finite(a)), np.sort(_finite(b))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def common_edges(reference: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin edges for an observable, fixed from the reference alone, with under/overflow bins (+-inf).

    Integer-valued observables with a small range get one bin per integer; others get ``n_bins`` equal bins
    between the reference's 0.5 % and 99.5 % quantiles.
    """
    r = _finite(reference)
    if len(r) == 0:
        return np.array([-np.inf, np.inf])
    lo, hi = np.quantile(r, [0.005, 0.995])
    if np.all(r == np.round(r)) and hi - lo <= 2 * n_bins:
        inner = np.arange(np.floor(lo), np.ceil(hi) + 1) + 0.5
        inner = np.concatenate([[inner[0] - 1], inner])
    elif hi > lo:
        inner = np.linspace(lo, hi, n_bins + 1)
    else:
        inner = np.array([lo - 0.5, lo + 0.5]) if lo == 0 else np.array([lo * 0.999, lo * 1.001])
        inner.sort()
    return np.concatenate([[-np.inf], inner, [np.inf]])


def separation_power_hist(h1: np.ndarray, h2: np.ndarray) -> float:
    """CaloChallenge separation power 1/2 sum (h1 - h2)^2 / (h1 + h2) of two histograms normalised to unit sum."""
    h1, h2 = np.asarray(h1, float).ravel(), np.asarray(h2, float).ravel()
    s1, s2 = h1.sum(), h2.sum()
    if s1 <= 0 or s2 <= 0:
        return float("nan")
    h1, h2 = h1 / s1, h2 / s2
    den = h1 + h2
    ok = den > 0
    return float(0.5 * np.sum((h1[ok] - h2[ok]) ** 2 / den[ok]))


def separation_power(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> float:
    """Separation power of two samples histogrammed with common ``edges`` (see :func:`common_edges`)."""
    return separation_power_hist(np.histogram(_finite(a), edges)[0], np.histogram(_finite(b), edges)[0])


def profile_separation(a: np.ndarray, b: np.ndarray) -> float:
    """Separation power of two summed per-shower histograms (N, bins): compares mean profile shapes."""
    return separation_power_hist(np.asarray(a).sum(axis=0), np.asarray(b).sum(axis=0))


# ---- floor and flags --------------------------------------------------------------------------------------
@dataclass
class FloorComparison:
    """A metric at matched size (``value``) beside its floor, with their errors; see the module docstring."""

    value: float
    value_std: float
    floor: float
    floor_std: float
    value_full: float
    n_half: int
    n_splits: int
    flagged: bool
    err_value: float = float("nan")
    err_floor: float = float("nan")
    z: float = float("nan")
    p_value: float = float("nan")
    n_boot: int = 0

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in asdict(self).items()}


def corrected_sigmas(n_tests: int, sigmas: float = FLOOR_SIGMAS) -> float:
    """One-sided z threshold keeping the family-wise false-flag rate of ``n_tests`` tests at one 3-sigma test's."""
    return float(max(sigmas, stats.norm.isf(stats.norm.sf(sigmas) / max(n_tests, 1))))


def half_splits(n_ref: int, n_cand: int, n_splits: int, rng: np.random.Generator):
    """Index triples (ref half A, ref half B, candidate subset) of equal size min(n_ref // 2, n_cand)."""
    n_half = min(n_ref // 2, n_cand)
    if n_half < 2:
        raise ValueError(f"need at least 4 reference and 2 candidate showers, got {n_ref} and {n_cand}")
    out = []
    for _ in range(n_splits):
        perm = rng.permutation(n_ref)
        out.append((perm[:n_half], perm[n_half:2 * n_half], rng.choice(n_cand, n_half, replace=False)))
    return out


def bootstrap_replicas(n_ref: int, n_cand: int, rng: np.random.Generator, n_boot: int = N_BOOT,
                       n_splits: int = BOOT_SPLITS) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Bootstrap replicas of a comparison, as index triples into the original samples: per replica, both samples
    are resampled with replacement (N_ref and N_cand draws) and split like the data (:func:`half_splits`)."""
    out = []
    for _ in range(n_boot):
        ir, ic = rng.integers(0, n_ref, n_ref), rng.integers(0, n_cand, n_cand)
        out.append([(ir[a], ir[b], ic[c]) for a, b, c in half_splits(n_ref, n_cand, n_splits, rng)])
    return out


def bootstrap_error(values: np.ndarray, n_splits: int) -> float:
    """Standard error of a mean over ``n_splits`` splits, from bootstrap replicas ``values`` (n_boot, k splits each).

    Law of total variance: var(mean of n_splits) = var(replica means) - within * (1/k - 1/n_splits), with
    ``within`` the mean variance between the splits of one replica; never below within / n_splits. Replicas with
    an undefined value are dropped; fewer than 3 left give NaN.
    """
    v = np.asarray(values, float)
    v = v[np.isfinite(v).all(axis=1)]
    if len(v) < 3:
        return float("nan")
    k = v.shape[1]
    within = float(v.var(axis=1, ddof=1).mean()) if k > 1 else 0.0
    var = float(v.mean(axis=1).var(ddof=1)) - within * (1.0 / k - 1.0 / n_splits)
    return float(np.sqrt(max(var, within / n_splits, 0.0)))


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    return (float(x.mean()) if len(x) else float("nan")), (float(x.std(ddof=1)) if len(x) > 1 else 0.0)


def _floor_comparisons(ref: np.ndarray, cand: np.ndarray, metric: Callable, splits: Sequence, full: bool,
                       replicas: list | None) -> list[FloorComparison]:
    """:func:`compare_with_floor` for a ``metric`` returning k numbers at once: k comparisons."""
    from caloforge.flags import ALPHA, p_one_sided, z_score

    def run(pairs) -> np.ndarray:
        return np.array([np.atleast_1d(metric(x, y)) for x, y in pairs], dtype=float)

    floors = run((ref[a], ref[b]) for a, b, _ in splits)  # (splits, k)
    values = run((ref[a], cand[c]) for a, _, c in splits)
    k = floors.shape[1]
    if replicas is None:
        replicas = bootstrap_replicas(len(ref), len(cand), np.random.default_rng(0))
    boot = None
    if replicas and np.isfinite(values).any():
        boot = np.stack([run((ref[a], cand[c]) for a, _, c in rep) for rep in replicas])  # (n_boot, splits, k)
    full_values = np.atleast_1d(metric(ref, cand)).astype(float) if full else np.full(k, np.nan)
    out = []
    for j in range(k):
        floor, floor_std = _mean_std(floors[:, j])
        value, value_std = _mean_std(values[:, j])
        err_value = bootstrap_error(boot[:, :, j], len(splits)) if boot is not None and np.isfinite(value) \
            else float("nan")
        n_floor = int(np.isfinite(floors[:, j]).sum())
        err_floor = float(floor_std / np.sqrt(n_floor)) if n_floor > 1 else float("nan")
        z = z_score(value, floor, err_value, err_floor)
        p = p_one_sided(z)
        out.append(FloorComparison(
            value=value, value_std=value_std, floor=floor, floor_std=floor_std, value_full=float(full_values[j]),
            n_half=len(splits[0][0]), n_splits=len(splits), flagged=bool(p <= ALPHA), err_value=err_value,
            err_floor=err_floor, z=z, p_value=p, n_boot=len(replicas) if boot is not None else 0))
    return out


def _needs_refinement(r: dict) -> bool:
    """Whether a comparison's z lies where the noise of a N_BOOT-replica error could decide its flag."""
    return bool(REFINE_Z[0] < r.get("z", float("nan")) < REFINE_Z[1])


def compare_with_floor(ref: np.ndarray, cand: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                       splits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], full: bool = True,
                       replicas: list | None = None) -> FloorComparison:
    """``metric`` (rows = showers) at matched size and its floor over the given :func:`half_splits`, with errors.

    ``err_value``: :func:`bootstrap_error` over ``replicas`` (:func:`bootstrap_replicas`; default: N_BOOT replicas
    seeded 0); ``err_floor``: floor_std / sqrt(splits), the error of the floor's mean over the splits (the floor
    is a mean over random partitions of one reference sample). ``flagged`` here is the single-test decision
    (p-value below :data:`caloforge.flags.ALPHA`); :func:`caloforge.flags.apply_rule` decides it over a family.
    """
    return _floor_comparisons(ref, cand, metric, splits, full, replicas)[0]


def distances_1d(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> tuple[float, float, float]:
    """(separation power, W1, KS) of two 1D samples in one pass (one sort each): the same numbers as
    :func:`separation_power` with ``edges``, :func:`wasserstein1` and :func:`ks_statistic`."""
    a, b = np.sort(_finite(a)), np.sort(_finite(b))
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan"), float("nan")
    sp = separation_power_hist(np.diff(np.searchsorted(a, edges)), np.diff(np.searchsorted(b, edges)))
    grid = np.sort(np.concatenate([a, b]), kind="stable")  # two sorted runs: a merge
    diff = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
    return sp, float(np.sum(diff[:-1] * np.diff(grid))), float(np.max(diff))


OBSERVABLE_METRICS = ("separation_power", "wasserstein1", "ks")


def compare_observable(ref: np.ndarray, cand: np.ndarray, splits, n_bins: int = N_BINS,
                       replicas: list | None = None) -> dict[str, dict]:
    """Separation power, W1 and KS of one scalar observable, each with its floor and errors."""
    edges = common_edges(ref, n_bins)
    res = _floor_comparisons(np.asarray(ref), np.asarray(cand), lambda a, b: distances_1d(a, b, edges), splits,
                             True, replicas)
    return {k: r.to_dict() for k, r in zip(OBSERVABLE_METRICS, res)}


# ---- energy response --------------------------------------------------------------------------------------
def _core(x: np.ndarray, fraction: float) -> np.ndarray:
    """The sorted values inside the shortest interval holding ``fraction`` of the sample."""
    x = np.sort(_finite(x))
    k = int(np.ceil(fraction * len(x)))
    if k < 1:
        return x[:0]
    i = int(np.argmin(x[k - 1:] - x[:len(x) - k + 1]))
    return x[i:i + k]


def narrowest_interval(x: np.ndarray, fraction: float = 0.9) -> tuple[float, float]:
    """The shortest interval [lo, hi] holding ``fraction`` of the sample."""
    core = _core(x, fraction)
    return (float(core[0]), float(core[-1])) if len(core) else (float("nan"), float("nan"))


def mu90_sigma90(x: np.ndarray, fraction: float = 0.9) -> tuple[float, float]:
    """Mean and standard deviation of the values in the narrowest interval holding 90 % of the sample.

    For a Gaussian, sigma90 = sigma * sqrt(1 - 2 a phi(a) / (2 Phi(a) - 1)) with a = Phi^-1(0.95): 0.789 sigma.
    """
    core = _core(x, fraction)
    return (float(core.mean()), float(core.std())) if len(core) >= 2 else (float("nan"), float("nan"))


def bootstrap_mu90(x: np.ndarray, n_boot: int = 100, rng: np.random.Generator | None = None) -> dict[str, float]:
    """mu90, sigma90 and sigma90/mu90 with bootstrap standard errors."""
    rng = rng or np.random.default_rng(0)
    x = _finite(x)
    mu, sig = mu90_sigma90(x)
    boots = np.array([mu90_sigma90(x[rng.integers(0, len(x), len(x))]) for _ in range(n_boot)])
    res = boots[:, 1] / boots[:, 0]
    return {"n": int(len(x)), "mu90": mu, "mu90_err": float(np.std(boots[:, 0], ddof=1)),
            "sigma90": sig, "sigma90_err": float(np.std(boots[:, 1], ddof=1)),
            "resolution": sig / mu if mu else float("nan"), "resolution_err": float(np.std(res, ddof=1))}


def energy_points(energies: np.ndarray, max_points: int = 30, min_count: int = 20) -> np.ndarray | None:
    """The discrete incident energies of a sample (values with >= ``min_count`` showers), or None if continuous."""
    e = np.round(np.asarray(energies, float), 6)
    values, counts = np.unique(e, return_counts=True)
    if len(values) > max_points:
        return None
    keep = values[counts >= min_count]
    return keep if len(keep) else None


def energy_response(energies: np.ndarray, response: np.ndarray, points: np.ndarray, n_boot: int = 100,
                    seed: int = 0) -> list[dict]:
    """Per incident-energy point: :func:`bootstrap_mu90` of ``response`` (e.g. E_vis / E_inc)."""
    e = np.round(np.asarray(energies, float), 6)
    rng = np.random.default_rng(seed)
    out = []
    for p in points:
        sel = e == p
        if sel.sum() >= 2:
            out.append({"energy": float(p), **bootstrap_mu90(np.asarray(response)[sel], n_boot, rng)})
    return out


def pull_threshold(n_tests: int, sigmas: float = 3.0) -> float:
    """Two-sided z threshold with a Bonferroni correction: 3 sigma for one test, higher for many."""
    p = 2 * stats.norm.sf(sigmas) / max(n_tests, 1)
    return float(max(sigmas, stats.norm.isf(p / 2)))


def compare_response(ref: list[dict], cand: list[dict]) -> list[dict]:
    """Pulls (cand - ref) / combined error of mu90 and sigma90/mu90 at the energy points both samples have, their
    two-sided p-values and flags (Holm-Bonferroni at 5 % over these pulls; see :mod:`caloforge.flags`)."""
    by_e = {r["energy"]: r for r in ref}
    rows = []
    for c in cand:
        r = by_e.get(c["energy"])
        if r is None:
            continue
        row = {"energy": c["energy"]}
        for key in ("mu90", "resolution"):
            err = np.hypot(r[f"{key}_err"], c[f"{key}_err"])
            row[f"{key}_pull"] = float((c[key] - r[key]) / err) if err > 0 else 0.0
        rows.append(row)
    from caloforge.flags import holm, p_two_sided  # alone: Holm over these pulls; in a report, over the family

    p = [p_two_sided(row[f"{key}_pull"]) for row in rows for key in ("mu90", "resolution")]
    rejected = holm(p)
    for i, row in enumerate(rows):
        row["mu90_p_value"], row["resolution_p_value"] = p[2 * i], p[2 * i + 1]
        row["mu90_flagged"], row["resolution_flagged"] = bool(rejected[2 * i]), bool(rejected[2 * i + 1])
        row["flagged"] = row["mu90_flagged"] or row["resolution_flagged"]
    return rows


# ---- correlations -----------------------------------------------------------------------------------------
#: Fewest rows per sample the Fisher-z test takes; below it every number is NaN with a ``note``.
FISHER_MIN_ROWS = 4


def fisher_z_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Compare the correlation matrices of two samples (rows = showers, columns = features).

    For each feature pair z = (artanh r_a - artanh r_b) / sqrt(1/(N_a-3) + 1/(N_b-3)) ~ N(0, 1) if the
    correlations are equal. Returns chi2 = sum z^2, ndf = number of pairs, chi2_ndf, its p-value (pairs are
    treated as independent, so compare chi2_ndf with its floor), max |z| and the z matrix.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < FISHER_MIN_ROWS or len(b) < FISHER_MIN_ROWS:  # the variance 1/(N-3) needs N > 3
        k = a.shape[1] if a.ndim == 2 else 0
        return {"chi2": float("nan"), "ndf": 0, "chi2_ndf": float("nan"), "p_value": float("nan"),
                "max_abs_z": float("nan"), "z": np.zeros((k, k)),
                "note": f"not enough showers for this test ({len(a)} and {len(b)}; needs at least {FISHER_MIN_ROWS} "
                        f"per sample)"}
    with np.errstate(invalid="ignore", divide="ignore"):
        ra, rb = np.corrcoef(a, rowvar=False), np.corrcoef(b, rowvar=False)
    iu = np.triu_indices(a.shape[1], k=1)
    za = np.arctanh(np.clip(ra[iu], -0.999999, 0.999999))
    zb = np.arctanh(np.clip(rb[iu], -0.999999, 0.999999))
    z = (za - zb) / np.sqrt(1.0 / (len(a) - 3) + 1.0 / (len(b) - 3))
    z = z[np.isfinite(z)]
    chi2 = float(np.sum(z**2))
    ndf = len(z)
    zmat = np.zeros((a.shape[1], a.shape[1]))
    zfull = (za - zb) / np.sqrt(1.0 / (len(a) - 3) + 1.0 / (len(b) - 3))
    zmat[iu] = np.nan_to_num(zfull)
    zmat = zmat + zmat.T
    return {"chi2": chi2, "ndf": ndf, "chi2_ndf": chi2 / ndf if ndf else float("nan"),
            "p_value": float(stats.chi2.sf(chi2, ndf)) if ndf else float("nan"),
            "max_abs_z": float(np.max(np.abs(z))) if ndf else 0.0, "z": zmat}


def correlation_chi2_ndf(a: np.ndarray, b: np.ndarray) -> float:
    """chi2/ndf of :func:`fisher_z_test`, as a scalar metric for :func:`compare_with_floor`."""
    return fisher_z_test(a, b)["chi2_ndf"]


# ---- FPD and KPD (arXiv:2211.10295) ---------------------------------------------------------------------------
def standardise(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both samples scaled by the reference's per-feature mean and std (constant features: std 1). A feature is
    constant when its std is below 1e-9 of max(1, |mean|): round-off leaves a std of ~1e-17 on a feature that has
    one value in the reference (the deepest layer of a 4-layer calorimeter), and dividing the other sample by that
    made FPD floors of 1e31."""
    mu, sd = ref.mean(axis=0), ref.std(axis=0)
    sd = np.where(sd > 1e-9 * np.maximum(1.0, np.abs(mu)), sd, 1.0)
    return (ref - mu) / sd, (cand - mu) / sd


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between two Gaussians: |mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    Tr((C1 C2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric matrix
    C1^(1/2) C2 C1^(1/2) (the same eigenvalues as C1 C2), with round-off negatives set to zero. A general matrix
    square root of C1 C2 (scipy's ``sqrtm``) can return large spurious values when a covariance is (nearly)
    singular, as for a feature that is constant in one sample."""
    diff = np.atleast_1d(mu1 - mu2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ cov2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


def _gauss_fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def fpd(ref: np.ndarray, cand: np.ndarray, n_min: int | None = None, n_max: int | None = None,
        n_points: int = 10, n_batches: int = 5, seed: int = 0) -> tuple[float, float]:
    """Frechet physics distance: FD of standardised features at sizes N evenly spaced in 1/N between n_min and
    n_max (drawn with replacement, averaged over ``n_batches``), extrapolated to 1/N -> 0 by a straight-line
    fit. Returns (intercept, its fit error). Defaults: n_max = min(N_ref, N_cand), n_min = n_max / 5.
    """
    x, y = standardise(np.asarray(ref, float), np.asarray(cand, float))
    n_max = n_max or min(len(x), len(y))
    n_min = n_min or max(n_max // 5, 2 * x.shape[1] + 2)
    ns = (1.0 / np.linspace(1.0 / n_min, 1.0 / n_max, n_points)).astype(int)
    rng = np.random.default_rng(seed)
    vals = [np.mean([_gauss_fd(x[rng.integers(0, len(x), n)], y[rng.integers(0, len(y), n)])
                     for _ in range(n_batches)]) for n in ns]
    coef, cov = np.polyfit(1.0 / ns, vals, 1, cov=True)
    return float(coef[1]), float(np.sqrt(cov[1, 1]))


def mmd2_poly_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(a, b) = (a.b / d + 1)^degree."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** degree, ((y @ y.T) / d + 1) ** degree, ((x @ y.T) / d + 1) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kpd(ref: np.ndarray, cand: np.ndarray, n_batches: int = 10, batch_size: int = 2000, degree: int = 4,
        seed: int = 0) -> tuple[float, float]:
    """Kernel physics distance: median unbiased MMD^2 (degree-4 polynomial kernel, as in the JetNet reference
    implementation of arXiv:2211.10295) over batches of standardised features drawn with replacement;
    error = half the 16-84 % inter-quantile range."""
    x, y = standardise(np.asarray(ref, float), np.asarray(cand, float))
    bs = min(batch_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    vals = [mmd2_poly_unbiased(x[rng.integers(0, len(x), bs)], y[rng.integers(0, len(y), bs)], degree)
            for _ in range(n_batches)]
    q16, q84 = np.percentile(vals, [16.275, 83.725])
    return float(np.median(vals)), float((q84 - q16) / 2)


# ---- conditions -------------------------------------------------------------------------------------------
def compare_conditions(ref_energies: np.ndarray, cand_energies: np.ndarray, ref_angles: np.ndarray,
                       cand_angles: np.ndarray, p_min: float = 1e-3) -> dict:
    """KS tests of the incident energy and angle distributions; ``differ`` when either p-value < ``p_min``."""
    out = {}
    for name, a, b in (("energy", ref_energies, cand_energies), ("angle", ref_angles, cand_angles)):
        a, b = _finite(a), _finite(b)
        if np.ptp(np.concatenate([a, b])) == 0:
            out[name] = {"ks": 0.0, "p_value": 1.0}
        else:
            res = stats.ks_2samp(a, b)
            out[name] = {"ks": float(res.statistic), "p_value": float(res.pvalue)}
    out["differ"] = bool(any(out[k]["p_value"] < p_min for k in ("energy", "angle")))
    return out


def _condition_keys(ref: np.ndarray, cand: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin labels for one condition: its discrete values if few, else quantile bins of the pooled sample."""
    both = np.round(np.concatenate([ref, cand]), 6)
    values = np.unique(both)
    if len(values) <= 30:
        return np.searchsorted(values, np.round(ref, 6)), np.searchsorted(values, np.round(cand, 6))
    edges = np.unique(np.quantile(both, np.linspace(0, 1, n_bins + 1))[1:-1])
    return np.searchsorted(edges, ref), np.searchsorted(edges, cand)


def matched_indices(ref_energies: np.ndarray, ref_angles: np.ndarray, cand_energies: np.ndarray,
                    cand_angles: np.ndarray, n_bins: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subsets of both samples with the same joint (energy, angle) histogram.

    Showers are grouped by condition bin (the discrete energy/angle values when there are at most 30, else
    ``n_bins`` quantile bins in energy and ``n_bins // 4`` in angle) and each bin is cut down at random to the
    smaller of the two counts: histogram reweighting with weights 0/1, so every metric stays unweighted.
    """
    rng = np.random.default_rng(seed)
    er, ec = _condition_keys(np.asarray(ref_energies, float), np.asarray(cand_energies, float), n_bins)
    ar, ac = _condition_keys(np.asarray(ref_angles, float), np.asarray(cand_angles, float), max(n_bins // 4, 1))
    kr, kc = er * 10_000 + ar, ec * 10_000 + ac
    keep_r, keep_c = [], []
    for key in np.intersect1d(kr, kc):
        ir, ic = np.flatnonzero(kr == key), np.flatnonzero(kc == key)
        m = min(len(ir), len(ic))
        keep_r.append(rng.choice(ir, m, replace=False))
        keep_c.append(rng.choice(ic, m, replace=False))
    if not keep_r:
        raise ValueError("match-conditions: the two samples share no incident energy/angle bin")
    return np.sort(np.concatenate(keep_r)), np.sort(np.concatenate(keep_c))


# ---- everything for two samples ---------------------------------------------------------------------------
def _correlation_matrix_inputs(ref_obs: dict, cand_obs: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Feature columns defined (finite) for >= 99 % of both samples, rows with any undefined entry dropped."""
    cols = [n for n in names if np.isfinite(ref_obs[n]).mean() >= 0.99 and np.isfinite(cand_obs[n]).mean() >= 0.99
            and np.nanstd(ref_obs[n]) > 0 and np.nanstd(cand_obs[n]) > 0]
    a = np.column_stack([ref_obs[n] for n in cols])
    b = np.column_stack([cand_obs[n] for n in cols])
    return a[np.isfinite(a).all(1)], b[np.isfinite(b).all(1)]


def compare_summaries(ref, cand, n_splits: int = 10, seed: int = 0, fpd_kpd: bool = True) -> dict:
    """All non-classifier metrics between two :class:`~caloforge.observables.SampleSummary` objects."""
    from caloforge.observables import GLOBAL_OBSERVABLES, feature_matrices, feature_names, spectrum_edges

    rng = np.random.default_rng(seed)
    splits = half_splits(ref.n, cand.n, n_splits, rng)
    result: dict = {"n_reference": ref.n, "n_candidate": cand.n, "n_half": len(splits[0][0]), "n_splits": n_splits,
                    "seed": seed}
    result["conditions"] = compare_conditions(ref.energies, cand.energies, ref.angles, cand.angles)
    names = [n for n in ref.observables if n in cand.observables]
    replicas = bootstrap_replicas(ref.n, cand.n, rng)  # the same resampled showers for every observable
    result["n_boot"] = len(replicas)
    result["observables"] = {name: compare_observable(ref.observables[name], cand.observables[name], splits,
                                                      replicas=replicas) for name in names}
    first = int(np.searchsorted(spectrum_edges(ref.threshold_mev), ref.threshold_mev * (1 - 1e-9)))
    cuts = {"longitudinal": slice(None), "radial": slice(None), "spectrum": slice(first, None)}
    profile_splits = splits + half_splits(ref.n, cand.n, 2 * n_splits, rng)  # cheap: more splits, better tails
    result["profiles"] = {name: compare_with_floor(ref.profiles[name][:, cut], cand.profiles[name][:, cut],
                                                   profile_separation, profile_splits, replicas=replicas).to_dict()
                          for name, cut in cuts.items()}
    corr_names = list(GLOBAL_OBSERVABLES) + sorted(n for n in ref.observables if n.startswith("e_layer_l"))
    ca, cb = _correlation_matrix_inputs(ref.observables, cand.observables, corr_names)
    corr_splits = half_splits(len(ca), len(cb), max(3, n_splits // 2), rng)
    full = fisher_z_test(ca, cb)
    corr = compare_with_floor(ca, cb, correlation_chi2_ndf, corr_splits,
                              replicas=bootstrap_replicas(len(ca), len(cb), rng) if len(ca) >= 4 else [])
    result["correlations"] = {**corr.to_dict(),
                              "p_value_full": full["p_value"], "max_abs_z_full": full["max_abs_z"],
                              "n_features": int(ca.shape[1])}
    if corr.n_half < FISHER_MIN_ROWS:
        result["correlations"]["note"] = (f"not enough showers for this test ({corr.n_half} per half-split; needs at "
                                          f"least {FISHER_MIN_ROWS}): NaN, never flagged")
    # Tests near the threshold: their error again from N_BOOT_REFINE replicas (same splits, same value and floor).
    refine_rng = np.random.default_rng([seed, 1])
    big: dict[tuple[int, int], list] = {}

    def more(n_r: int, n_c: int) -> list:
        if (n_r, n_c) not in big:
            big[(n_r, n_c)] = bootstrap_replicas(n_r, n_c, refine_rng, n_boot=N_BOOT_REFINE)
        return big[(n_r, n_c)]

    for name, metrics in result["observables"].items():
        if any(_needs_refinement(r) for r in metrics.values()):
            again = compare_observable(ref.observables[name], cand.observables[name], splits,
                                       replicas=more(ref.n, cand.n))
            metrics.update({k: again[k] for k, r in metrics.items() if _needs_refinement(r)})
    for name, cut in cuts.items():
        if _needs_refinement(result["profiles"][name]):
            result["profiles"][name] = compare_with_floor(ref.profiles[name][:, cut], cand.profiles[name][:, cut],
                                                          profile_separation, profile_splits,
                                                          replicas=more(ref.n, cand.n)).to_dict()
    if _needs_refinement(result["correlations"]):
        again = compare_with_floor(ca, cb, correlation_chi2_ndf, corr_splits, replicas=more(len(ca), len(cb)))
        result["correlations"].update(again.to_dict())
    if fpd_kpd:
        xr, xc, used = feature_matrices(ref.observables, cand.observables, feature_names(ref.observables))
        a, b, c = splits[0]  # matched size, like every other floor
        for key, fn in (("fpd", fpd), ("kpd", kpd)):
            val, err = fn(xr[a], xc[c], seed=seed)
            floor, floor_err = fn(xr[a], xr[b], seed=seed)
            result[key] = {"value": val, "error": err, "floor": floor, "floor_error": floor_err,
                           "value_full": fn(xr, xc, seed=seed)[0], "n_half": len(a), "flagged": False}
        result["fpd"]["features"] = used
        result["kpd"]["degree"] = 4
    points_r, points_c = energy_points(ref.energies), energy_points(cand.energies)
    if points_r is not None and points_c is not None:
        points = np.intersect1d(points_r, points_c)
        resp = {}
        for key in ("e_ratio", "e_ratio_weighted"):
            r = energy_response(ref.energies, ref.observables[key], points, seed=seed)
            c = energy_response(cand.energies, cand.observables[key], points, seed=seed)
            resp[key] = {"reference": r, "candidate": c, "comparison": compare_response(r, c)}
        result["response"] = resp
    from caloforge.flags import apply_rule

    apply_rule(result)  # sets every "flagged", result["flags"] and result["flag_rule"]
    return result


def collect_flags(result: dict) -> list[dict]:
    """Every flagged test of a candidate's results (:func:`compare_summaries`, plus classifiers, grid points and
    label checks when present) as a flat list of {test, name, metric, value, floor, floor_std, z, p_adjusted}."""
    flags = []

    def add(test: str, name: str, metric: str, r: dict, value: float, floor: float, spread: float, z=None):
        flags.append({"test": test, "name": name, "metric": metric, "value": value, "floor": floor,
                      "floor_std": spread, "z": r.get("z", float("nan")) if z is None else z,
                      "p_adjusted": r.get("p_adjusted", float("nan"))})

    for name, metrics in result.get("observables", {}).items():
        for metric, r in metrics.items():
            if r["flagged"]:
                add("observable", name, metric, r, r["value"], r["floor"], r["floor_std"])
    for name, r in result.get("profiles", {}).items():
        if r["flagged"]:
            add("profile", name, "separation_power", r, r["value"], r["floor"], r["floor_std"])
    if result.get("correlations", {}).get("flagged"):
        r = result["correlations"]
        add("correlations", "fisher_z", "chi2_ndf", r, r["value"], r["floor"], r["floor_std"])
    for key in ("fpd", "kpd"):
        if result.get(key, {}).get("flagged"):
            r = result[key]
            add(key, key, key, r, r["value"], r["floor"], r["floor_error"])
    for key, r in result.get("response", {}).items():
        for row in r["comparison"]:
            if row["flagged"]:
                qs = [q for q in ("mu90", "resolution") if row.get(f"{q}_flagged", True)]
                pull = max(abs(row[f"{q}_pull"]) for q in qs)
                p_adj = [row[f"{q}_p_adjusted"] for q in qs if f"{q}_p_adjusted" in row]
                flags.append({"test": "response", "name": f"{key}@{row['energy']:g}MeV", "metric": "pull",
                              "value": pull, "floor": 0.0, "floor_std": 1.0, "z": pull,
                              "p_adjusted": float(np.min(p_adj)) if p_adj else float("nan")})
    for key, r in result.get("classifier", {}).items():
        if r.get("flagged"):
            add("classifier", key, "auc", r, r["auc"], 0.5, r["auc_null_std"])
    if result.get("grid") or result.get("labels"):
        from caloforge.gridpoints import flags as grid_flags

        flags += grid_flags(result)
    return flags


def flagged_observables(result: dict) -> set[str]:
    """Names of the observables with at least one flagged metric."""
    return {f["name"] for f in result.get("flags", []) if f["test"] == "observable"}
