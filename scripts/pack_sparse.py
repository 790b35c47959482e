"""Rows [a, b) of a caloforge shower file rewritten in the sparse layout with gzip level 9 + shuffle, for carrying
training sets to a lent GPU machine within its 64 MiB (every caloforge reader takes the result).

    python scripts/pack_sparse.py data/ild-multi-train.h5 .gpu/multi.h5 0 8500              # lossless, ~2.5x smaller
    python scripts/pack_sparse.py data/ild-gamma-train.h5 .gpu/gamma.h5 0 14000 --drop-bits 10
    python scripts/pack_sparse.py data/ild-gamma-test.h5 .gpu/cond.h5 0 2000 --conditions-only

Lossless by default (conditions and showers read back identical: checked before the stop-19 run). ``--drop-bits N``
zeroes the N lowest of the 23 mantissa bits of each hit energy (relative change below 2^(N-23): 1.2e-4 for N = 10,
far below any shower fluctuation) so that gzip packs the energies 1.6x tighter. ``--conditions-only`` keeps the
conditions and no hits (a file for ``caloforge generate --conditions-from``).
"""
import argparse

import h5py
import numpy as np

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("src"), p.add_argument("dst"), p.add_argument("a", type=int), p.add_argument("b", type=int)
p.add_argument("--drop-bits", type=int, default=0, choices=range(0, 20), metavar="N")
p.add_argument("--conditions-only", action="store_true")
args = p.parse_args()
src, dst, a, b = args.src, args.dst, args.a, args.b
with h5py.File(src) as f, h5py.File(dst, "w") as g:
    for k, v in f.attrs.items():
        g.attrs[k] = v
    kw = dict(compression="gzip", compression_opts=9, shuffle=True)
    for k in ("incident_angles", "incident_energies", "incident_particles", "incident_positions"):
        g.create_dataset(k, data=f[k][a:b], chunks=True, maxshape=(None,) + f[k].shape[1:], **kw)
    n_rows = len(g["incident_energies"])
    if args.conditions_only:
        cells, vals, counts = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(n_rows, np.int64)
        n_cells = f["showers"].shape[1] if "showers" in f else int(f.attrs["n_cells"])
    elif "showers" in f:
        cells, vals, counts = [], [], []
        for i in range(a, b, 500):
            s = f["showers"][i:min(b, i + 500)]
            flat = np.flatnonzero(s)
            row = flat // s.shape[1]
            counts.append(np.bincount(row, minlength=len(s)))
            cells.append((flat - row * s.shape[1]).astype(np.int32))
            vals.append(s.reshape(-1)[flat])
        n_cells = f["showers"].shape[1]
        cells, vals, counts = np.concatenate(cells), np.concatenate(vals), np.concatenate(counts)
    else:
        off = f["hit_offsets"][a:b + 1]
        cells, vals = f["hit_cells"][off[0]:off[-1]], f["hit_energies"][off[0]:off[-1]]
        counts = np.diff(off)
        n_cells = int(f.attrs["n_cells"])
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    if args.drop_bits:
        vals = (vals.view(np.uint32) & np.uint32(0xFFFFFFFF ^ ((1 << args.drop_bits) - 1))).view(np.float32)
        g.attrs["packed_drop_bits"] = args.drop_bits
    g.create_dataset("hit_offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), chunks=True,
                     maxshape=(None,), **kw)
    g.create_dataset("hit_cells", data=cells, chunks=(1 << 15,), maxshape=(None,), **kw)
    g.create_dataset("hit_energies", data=vals, chunks=(1 << 15,), maxshape=(None,), **kw)
    g.attrs["layout"] = "sparse"
    g.attrs["n_cells"] = n_cells
    g.attrs["n_showers"] = b - a
    g.attrs["compression"] = "gzip"
print(dst, b - a, "rows")
