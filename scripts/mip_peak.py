"""The MIP peak of the cell-energy spectrum, Geant4 beside a model (the BIB-AE talk's "cell energy" check).

For each file: the mode of the cell-energy density dN/dE between 0.05 and 1 MeV (log bins, 40 per decade; a
single minimum-ionising particle leaves about 0.15 MeV in 0.5 mm of silicon, more at an angle), the edge of the MIP
peak as the ratio of cells per log bin at 0.2 MeV to those at 0.1 MeV (Geant4 photons: about 2.4; a spectrum
without the peak rises smoothly), the fraction of cells above 0.01 MeV in the MIP window 0.1-0.3 MeV, the fraction
below the evaluator's 0.075 MeV threshold, and the mean number of cells above the threshold per shower. The peak is
"present" when the density's mode lies in 0.1-0.3 MeV and the edge ratio exceeds 1.5.

    python scripts/mip_peak.py data/ild-gamma-grid-60.h5 gen/bibae-grid.h5 [more candidates]
"""

from __future__ import annotations

import sys

import numpy as np

from caloforge.dataset import ShowerFile
from caloforge.observables import DEFAULT_THRESHOLD_MEV

EDGES = np.logspace(np.log10(0.01), 1.0, 3 * 40 + 1)  # MeV


def spectrum(path: str) -> tuple[np.ndarray, int, float]:
    """Histogram of cell energies (cells per shower per bin) above 0.01 MeV, the number of showers, hits/shower."""
    with ShowerFile(path) as f:
        showers = np.asarray(f.read().showers, np.float64)
    values = showers[showers > 0]
    counts, _ = np.histogram(values, EDGES)
    return counts / len(showers), len(showers), float((showers > DEFAULT_THRESHOLD_MEV).sum() / len(showers))


def describe(path: str) -> str:
    h, n, hits = spectrum(path)
    centres = np.sqrt(EDGES[1:] * EDGES[:-1])
    density = h / np.diff(EDGES)
    window = (centres > 0.05) & (centres < 1.0)
    mode = float(centres[np.flatnonzero(window)[np.argmax(density[window])]]) if h[window].sum() else float("nan")
    at = lambda e: h[int(np.argmin(np.abs(np.log(centres / e))))]  # noqa: E731
    edge = at(0.2) / at(0.1) if at(0.1) > 0 else float("nan")
    present = 0.1 <= mode <= 0.3 and edge > 1.5
    total = h.sum()
    mip = h[(centres > 0.1) & (centres < 0.3)].sum() / total if total else float("nan")
    low = h[centres < DEFAULT_THRESHOLD_MEV].sum() / total if total else float("nan")
    return (f"| {path} | {n} | {mode:.3f} | {edge:.2f} | {'yes' if present else 'no'} | {100 * mip:.1f} % | "
            f"{100 * low:.1f} % | {hits:.0f} |")


def main(paths: list[str]) -> None:
    print("| file | showers | dN/dE mode 0.05-1 MeV (MeV) | edge (0.2 / 0.1 MeV) | MIP peak | cells in 0.1-0.3 MeV | "
          "cells < 0.075 MeV | hits > 0.075 MeV per shower |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        print(describe(p))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
