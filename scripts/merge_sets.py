"""Concatenate caloforge shower files of one detector into one training file (streamed, file after file).

Files with the normal-incidence window (30 x 30 x 30 on ild-ecal) are widened to the angled window (30 x 30 x 60)
when any input has it: the angled window is the normal one extended towards +y, so the extra cells are zeros, as
Geant4 would have recorded them. Conditions (energy, angle, impact point, particle) travel with their rows. The
trainer draws its validation rows and batches at random, so the rows need no shuffling.

    python scripts/merge_sets.py -o data/ild-train-mixed.h5 data/ild-multi-train-19050.h5 data/ild-gamma-train-3000.h5
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from caloforge.dataset import ShowerFile, ShowerWriter


def widen(showers: np.ndarray, shape: tuple[int, int, int], to: tuple[int, int, int]) -> np.ndarray:
    """Showers of window ``shape`` placed into the larger window ``to`` (same layers and x; y extended)."""
    if shape == to:
        return showers
    n_l, n_x, n_y = shape
    if (n_l, n_x) != to[:2] or n_y > to[2]:
        raise ValueError(f"cannot place a {shape} window into {to}")
    out = np.zeros((len(showers), *to), np.float32)
    out[:, :, :, :n_y] = showers.reshape(-1, *shape)
    return out.reshape(len(showers), -1)


def union_specs(files: list[ShowerFile]) -> dict[str, str]:
    """energy_spec and angle_spec covering every input's (the trainer widens a model's range to them)."""
    from caloforge.conditions import parse_angle_spec, parse_energy_spec

    out = {}
    for attr, parse in (("energy_spec", parse_energy_spec), ("angle_spec", parse_angle_spec)):
        try:
            bounds = [parse(str(f.attrs[attr])).bounds for f in files]
        except (KeyError, ValueError):
            continue
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        scale = 1e3 if attr == "energy_spec" else 1.0  # the energy spec is in GeV, its bounds in MeV
        out[attr] = f"{lo / scale:g}:{hi / scale:g}" if hi > lo else f"{lo / scale:g}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    files = [ShowerFile(path) for path in args.inputs]
    det = files[0].detector
    if det is None or any(f.detector is None or f.detector.to_dict() != det.to_dict() for f in files):
        raise SystemExit("merge_sets: every input must be a caloforge file of the same detector")
    shapes = [det.shape_for_cells(f.n_cells) for f in files]
    target = max(shapes, key=lambda s: s[2])
    particles = sorted({p for f in files for p in f.conditions.particles})
    attrs = {"source": "geant4", "particle": ",".join(particles), "merged_from": ",".join(args.inputs)}
    attrs.update(union_specs(files))
    with ShowerWriter(args.output, det, int(np.prod(target)), attrs) as w:
        for f, shape in zip(files, shapes):
            for b in f.iter_batches(1000):
                w.append(b.conditions, widen(b.showers, shape, target))
    counts = [len(f) for f in files]
    for f in files:
        f.close()
    print(f"wrote {sum(counts)} showers ({', '.join(map(str, counts))}) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
