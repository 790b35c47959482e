"""The statistical floor of the evaluation on each detector: two halves of one Geant4 sample against each other.

    python scripts/halves_floor.py data/bench-detectors/*.h5 [-o reports/halves] [--json reports/halves.json]

Rows 0, 2, 4, ... against rows 1, 3, 5, ...: the same physics, so every classifier AUC must be 0.5 within its
statistical spread (target 0.5 +- 0.03) and the metrics should raise no more flags than their false-flag rate.
The report is made in the readout's own geometry (whatever its cells), like ``caloforge evaluate``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def halves(path: Path, tmp: Path) -> tuple[Path, Path]:
    from caloforge.dataset import ShowerFile, ShowerWriter

    out = []
    with ShowerFile(path) as f:
        b = f.read(0, len(f))
        for k in (0, 1):
            rows = np.arange(k, len(f), 2)
            p = tmp / f"{path.stem}-half{k}.h5"
            with ShowerWriter(p, f.detector, f.n_cells, {"source": f.attrs.get("source", "geant4")}) as w:
                w.append(b.conditions[rows], b.showers[rows])
            out.append(p)
    return out[0], out[1]


def main() -> None:
    from caloforge.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", default="reports/halves")
    p.add_argument("--json")
    p.add_argument("--threshold-mev", type=float, default=0.075)
    args = p.parse_args()
    rows = []
    print("| detector | showers per half | low-level AUC | high-level AUC | flags / metrics |")
    print("|---|---|---|---|---|")
    for f in map(Path, args.files):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = halves(f, Path(tmp))
            res = evaluate(str(a), [("half1", str(b))], Path(args.output) / f.stem, reference_label="half0",
                           threshold_mev=args.threshold_mev, seed=0, log=lambda *x, **k: None)
        c = res["candidates"]["half1"]
        cl = c.get("classifier", {})
        auc = {k: (v["auc"], v["auc_null_std"]) for k, v in cl.items()}
        n_tests = c.get("flag_rule", {}).get("n_tests", "?")
        row = {"file": str(f), "detector": res.get("reference", {}).get("detector") or f.stem,
               "n_half": c.get("n_total"), "auc": auc, "n_flags": c["n_flags"], "n_tests": n_tests}
        rows.append(row)
        fmt = {k: f"{v[0]:.3f} (null sd {v[1]:.3f})" for k, v in auc.items()}
        print(f"| `{f.stem}` | {row['n_half']} | {fmt.get('low_level', '-')} | {fmt.get('high_level', '-')} | "
              f"{row['n_flags']} / {n_tests} |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
