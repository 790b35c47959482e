"""A few shower features per file, Geant4 beside models, on the first N showers (default 1000): hits above the
evaluator's 0.075 MeV threshold, visible over incident energy (mean +- spread), the mean hottest cell, the x and
depth centroids in cells and layers (mean +- spread), and the nonzero cells per shower in bins of cell energy
(first 300 showers). A quick look before a full ``caloforge evaluate``; any caloforge shower file (dense or sparse).

    python scripts/shower_summary.py data/ild-gamma-test.h5 gen/s26/gen-cfm-m16.h5 [more files] [--n 1000]
"""

from __future__ import annotations

import argparse

import numpy as np

from caloforge.dataset import ShowerFile

BINS_MEV = [0, 0.005, 0.02, 0.075, 0.15, 0.3, 1, 5, np.inf]


def load(path: str, n: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    with ShowerFile(path) as f:
        b = f.read(0, min(n, len(f.energies)))
        return (np.asarray(b.showers, dtype=np.float64), np.asarray(f.energies[:len(b.showers)]).ravel() * 1.0,
                tuple(f.shape))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args(argv)
    print(f"{'file':28s} {'hits':>6s} {'vis/E':>16s} {'hottest':>8s} {'x centroid':>16s} {'depth centroid':>15s}")
    spectra = []
    for path in args.files:
        s, e, shape = load(path, args.n)
        s3 = s.reshape(len(s), *shape)  # (n, layers, x, y)
        layers, xs = s3.sum((2, 3)), s3.sum((1, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (xs * (np.arange(shape[1]) + 0.5)).sum(1) / xs.sum(1)
            cz = (layers * (np.arange(shape[0]) + 0.5)).sum(1) / layers.sum(1)
        vis = s.sum(1) / e
        name = path.split("/")[-1]
        print(f"{name:28s} {(s > 0.075).sum(1).mean():6.0f} {vis.mean():8.4f}+-{vis.std():.4f} "
              f"{s.max(1).mean():8.1f} {np.nanmean(cx):8.3f}+-{np.nanstd(cx):.3f} "
              f"{np.nanmean(cz):7.2f}+-{np.nanstd(cz):.2f}")
        spectra.append((name, np.histogram(s[:300][s[:300] > 0], BINS_MEV)[0] / min(len(s), 300)))
    edges = " | ".join(f"{a:g}-{b:g}" for a, b in zip(BINS_MEV, BINS_MEV[1:]))
    print(f"nonzero cells per shower in bins of MeV: {edges}")
    for name, h in spectra:
        print(f"{name:28s} " + " ".join(f"{x:7.0f}" for x in h))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
