"""How far one generated sample's evaluation figures move: N samples of a model at the conditions of a reference
file (generate seeds 1..N, or --seeds), each evaluated against that file with the same evaluator seed. Prints each
sample's headline figures and their mean and standard deviation (of one sample), and writes them to OUT/spread.json.

The evaluator's floors compare Geant4 with Geant4; they do not contain the candidate's own sampling noise, which is
as large (stop 30: AUC spreads of 0.012-0.018 for 5000 showers, BENCHMARKS.md). Compare candidates by these means.

    python scripts/sample_spread.py multi data/ild-gamma-test.h5 --seeds 1,2,3,4 -o reports/spread-multi
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from caloforge.cli import main as caloforge
from caloforge.evaluate import headline_figures

FIGURES = ("auc_low", "auc_high", "fpd", "flags")


def headline(metrics: dict, label: str) -> dict[str, float | None]:
    """The figures of :data:`FIGURES` of one candidate (:func:`caloforge.evaluate.headline_figures`)."""
    h = headline_figures(metrics, label)
    return {k: None if h[k] is None else float(h[k]) for k in FIGURES}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a run directory or a zoo name")
    p.add_argument("reference", help="held-out Geant4 file; the samples are made at its conditions")
    p.add_argument("--seeds", default="1,2,3", help="generate seeds, comma-separated (default 1,2,3)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--eval-seed", type=int, default=0, help="the evaluator's seed, the same for every sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-classifier", action="store_true")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        p.error("--seeds: at least two samples are needed for a spread")
    args.output.mkdir(parents=True, exist_ok=True)
    rows = {}
    for seed in seeds:
        sample, label = args.output / f"sample-s{seed}.h5", f"seed{seed}"
        if not sample.exists():  # a rerun keeps the samples it has (they are the same numbers)
            if caloforge(["generate", "--model", args.model, "--conditions-from", args.reference, "-o", str(sample),
                          "--seed", str(seed), "--threads", str(args.threads), "-q"]):
                raise SystemExit(f"sample_spread: generating {sample} failed")
        report = args.output / f"eval-s{seed}"
        if caloforge(["evaluate", "--reference", args.reference, "--candidate", str(sample), "--label", label,
                      "-o", str(report), "--seed", str(args.eval_seed), "-q"]
                     + (["--no-classifier"] if args.no_classifier else [])):
            raise SystemExit(f"sample_spread: evaluating {sample} failed")
        rows[label] = headline(json.loads((report / "metrics.json").read_text()), label)
    summary = {}
    for k in FIGURES:
        v = np.array([r[k] for r in rows.values() if r[k] is not None], float)
        if len(v) >= 2:
            summary[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "n": len(v)}
    out = {"model": args.model, "reference": args.reference, "eval_seed": args.eval_seed, "samples": rows,
           "summary": summary}
    (args.output / "spread.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| sample | " + " | ".join(FIGURES) + " |\n" + "|---" * (len(FIGURES) + 1) + "|")
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for k in FIGURES) + " |")
    print("| mean ± std | " + " | ".join(f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}" if k in summary
                                         else "-" for k in FIGURES) + " |")
    return out


if __name__ == "__main__":
    main()
