"""The seeds' shower-shape tables, Geant4 beside a model, for any per-layer readout (CaloGAN's table; the 89-cell
WGAN's per-layer comparisons).

CaloGAN (seeds/calogan-atlas-like.txt): layer energies E_i, total E_tot, fractions f_i, E_ratio,i (two hottest cells),
deepest layer d, shower depth s_d and its width sigma_sd (layer units), lateral widths sigma_i (here per axis, in
units of that layer's cells, as the seed). The 89-cell WGAN (seeds/wgan-89-cell-photon.txt): mean cell intensities
per layer, the average eta (x) and phi (y) per layer, the RMS in eta per layer, the total energy. Every quantity is
computed by :func:`caloforge.observables.compute_observables` after the evaluator's cell threshold, for each particle
in the files and for all rows; each row gives mean and standard deviation per sample, the difference of the means
in units of its standard error, and the KS distance (with its 5 % critical value).

    python scripts/shower_shapes.py --reference data/calogan-test.h5 --candidate gen/calogan-test.h5 \\
        --json reports/calogan/shower_shapes.json > reports/calogan/shower_shapes.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from caloforge.dataset import ShowerFile
from caloforge.observables import DEFAULT_THRESHOLD_MEV, apply_threshold, compute_observables


def _cell_sizes(detector) -> list[tuple[float, float]]:
    if detector.is_uniform:
        return [(detector.cell_size_mm, detector.cell_size_mm)] * detector.n_layers
    return [(ly.cells.cell_x_mm, ly.cells.cell_y_mm) if ly.cells.kind == "grid" else (math.nan, math.nan)
            for ly in detector.layers]


def shapes(path: str, threshold: float) -> tuple[dict[str, np.ndarray], np.ndarray, list[np.ndarray], object]:
    """Per-shower quantities of a file (name -> (N,)), the particle of each row, per-layer mean cell energies."""
    with ShowerFile(path) as f:
        b = f.read()
        det = f.detector
    showers = apply_threshold(np.asarray(b.showers, np.float64), threshold)
    obs = compute_observables(showers, b.conditions.energy, b.conditions.angle, det, threshold_mev=threshold)
    out: dict[str, np.ndarray] = {"E_tot [GeV]": obs["e_vis"] / 1e3}
    sizes = _cell_sizes(det)
    for i in range(det.n_layers):
        out[f"E_{i} [GeV]"] = obs[f"e_layer_l{i:02d}"] / 1e3
    for i in range(det.n_layers):
        out[f"f_{i}"] = obs[f"frac_l{i:02d}"]
    for i in range(det.n_layers):
        out[f"E_ratio,{i}"] = obs[f"eratio_l{i:02d}"]
    out["d (deepest layer)"] = obs["deepest_layer"]
    out["s_d [layers]"] = obs["shower_depth"]
    out["sigma_sd [layers]"] = obs["shower_depth_width"]
    for i, (cx, cy) in enumerate(sizes):
        out[f"sigma_{i},x (eta) [cells]"] = obs[f"width_x_l{i:02d}"] / cx
        out[f"sigma_{i},y (phi) [cells]"] = obs[f"width_y_l{i:02d}"] / cy
    for i in range(det.n_layers):
        out[f"<eta>_{i} [mm]"] = obs[f"cog_x_l{i:02d}"]
        out[f"<phi>_{i} [mm]"] = obs[f"cog_y_l{i:02d}"]
    offsets = det.layer_offsets()
    images = [showers[:, offsets[i]:offsets[i + 1]] for i in range(det.n_layers)]
    return out, np.asarray(b.conditions.particles), images, det


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name in ref:
        a, b = ref[name][np.isfinite(ref[name])], cand[name][np.isfinite(cand[name])]
        if len(a) < 2 or len(b) < 2:
            continue
        se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        rows.append({"quantity": name, "geant4_mean": float(a.mean()), "geant4_std": float(a.std(ddof=1)),
                     "model_mean": float(b.mean()), "model_std": float(b.std(ddof=1)),
                     "pull": float((b.mean() - a.mean()) / se) if se > 0 else 0.0, "ks": _ks(a, b),
                     "ks_crit": 1.358 * math.sqrt((len(a) + len(b)) / (len(a) * len(b))), "n": [len(a), len(b)]})
    return rows


def image_agreement(ref_images: list[np.ndarray], cand_images: list[np.ndarray]) -> list[float]:
    """Per layer: sum |mean cell (model) - mean cell (Geant4)| / sum mean cell (Geant4), the seed's mean-image check."""
    return [float(np.abs(c.mean(0) - r.mean(0)).sum() / max(r.mean(0).sum(), 1e-12))
            for r, c in zip(ref_images, cand_images)]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="Geant4 shower file")
    ap.add_argument("--candidate", required=True, help="model shower file (same detector)")
    ap.add_argument("--threshold-mev", type=float, default=DEFAULT_THRESHOLD_MEV)
    ap.add_argument("--json", help="write every number here too")
    args = ap.parse_args()
    ref, ref_p, ref_img, det = shapes(args.reference, args.threshold_mev)
    cand, cand_p, cand_img, det_c = shapes(args.candidate, args.threshold_mev)
    if det.to_dict() != det_c.to_dict():
        raise SystemExit(f"{args.candidate}: detector {det_c.name!r}; the reference has {det.name!r}")
    result = {"reference": args.reference, "candidate": args.candidate, "threshold_mev": args.threshold_mev,
              "detector": det.name, "groups": {}}
    groups = ["all"] + sorted(set(ref_p) & set(cand_p)) if len(set(ref_p)) > 1 else ["all"]
    for g in groups:
        mr = np.ones(len(ref_p), bool) if g == "all" else ref_p == g
        mc = np.ones(len(cand_p), bool) if g == "all" else cand_p == g
        rows = compare({k: v[mr] for k, v in ref.items()}, {k: v[mc] for k, v in cand.items()})
        img = image_agreement([x[mr] for x in ref_img], [x[mc] for x in cand_img])
        result["groups"][g] = {"rows": rows, "mean_image_l1": img}
        print(f"\n### {det.name}: {g} ({int(mr.sum())} Geant4, {int(mc.sum())} model showers)\n")
        print("| quantity | Geant4 mean | Geant4 std | model mean | model std | pull of means | KS (5 % crit.) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['quantity']} | {_fmt(r['geant4_mean'])} | {_fmt(r['geant4_std'])} | {_fmt(r['model_mean'])} "
                  f"| {_fmt(r['model_std'])} | {r['pull']:+.1f} | {r['ks']:.3f} ({r['ks_crit']:.3f}) |")
        print("\nmean cell image, sum |model - Geant4| / sum Geant4 per layer: "
              + ", ".join(f"layer {i} {v:.3f}" for i, v in enumerate(img)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
