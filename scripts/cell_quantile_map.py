"""Experiment (stop 26): map a model's cell energies onto Geant4's cell-energy law, layer by layer, by quantiles.

The map is fitted on showers at TRAINING conditions only (a model's sample at the first N rows of its training file,
against Geant4's showers of that file), per layer and per incident-energy bin (10-40, 40-70, 70-100 GeV), over all
cells of the layer (empty ones included): e -> Q_geant4(F_model(e)), empty cells stay empty. It is then applied to a
sample at other conditions (for example the test set's), and each layer is rescaled to its original sum, as the
cfm decoder does. A post-hoc version of BIB-AE's post-processor, to tell whether the marginal cell spectrum is what
separates a model from Geant4 (for the stop-26 cfm it was not: BENCHMARKS.md).

    python scripts/cell_quantile_map.py --fit-model gen/s26/cfm-train600.h5 --fit-geant4 data/ild-gamma-train.h5 \
        gen/s26/gen-cfm-m16.h5 -o gen/s26/cfm-m16-qmap.h5
"""

from __future__ import annotations

import argparse

import numpy as np

from caloforge.dataset import ShowerFile, ShowerWriter

E_BINS_MEV = np.array([0.0, 40e3, 70e3, np.inf])
N_QUANTILES = 4000


def read(path: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray, ShowerFile]:
    f = ShowerFile(path)
    b = f.read(0, n)
    n_layers = f.shape[0]
    return np.asarray(b.showers, np.float32).reshape(len(b.showers), n_layers, -1), np.asarray(
        f.energies[:len(b.showers)]).ravel(), f


def quantile_tables(showers: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """(energy bins, layers, N_QUANTILES) quantiles of the cell energies of each layer, empty cells included."""
    q = np.linspace(0, 1, N_QUANTILES)
    out = np.zeros((len(E_BINS_MEV) - 1, showers.shape[1], N_QUANTILES), np.float32)
    for b in range(len(E_BINS_MEV) - 1):
        rows = (energies >= E_BINS_MEV[b]) & (energies < E_BINS_MEV[b + 1])
        if not rows.any():
            lo, hi = E_BINS_MEV[b] / 1e3, E_BINS_MEV[b + 1] / 1e3
            raise SystemExit(f"no fitting showers in the energy bin {lo:g}-{hi:g} GeV")
        for layer in range(showers.shape[1]):
            out[b, layer] = np.quantile(showers[rows, layer].ravel(), q)
    return out


def apply_map(showers: np.ndarray, energies: np.ndarray, model_q: np.ndarray, ref_q: np.ndarray) -> np.ndarray:
    q = np.linspace(0, 1, N_QUANTILES)
    out = np.zeros_like(showers)
    for b in range(len(E_BINS_MEV) - 1):
        rows = (energies >= E_BINS_MEV[b]) & (energies < E_BINS_MEV[b + 1])
        for layer in range(showers.shape[1]):
            x = showers[rows, layer]
            y = np.interp(np.interp(x, model_q[b, layer], q), q, ref_q[b, layer])
            out[rows, layer] = np.where(x > 0, y, 0.0)
    before, after = showers.sum(2, keepdims=True), out.sum(2, keepdims=True)
    return np.where(after > 0, out * before / np.maximum(after, 1e-12), 0.0).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sample", help="the model's showers to map (any caloforge shower file)")
    p.add_argument("--fit-model", required=True, help="the model's showers at training conditions")
    p.add_argument("--fit-geant4", required=True, help="Geant4 showers at training conditions (the training file)")
    p.add_argument("--n-geant4", type=int, default=3000, help="first rows of --fit-geant4 to use (default 3000)")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    gen, e_gen, _ = read(args.fit_model)
    g4, e_g4, _ = read(args.fit_geant4, args.n_geant4)
    model_q, ref_q = quantile_tables(gen, e_gen), quantile_tables(g4, e_g4)
    showers, energies, f = read(args.sample)
    mapped = apply_map(showers, energies, model_q, ref_q).reshape(len(showers), -1)
    attrs = {"source": "model+quantile-map", "quantile_map_fit": args.fit_model, "mapped_from": args.sample}
    with ShowerWriter(args.output, f.detector, f.n_cells, attrs=attrs, layout="sparse") as w:
        w.append(f.conditions, mapped)
    print(f"wrote {len(mapped)} mapped showers to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
