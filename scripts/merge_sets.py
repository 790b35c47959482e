"""Concatenate caloforge shower files of one detector into one training file (streamed, file after file).

Files with the normal-incidence window (30 x 30 x 30 on ild-ecal) are widened to the angled window (30 x 30 x 60)
when any input has it: the angled window is the normal one extended towards +y, so the extra cells are zeros, as
Geant4 would have recorded them. Conditions (energy, angle, impact point, particle) travel with their rows. The
trainer draws its validation rows and batches at random, so the rows need no shuffling.

    python scripts/merge_sets.py -o data/ild-mixed-train.h5 data/ild-multi-train.h5 data/ild-gamma-train.h5:3000

An input written PATH:N contributes its first N showers.
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


def split_head(arg: str) -> tuple[str, int | None]:
    """'PATH:N' -> (PATH, N); a plain path -> (path, None)."""
    path, sep, n = arg.rpartition(":")
    return (path, int(n)) if sep and n.isdigit() else (arg, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    heads = [split_head(a) for a in args.inputs]
    files = [ShowerFile(path) for path, _ in heads]
    det = files[0].detector
    if det is None or any(f.detector is None or f.detector.to_dict() != det.to_dict() for f in files):
        raise SystemExit("merge_sets: every input must be a caloforge file of the same detector")
    shapes = [det.shape_for_cells(f.n_cells) for f in files]
    target = max(shapes, key=lambda s: s[2])
    particles = sorted({p for f in files for p in f.conditions.particles})
    attrs = {"source": "geant4", "particle": ",".join(particles), "merged_from": ",".join(args.inputs)}
    attrs.update(union_specs(files))
    counts = [len(f) if n is None else min(n, len(f)) for f, (_, n) in zip(files, heads)]
    with ShowerWriter(args.output, det, int(np.prod(target)), attrs) as w:
        for f, shape, count in zip(files, shapes, counts):
            done = 0
            for b in f.iter_batches(1000):
                take = min(len(b), count - done)
                if take <= 0:
                    break
                w.append(b.conditions[:take], widen(b.showers[:take], shape, target))
                done += take
    for f in files:
        f.close()
    print(f"wrote {sum(counts)} showers ({', '.join(map(str, counts))}) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
