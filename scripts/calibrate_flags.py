#!/usr/bin/env python
"""Calibrate the flag rule (caloforge.flags): false flags on reference-vs-reference, flags on known deformations.

    python scripts/calibrate_flags.py data/ild-gamma-test.h5                    # all showers, defaults below
    python scripts/calibrate_flags.py SHOWERS.h5 --n 2000 --null-trials 20 --trials 10 --workers 2 --json out.json

The file (any caloforge shower file with a detector, e.g. Geant4) is summarised once as it is, and once per
deformation. Each trial draws a random split of its showers into two disjoint halves A and B (N/2 each) and runs
every test of ``caloforge.metrics.compare_summaries`` with the report's rule (observables, profiles, correlations,
FPD, KPD, energy response; not the classifiers, whose null spread is analytic):

* null: A against B, both undeformed. A comparison with any flag is a false flag; the rule promises that at most
  5 % of comparisons have one (family-wise level 5 %). Printed with a 95 % Clopper-Pearson interval.
* power: A (undeformed) against B deformed, for each deformation; the fraction of comparisons with at least one
  flag, and the tests flagged most often:

  - ``energy``: every cell times ``--energy-scale`` (1.02);
  - ``lateral``: the transverse cell positions stretched by ``--lateral-scale`` (1.05) about the mean shower
    axis of each layer (the centroid of the layer's mean image): the deformed half is summarised with a readout
    whose cells sit at x' = c + 1.05 (x - c), y' likewise. Every shower is then exactly 5 % wider (centroid
    offsets, widths and mean radius all x 1.05) with its cells, energies and hits unchanged. Resampling the
    stretched showers onto the fixed 5 mm grid instead would either split cells (more, smaller hits) or move whole
    cells by a full cell with a small probability (a few showers much wider), both artefacts that the hit and
    centroid tests would flag on their own. The radial profile is binned in fractions of the readout width, which
    stretches too, so it does not see this deformation: the power measured is a lower bound;
  - ``layer``: the cells of one layer (``--layer``, default the layer with the most mean energy) times
    ``--layer-scale`` (1.10): one layer's energy shifted against its neighbours.

The energy and layer deformations act on the cells, before the threshold, so every observable sees them as it
would see a model's error. The two halves of one trial hold different showers, so a deformed half is not compared
with its own undeformed copy. Sizes: ``--n N`` uses N random showers of the file (comparisons of N/2 vs N/2,
metrics at matched size N/4). Results are printed, and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFORMATIONS = ("energy", "lateral", "layer")


# ---- deformations -----------------------------------------------------------------------------------------
class Deformer:
    """The deformations of one sample: cell arrays (N, n_cells) for ``energy`` and ``layer``, a geometry for
    ``lateral``; ``mean_image`` (n_cells,) gives each layer's mean shower axis and energy."""

    def __init__(self, geometry, mean_image: np.ndarray):
        self.layer_of = np.asarray(geometry.cell_layer)
        img = np.asarray(mean_image, float)
        n_l = int(self.layer_of.max()) + 1
        self.layer_energy = np.bincount(self.layer_of, img, n_l)
        safe = np.where(self.layer_energy > 0, self.layer_energy, 1.0)
        x, y = np.asarray(geometry.cell_x, float), np.asarray(geometry.cell_y, float)
        self.cx = np.where(self.layer_energy > 0, np.bincount(self.layer_of, img * x, n_l) / safe, x.mean())
        self.cy = np.where(self.layer_energy > 0, np.bincount(self.layer_of, img * y, n_l) / safe, y.mean())

    def energy(self, showers: np.ndarray, scale: float) -> np.ndarray:
        return showers * np.float32(scale)

    def layer(self, showers: np.ndarray, layer: int, scale: float) -> np.ndarray:
        return showers * np.where(self.layer_of == layer, np.float32(scale), np.float32(1.0))

    def lateral_geometry(self, geometry, scale: float):
        """The readout with every cell's transverse position stretched by ``scale`` about the mean shower axis of
        its layer: x -> c + scale (x - c). Summarised with it, every shower is ``scale`` times wider about that
        axis, exactly, with its cells, energies and hits unchanged."""
        from caloforge.observables import CellGeometry

        x, y = np.asarray(geometry.cell_x, float), np.asarray(geometry.cell_y, float)
        layer = np.asarray(geometry.cell_layer)
        cx, cy = self.cx[layer], self.cy[layer]
        return CellGeometry(cx + scale * (x - cx), cy + scale * (y - cy), layer, np.asarray(geometry.layer_z, float),
                            np.asarray(geometry.layer_weights, float), f"{getattr(geometry, 'name', '')}-stretched")


