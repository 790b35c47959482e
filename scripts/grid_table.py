"""Print the per-grid-point comparison of an evaluation as Markdown tables (for BENCHMARKS.md).

    python scripts/grid_table.py reports/grid-v12/metrics.json [LABEL]

One row per grid point: visible energy mu90 and its resolution sigma90/mu90 (relative difference to Geant4),
the mean reconstructed angle (difference in degrees) and the angular resolution (sigma90, relative difference),
the calibrated energy response; a star marks a flagged row. Then the label checks (reconstructed vs true impact
point and angle: slopes), Geant4 beside the candidate.
"""

from __future__ import annotations

import json
import sys


def _cell(row: dict | None, relative: bool, digits: int = 1) -> str:
    if row is None:
        return "-"
    star = " *" if row.get("flagged") else ""
    if relative:
        return f"{100 * (row['rel_diff'] or 0.0):+.{digits}f} %{star}"
    return f"{row['diff']:+.2f}{star}"


def main(path: str, label: str | None = None) -> None:
    results = json.loads(open(path).read())
    label = label or next(iter(results["candidates"]))
    cand = results["candidates"][label]
    rows = cand["grid"]["rows"]
    by_point: dict[str, dict] = {}
    for r in rows:
        by_point.setdefault(r["name"], {})[(r["quantity"], r["statistic"])] = r
    print(f"{label}: {cand['grid']['n_flagged']} of {cand['grid']['n_tests']} grid rows flagged (*)\n")
    print("| point | Geant4 mu90 (MeV) | mu90 | sigma90/mu90 | calibrated response | mean angle (deg) | "
          "Geant4 angle sigma90 (deg) | angle sigma90 | hits | CoG z |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, q in by_point.items():
        mu = q.get(("e_vis", "mu90"))
        ang = q.get(("angle", "sigma90"))
        print(f"| {name} | {mu['reference']:.1f} | {_cell(mu, True)} | {_cell(q.get(('e_vis', 'resolution')), True)} | "
              f"{_cell(q.get(('e_cal_response', 'mu90')), True)} | {_cell(q.get(('angle', 'mean')), False)} | "
              f"{ang['reference']:.2f} | {_cell(ang, True)} | {_cell(q.get(('n_hits', 'mean')), True)} | "
              f"{_cell(q.get(('cog_z', 'mean')), False)} |")
    print("\n| label check | statistic | Geant4 | " + label + " | difference |")
    print("|---|---|---|---|---|")
    for r in cand["labels"]["rows"]:
        ref, c = r["reference"], r["candidate"]
        rel = f"{100 * r['rel_diff']:+.1f} %" if r.get("rel_diff") is not None else f"{r['diff']:+.3f}"
        print(f"| {r['label']} | {r['statistic']} | {ref:.3f} | {c:.3f} | {rel}{' *' if r.get('flagged') else ''} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
