"""Photon rows of a multi-particle shower file, as a shower file of their own (the trainer takes every row).

    python scripts/photon_subset.py data/ild-multi-train-11500.h5 data/ild-gamma-train-5750.h5
    python scripts/photon_subset.py data/ild-multi-grid.h5 data/ild-gamma-grid-60.h5 --per-point 60

All attributes are kept (``particle`` becomes "gamma", ``subset_of`` names the source); with ``--per-point N`` only
the first N photons of each (energy, angle) point (a grid file). Written to a temporary file and renamed.
"""

from __future__ import annotations

import argparse
import os

import h5py
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--per-point", type=int, default=0, help="first N photons of each (energy, angle) point")
    args = p.parse_args()
    with h5py.File(args.source) as f:
        part = f["incident_particles"][:, 0]
        keep = np.flatnonzero(part == 22)
        if args.per_point > 0:
            e, a = f["incident_energies"][:, 0], f["incident_angles"][:, 0]
            keep = np.sort(np.concatenate([
                np.flatnonzero((part == 22) & (e == ev) & (a == av))[:args.per_point]
                for ev in np.unique(e[keep]) for av in np.unique(a[keep])]))
        if len(keep) == 0:
            raise SystemExit(f"{args.source}: field 'incident_particles' holds no photons (PDG 22)")
        tmp = args.output + ".tmp"
        with h5py.File(tmp, "w") as g:
            for k, v in f.attrs.items():
                g.attrs[k] = v
            g.attrs["particle"] = "gamma"
            g.attrs["n_showers"] = len(keep)
            g.attrs["subset_of"] = f"{args.source} (photons" + (f", first {args.per_point} per point)"
                                                                 if args.per_point else ")")
            for k in f.keys():
                d = f[k]
                out = g.create_dataset(k, shape=(len(keep),) + d.shape[1:], dtype=d.dtype,
                                       chunks=(min(d.chunks[0], len(keep)),) + d.chunks[1:] if d.chunks else None,
                                       compression=d.compression)
                for i in range(0, len(keep), 500):
                    out[i:i + 500] = d[keep[i:i + 500]]
        os.replace(tmp, args.output)
    print(f"{args.output}: {len(keep)} photons of {args.source}")


if __name__ == "__main__":
    main()