# ---- one comparison ---------------------------------------------------------------------------------------
_STATE: dict = {}


def _trial(job: tuple[str, int]) -> dict:
    """Compare half A (undeformed) with half B of the sample ``name`` (undeformed for 'null') for one split."""
    from caloforge.metrics import compare_summaries

    name, t = job
    base, other = _STATE["summaries"]["null"], _STATE["summaries"][name]
    seed = _STATE["seed"] * 100_003 + 7919 * t + (0 if name == "null" else 1 + DEFORMATIONS.index(name))
    perm = np.random.default_rng(seed).permutation(base.n)
    half = base.n // 2
    res = compare_summaries(base.subset(np.sort(perm[:half])), other.subset(np.sort(perm[half:2 * half])),
                            n_splits=_STATE["splits"], seed=seed, fpd_kpd=_STATE["fpd_kpd"])
    return {"sample": name, "trial": t, "n_flags": res["n_flags"], "n_tests": res["flag_rule"]["n_tests"],
            "flags": [f"{f['test']}:{f['name']}:{f['metric']}" for f in res["flags"]],
            "min_p_adjusted": min((f["p_adjusted"] for f in res["flags"]), default=float("nan"))}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of k successes in n."""
    a = (1 - level) / 2
    lo = stats.beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
    hi = stats.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def summarise_file(path: str, rows: np.ndarray, threshold: float, deform=None, geometry=None, batch: int = 500,
                   cache: Path | None = None):
    """Summary of ``rows`` of a file, with the cells passed through ``deform`` and the readout through ``geometry``
    (functions, optional), and the file's readout geometry; kept in (and read back from) the pickle ``cache``."""
    import pickle

    from caloforge.dataset import ShowerFile

    if cache is not None and cache.exists():
        return pickle.loads(cache.read_bytes())
    from caloforge.evaluate import geometry_for
    from caloforge.observables import summarise

    with ShowerFile(path) as f:
        geom = geometry_for(f)

        def batches():
            for i in range(0, len(rows), batch):
                b = f.read(index=rows[i:i + batch])
                showers = np.asarray(b.showers, np.float32)
                yield types.SimpleNamespace(energies=b.energies, angles=b.angles,
                                            showers=deform(showers) if deform else showers)

        out = summarise(batches(), geometry(geom) if geometry else geom, threshold_mev=threshold), geom
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="shower file (caloforge format with a detector), e.g. Geant4 showers")
    parser.add_argument("--n", type=int, help="use N random showers of the file (default: all)")
    parser.add_argument("--null-trials", type=int, default=20, help="reference-vs-reference splits (default 20)")
    parser.add_argument("--trials", type=int, default=10, help="splits per deformation (default 10)")
    parser.add_argument("--deformations", default=",".join(DEFORMATIONS),
                        help=f"comma-separated subset of {','.join(DEFORMATIONS)}, or 'none'")
    parser.add_argument("--energy-scale", type=float, default=1.02)
    parser.add_argument("--lateral-scale", type=float, default=1.05)
    parser.add_argument("--layer", type=int, help="layer of the 'layer' deformation (default: most mean energy)")
    parser.add_argument("--layer-scale", type=float, default=1.10)
    parser.add_argument("--splits", type=int, default=10, help="half-splits per comparison (evaluate's --splits)")
    parser.add_argument("--no-fpd-kpd", action="store_true", help="leave FPD and KPD out (faster)")
    parser.add_argument("--threshold-mev", type=float, default=0.075)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="parallel comparisons (processes, default 1)")
    parser.add_argument("--json", help="write every trial's result here")
    parser.add_argument("--cache", help="directory keeping the summaries between runs (pickles; keyed by the file, "
                                        "--n, --seed, the threshold and each deformation's setting)")
    args = parser.parse_args(argv)

    from caloforge.dataset import ShowerFile
    from caloforge.flags import ALPHA, rule_sentence

    t0 = time.time()
    names = [] if args.deformations == "none" else [d.strip() for d in args.deformations.split(",") if d.strip()]
    unknown = set(names) - set(DEFORMATIONS)
    if unknown:
        parser.error(f"unknown deformation(s) {sorted(unknown)}; choose from {', '.join(DEFORMATIONS)}")
    with ShowerFile(args.file) as f:
        n_file = len(f)
    rng = np.random.default_rng(args.seed)
    n = min(args.n or n_file, n_file)
    if n < 8:
        parser.error(f"{args.file}: {n} showers; need at least 8")
    rows = np.sort(rng.choice(n_file, n, replace=False))
    def cache(tag: str) -> Path | None:
        if not args.cache:
            return None
        st = Path(args.file).stat()
        key = f"{Path(args.file).name}-{st.st_size}-{int(st.st_mtime)}-n{n}-s{args.seed}-t{args.threshold_mev:g}-{tag}"
        return Path(args.cache) / f"{key}.pkl"

    base, geom = summarise_file(args.file, rows, args.threshold_mev, cache=cache("base"))
    summaries = {"null": base}
    settings = {}
    if names:
        deformer = Deformer(geom, base.mean_image())
        layer = int(np.argmax(deformer.layer_energy)) if args.layer is None else args.layer
        how = {"energy": ({"deform": lambda s: deformer.energy(s, args.energy_scale)},
                          f"cells x {args.energy_scale:g}"),
               "lateral": ({"geometry": lambda g: deformer.lateral_geometry(g, args.lateral_scale)},
                           f"transverse positions x {args.lateral_scale:g} about the mean axis"),
               "layer": ({"deform": lambda s: deformer.layer(s, layer, args.layer_scale)},
                         f"layer {layer} x {args.layer_scale:g}")}
        for name in names:
            tag = {"energy": f"energy{args.energy_scale:g}", "lateral": f"lateralgeom{args.lateral_scale:g}",
                   "layer": f"layer{layer}x{args.layer_scale:g}"}[name]
            summaries[name] = summarise_file(args.file, rows, args.threshold_mev, cache=cache(tag),
                                             **how[name][0])[0]
            settings[name] = how[name][1]
            effect = {k: float(np.nanmean(summaries[name].observables[k]) / np.nanmean(base.observables[k]))
                      for k in ("e_vis", "r_mean", f"width_x_l{layer:02d}", f"frac_l{layer:02d}", "n_hits")
                      if k in base.observables}
            settings[name] += " (mean ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in effect.items()) + ")"
    print(f"{args.file}: {n} of {n_file} showers summarised ({1 + len(names)} versions) in {time.time() - t0:.0f} s; "
          f"comparisons {n // 2} vs {n // 2}, metrics at matched size {n // 4}")
    _STATE.update(summaries=summaries, seed=args.seed, splits=args.splits, fpd_kpd=not args.no_fpd_kpd)
    jobs = [("null", t) for t in range(args.null_trials)] + [(d, t) for d in names for t in range(args.trials)]
    results = []

    def progress(r: dict) -> None:
        results.append(r)
        print(f"  [{len(results)}/{len(jobs)}, {time.time() - t0:.0f} s] {r['sample']} #{r['trial']}: "
              f"{r['n_flags']} flags" + (f" ({', '.join(r['flags'][:4])})" if r["flags"] else ""), flush=True)

    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers) as pool:
            for r in pool.imap_unordered(_trial, jobs, chunksize=1):
                progress(r)
    else:
        for j in jobs:
            progress(_trial(j))

    print(f"rule: {rule_sentence(ALPHA)}")
    summary = {}
    for name in ["null"] + names:
        rs = [r for r in results if r["sample"] == name]
        if not rs:
            continue
        k = sum(r["n_flags"] > 0 for r in rs)
        lo, hi = clopper_pearson(k, len(rs))
        counts: dict[str, int] = {}
        for r in rs:
            for fl in r["flags"]:
                counts[fl] = counts.get(fl, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        what = "false-flag rate (any flag)" if name == "null" else f"flagged fraction ({settings[name]})"
        print(f"{name:8s} {what}: {k}/{len(rs)} = {k / len(rs):.2f} [95 % CI {lo:.2f}-{hi:.2f}]; "
              f"median flags {np.median([r['n_flags'] for r in rs]):.0f} of {rs[0]['n_tests']} tests")
        if top:
            print("         most often flagged: " + ", ".join(f"{t} ({c})" for t, c in top))
        summary[name] = {"comparisons": len(rs), "flagged": k, "fraction": k / len(rs), "ci95": [lo, hi],
                         "setting": settings.get(name, "A vs B, both undeformed"), "top_flags": top}
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": args.file, "n": n, "args": vars(args), "rule": rule_sentence(),
                                               "summary": summary, "trials": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
