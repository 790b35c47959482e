"""Where a high-level classifier separates generated showers from Geant4: by angle bin and by observable group.

A gradient-boosted classifier (scikit-learn) on the evaluator's observables (``caloforge evaluate``'s high-level
inputs, plus log E and the angle) is trained on half of the showers and tested on the other half. It prints the
test AUC in each angle bin, the AUC lost when one observable group (``width_y`` = all layers' ``width_y_lNN``, ...)
is left out, and the AUC of each group alone. Use it to find what to fix before reading 700 histograms; the
evaluator's own classifier (a small MLP) gives the figures to report.

    python scripts/separation_breakdown.py data/ild-multi-test.h5 gen/v23-multi.h5
    python scripts/separation_breakdown.py data/ild-multi-test.h5 gen/v23-multi.h5 --angles 40:60 --groups
"""

from __future__ import annotations

import argparse
import collections
import re

import numpy as np

from caloforge.dataset import ShowerFile
from caloforge.evaluate import geometry_for, summarise_file
from caloforge.observables import feature_matrices

BINS = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.01)


def _summaries(path: str, lo: float, hi: float):
    with ShowerFile(path) as f:
        angles = f.conditions.angle
        rows = np.flatnonzero((angles >= lo) & (angles <= hi))
        return summarise_file(f, geometry_for(f, None, None), 0.075, rows), angles[rows]


def main(argv: list[str] | None = None) -> int:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reference", help="Geant4 file")
    p.add_argument("candidate", help="generated file (same conditions, e.g. generate --conditions-from)")
    p.add_argument("--angles", default="0:60", help="angle range lo:hi in degrees (default 0:60)")
    p.add_argument("--groups", action="store_true", help="also the AUC without and with each observable group")
    p.add_argument("--max-iter", type=int, default=150, help="boosting iterations of each classifier")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lo, hi = (float(v) for v in args.angles.split(":"))
    (ref, a_ref), (cand, a_cand) = _summaries(args.reference, lo, hi), _summaries(args.candidate, lo, hi)
    names = list(ref.observables)
    xr, xc, used = feature_matrices(ref.observables, cand.observables, names)
    x = np.vstack([np.column_stack([xr, np.log(ref.energies), a_ref]),
                   np.column_stack([xc, np.log(cand.energies), a_cand])])
    y = np.r_[np.zeros(len(xr)), np.ones(len(xc))]
    angle = np.r_[a_ref, a_cand]
    used = [*used, "log_e", "angle"]
    order = np.random.default_rng(args.seed).permutation(len(y))
    x, y, angle = x[order], y[order], angle[order]
    half = len(y) // 2

    def fit(cols: list[int]):
        clf = HistGradientBoostingClassifier(max_iter=args.max_iter, random_state=args.seed)
        return clf.fit(x[:half][:, cols], y[:half]).predict_proba(x[half:][:, cols])[:, 1]

    everything = list(range(len(used)))
    score = fit(everything)
    base = roc_auc_score(y[half:], score)
    print(f"{len(y) // 2} + {len(y) - len(y) // 2} showers, {len(used)} inputs: test AUC {base:.3f}")
    print("angle bin (deg)   showers   AUC")
    a_test = angle[half:]
    for b_lo, b_hi in zip(BINS[:-1], BINS[1:]):
        sel = (a_test >= b_lo) & (a_test < b_hi)
        if sel.sum() >= 50 and len(set(y[half:][sel])) == 2:
            auc = roc_auc_score(y[half:][sel], score[sel])
            print(f"{b_lo:5.0f} - {min(b_hi, 60):3.0f}        {sel.sum():6d}   {auc:.3f}")
    if args.groups:
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for j, name in enumerate(used[:-2]):
            groups[re.sub(r"_l\d+$", "", name)].append(j)
        cond_cols = [len(used) - 2, len(used) - 1]
        rows = []
        for g, cols in groups.items():
            without = roc_auc_score(y[half:], fit([c for c in everything if c not in cols]))
            alone = roc_auc_score(y[half:], fit(cols + cond_cols))
            rows.append((base - without, alone, g, len(cols)))
        print("group (columns)              AUC lost without it   AUC with it alone (+ log E, angle)")
        for lost, alone, g, k in sorted(rows, reverse=True):
            print(f"{g + f' ({k})':28s} {lost:+.3f}               {alone:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
