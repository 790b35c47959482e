"""Per-layer y-centroid bias of generated showers against Geant4, per angle bin: where along y a model puts each
layer's energy, measured from the shower axis (the impact point plus tan(angle) times the layer's depth).

A model's front layers are the most sensitive: their energy is mostly a wide halo, so a few hits far from the
axis move the centroid. Both files must hold the same conditions row by row (``generate --conditions-from``).

    python scripts/centroid_bias.py data/ild-gamma-test.h5 gen/v23-gamma.h5
    python scripts/centroid_bias.py data/ild-multi-test.h5 gen/v23-multi.h5 --layers 0,1,2,4,8,16,25
"""

from __future__ import annotations

import argparse

import numpy as np

from caloforge.dataset import ShowerFile

BINS = (0.0, 0.01, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.01)


def layer_centroid_y(showers: np.ndarray, n_layers: int, n_x: int, n_y: int, y_min_cells: float) -> np.ndarray:
    """Energy-weighted y centroid (n, L) in cells from y = 0 (NaN for empty layers)."""
    s = showers.reshape(len(showers), n_layers, n_x, n_y).sum(axis=2)  # (n, L, n_y)
    e = s.sum(axis=2)
    y = y_min_cells + 0.5 + np.arange(n_y)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s * y).sum(axis=2) / np.where(e > 0, e, np.nan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reference", help="Geant4 file")
    p.add_argument("candidate", help="generated file with the same conditions row by row")
    p.add_argument("--layers", default="0,1,2,4,8,16,25", help="comma-separated layers to print")
    args = p.parse_args(argv)
    layers = [int(v) for v in args.layers.split(",")]
    with ShowerFile(args.reference) as f:
        ref = f.read()
        det = f.detector
    with ShowerFile(args.candidate) as f:
        gen = f.read()
    if ref.showers.shape != gen.showers.shape or not np.allclose(ref.conditions.as_array(), gen.conditions.as_array()):
        raise SystemExit(f"{args.candidate}: expected the conditions of {args.reference} row by row "
                         f"(shape {ref.showers.shape}, got {gen.showers.shape})")
    n_l, n_x = det.n_layers, det.readout.n_x
    n_y = ref.showers.shape[1] // (n_l * n_x)
    cell = det.cell_size_mm
    y_min = det.readout.y_min_mm / cell
    c = ref.conditions
    axis = (c.y[:, None] + np.tan(np.radians(c.angle))[:, None] * det.layer_z_mm()[None, :]) / cell
    bias = {}
    for name, b in (("geant4", ref), ("model", gen)):
        bias[name] = layer_centroid_y(b.showers, n_l, n_x, n_y, y_min) - axis
    print(f"y centroid minus the axis (cells), model - Geant4 (+- its statistical error); layers {layers}")
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (c.angle >= lo) & (c.angle < hi)
        if sel.sum() < 20:
            continue
        d = np.nanmean(bias["model"][sel], 0) - np.nanmean(bias["geant4"][sel], 0)
        err = np.sqrt(np.nanvar(bias["model"][sel], 0) + np.nanvar(bias["geant4"][sel], 0)) / np.sqrt(sel.sum())
        label = "0" if hi <= 0.01 else f"{lo:g}-{min(hi, 60):g}"
        print(f"angle {label:>6} deg, n = {sel.sum():5d}: " + "  ".join(f"{d[k]:+.3f}±{err[k]:.3f}" for k in layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
