"""The flag rule: which tests of an evaluation count as a significant deviation from the reference.

Every test of one candidate gives a p-value:

* a metric against its floor (separation power, W1 and KS of every observable, the three profiles, the
  correlation chi2/ndf, FPD, KPD): z = (value - floor) / sqrt(err_value^2 + err_floor^2) and the one-sided
  p = 1 - Phi(z): only an excess over the floor counts. ``err_value`` is the bootstrap error of the matched-size
  value, ``err_floor`` the error of the floor's mean over the splits (see :func:`caloforge.metrics.compare_with_floor`;
  FPD and KPD bring their own errors);
* a pull (energy response mu90 and sigma90/mu90 per energy, grid points, label checks): the two-sided
  p = 2 (1 - Phi(|pull|));
* a classifier: z = (AUC - 0.5) / auc_null_std, one-sided.

The p-values of all tests of one candidate form one family. Holm-Bonferroni at the family-wise level
:data:`ALPHA` decides: a test is flagged when its Holm-adjusted p-value (:func:`holm_adjusted`) is at most
:data:`ALPHA`, so the probability that a candidate drawn from the reference's distribution raises any flag in its
report is at most ALPHA (for p-values that are valid; ``scripts/calibrate_flags.py`` measures it). Tests whose
p-value is undefined (NaN: an empty observable, too few showers) are left out of the family and never flagged.

:func:`rule_sentence` is the one statement of this rule: the report prints it, and the docs quote it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import stats

#: Family-wise level: the largest acceptable probability of any false flag in one candidate's report.
ALPHA = 0.05


def z_score(value: float, floor: float, err_value: float, err_floor: float) -> float:
    """(value - floor) / sqrt(err_value^2 + err_floor^2); NaN when undefined, +-inf for an exact difference."""
    err = float(np.hypot(err_value, err_floor))
    diff = float(value) - float(floor)
    if not (np.isfinite(diff) and np.isfinite(err)):
        return float("nan")
    if err > 0:
        return diff / err
    return float("nan") if diff == 0 else float(np.copysign(np.inf, diff))


def p_one_sided(z: float) -> float:
    """P(Z > z) for a standard normal Z: the p-value of an excess; NaN stays NaN."""
    return float(stats.norm.sf(z)) if not np.isnan(z) else float("nan")


def p_two_sided(pull: float | None) -> float:
    """2 P(Z > |pull|): the p-value of a pull in either direction; None or NaN give NaN."""
    if pull is None or not np.isfinite(pull):
        return float("nan")
    return float(2 * stats.norm.sf(abs(pull)))


def holm_adjusted(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values: with p sorted ascending, p_adj(i) = max over j <= i of
    min(1, (m - j + 1) p(j)), m = the number of defined p-values. NaN entries stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def holm(p_values, alpha: float = ALPHA) -> np.ndarray:
    """Which tests Holm-Bonferroni rejects at family-wise level ``alpha`` (NaN p-values never)."""
    adj = holm_adjusted(p_values)
    return np.where(np.isnan(adj), False, adj <= alpha)


def rule_sentence(alpha: float = ALPHA) -> str:
    """The flag rule in one paragraph of plain text: printed in the report, quoted in docs/evaluation.md."""
    return (f"A test is flagged when its p-value survives a Holm-Bonferroni correction at a family-wise level of "
            f"{100 * alpha:g} % over all tests of the candidate. A metric with a floor gives "
            f"z = (value - floor) / sqrt(err_value^2 + err_floor^2), with err_value from a bootstrap of both samples "
            f"and err_floor the error of the mean floor over the splits, and the one-sided p-value 1 - Phi(z); "
            f"a pull gives the two-sided p-value 2 (1 - Phi(|pull|)); a classifier gives "
            f"z = (AUC - 0.5) / (its null spread), one-sided.")


def _p_metric(r: dict) -> float:
    return p_one_sided(z_score(r["value"], r["floor"], r.get("err_value", np.nan), r.get("err_floor", np.nan)))


def iter_tests(res: dict) -> Iterator[tuple[dict, str, float]]:
    """Every test of one candidate's results: (entry, key of its flag in the entry, p-value).

    Entries are the dictionaries of :func:`caloforge.metrics.compare_summaries` (observables, profiles,
    correlations, FPD, KPD, energy response rows), of the classifiers and of the grid-point and label checks.
    """
    for metrics in res.get("observables", {}).values():
        for r in metrics.values():
            yield r, "flagged", _p_metric(r)
    for r in res.get("profiles", {}).values():
        yield r, "flagged", _p_metric(r)
    if "correlations" in res:
        yield res["correlations"], "flagged", _p_metric(res["correlations"])
    for key in ("fpd", "kpd"):
        if key in res:
            r = res[key]
            r["z"] = z_score(r["value"], r["floor"], r["error"], r["floor_error"])
            r["p_value"] = p_one_sided(r["z"])
            yield r, "flagged", r["p_value"]
    for r in res.get("response", {}).values():
        for row in r["comparison"]:
            for q in ("mu90", "resolution"):
                row[f"{q}_p_value"] = p_two_sided(row.get(f"{q}_pull"))
                yield row, f"{q}_flagged", row[f"{q}_p_value"]
    for r in res.get("classifier", {}).values():
        if "auc" in r:
            r["z"] = z_score(r["auc"], 0.5, r.get("auc_null_std", np.nan), 0.0)
            r["p_value"] = p_one_sided(r["z"])
            yield r, "flagged", r["p_value"]
    for section in ("grid", "labels"):
        sec = res.get(section)
        for row in (sec or {}).get("rows", []) if isinstance(sec, dict) else []:
            row["p_value"] = p_two_sided(row.get("pull"))
            yield row, "flagged", row["p_value"]


def apply_rule(res: dict, alpha: float = ALPHA) -> list[dict]:
    """Decide the flags of one candidate (in place) with Holm-Bonferroni over all its tests.

    Sets each test's flag and Holm-adjusted p-value (``p_adjusted``, or ``<q>_p_adjusted`` for the response pulls),
    ``res["flag_rule"]`` (the sentence, alpha, the number of tests) and ``res["flags"]``/``res["n_flags"]``.
    Returns ``res["flags"]``.
    """
    from caloforge.metrics import collect_flags

    tests = list(iter_tests(res))
    adj = holm_adjusted([p for _, _, p in tests])
    for (entry, key, _), a in zip(tests, adj):
        entry[key] = bool(not np.isnan(a) and a <= alpha)
        entry[key.replace("flagged", "p_adjusted")] = float(a)
    for r in res.get("response", {}).values():
        for row in r["comparison"]:
            row["flagged"] = bool(row.get("mu90_flagged") or row.get("resolution_flagged"))
    for section in ("grid", "labels"):
        sec = res.get(section)
        if isinstance(sec, dict) and "rows" in sec:
            sec["n_flagged"] = sum(bool(row.get("flagged")) for row in sec["rows"])
    res["flag_rule"] = {"rule": rule_sentence(alpha), "alpha": alpha, "method": "holm-bonferroni",
                        "n_tests": int(np.sum(~np.isnan(adj)))}
    res["flags"] = collect_flags(res)
    res["n_flags"] = len(res["flags"])
    return res["flags"]
