"""Print the headline numbers of a ``caloforge evaluate`` metrics.json as a Markdown table (for BENCHMARKS.md).

    python scripts/metrics_table.py reports/test/metrics.json [--observables e_ratio,n_hits,...]
"""

from __future__ import annotations

import argparse
import json

MAIN = ("e_ratio", "e_ratio_weighted", "n_hits", "hit_e_mean", "cog_x", "cog_y", "cog_z", "shower_depth",
        "shower_depth_width", "r_mean", "deepest_layer")


def _pm(d: dict, key: str = "value", err: str = "value_std", fmt: str = ".3f") -> str:
    return f"{d[key]:{fmt}} ± {d[err]:{fmt}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics")
    p.add_argument("--observables", default=",".join(MAIN))
    args = p.parse_args()
    r = json.loads(open(args.metrics).read())
    labels = list(r["candidates"])
    first = r["candidates"][labels[0]]
    print(f"reference: {r['reference']['path']} ({r['reference']['n_used']} showers); metrics at "
          f"{first['n_half']} vs {first['n_half']} showers over {first['n_splits']} random half-splits\n")
    print("| metric | floor (Geant4 vs Geant4) | " + " | ".join(labels) + " |")
    print("|---" * (2 + len(labels)) + "|")
    for key in ("low_level", "high_level"):
        cells = []
        for lab in labels:
            c = r["candidates"][lab].get("classifier", {}).get(key)
            cells.append(f"AUC {c['auc']:.3f}, JSD {c['jsd']:.3f}" if c else "-")
        null = first.get("classifier", {}).get(key, {}).get("auc_null_std", float("nan"))
        print(f"| classifier AUC ({key.replace('_', '-')}) | 0.5 ± {null:.3f} | " + " | ".join(cells) + " |")
    for key in ("fpd", "kpd"):
        f = first[key]
        cells = [_pm(r["candidates"][lab][key], err="error", fmt=".3g") for lab in labels]
        print(f"| {key.upper()} | {f['floor']:.3g} ± {f['floor_error']:.3g} | " + " | ".join(cells) + " |")
    corr = first["correlations"]
    cells = [_pm(r["candidates"][lab]["correlations"], fmt=".2f") for lab in labels]
    print(f"| Fisher-z chi2/ndf (correlations) | {corr['floor']:.2f} ± {corr['floor_std']:.2f} | "
          + " | ".join(cells) + " |")
    for name in args.observables.split(","):
        if name not in first["observables"]:
            continue
        sp = first["observables"][name]["separation_power"]
        cells = []
        for lab in labels:
            m = r["candidates"][lab]["observables"][name]["separation_power"]
            cells.append(f"{m['value']:.4f}" + (" (flag)" if m.get("flagged") else ""))
        print(f"| separation power: {name} | {sp['floor']:.4f} ± {sp['floor_std']:.4f} | " + " | ".join(cells) + " |")
    print("| flagged metrics (of all) | 0 expected | "
          + " | ".join(str(r["candidates"][lab]["n_flags"]) for lab in labels) + " |")


if __name__ == "__main__":
    main()
