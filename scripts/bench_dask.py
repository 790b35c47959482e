"""Dask Geant4 production vs the process pool: wall time of each and whether the files are identical.

    python scripts/bench_dask.py -n 2000 --workers 2 --out data/bench-dask

runs ``caloforge simulate --energy 10:100 -n N --seed S`` twice (``nice -n 10``), once with the process pool and once
with ``--backend dask`` (a LocalCluster of the same number of worker processes), into OUT/pool.h5 and OUT/dask.h5,
then compares every dataset bit for bit, the attributes and the file bytes, and prints (and writes OUT/result.json)
the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np


def _run(out: Path, args: argparse.Namespace, backend: str) -> float:
    cmd = ["nice", "-n", "10", sys.executable, "-m", "caloforge", "simulate", "--energy", args.energy, "-n",
           str(args.n), "--seed", str(args.seed), "--workers", str(args.workers), "--backend", backend, "-q",
           "--overwrite", "-o", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def _compare(a: Path, b: Path) -> dict:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        same_keys = sorted(fa) == sorted(fb)
        same_data = same_keys and all(np.array_equal(fa[k][()], fb[k][()]) and fa[k].dtype == fb[k].dtype
                                      for k in fa)
        same_attrs = {k: str(v) for k, v in fa.attrs.items()} == {k: str(v) for k, v in fb.attrs.items()}
        n = len(fa["incident_energies"])
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    return {"n_showers": n, "same_datasets": bool(same_data), "same_attributes": same_attrs,
            "same_bytes": sha[0] == sha[1], "sha256": sha[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--energy", default="10:100")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="data/bench-dask")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"n": args.n, "energy": args.energy, "seed": args.seed, "workers": args.workers}
    res["pool_s"] = round(_run(out / "pool.h5", args, "pool"), 1)
    print(f"pool: {res['pool_s']} s", flush=True)
    res["dask_s"] = round(_run(out / "dask.h5", args, "dask"), 1)
    print(f"dask: {res['dask_s']} s", flush=True)
    res.update(_compare(out / "pool.h5", out / "dask.h5"))
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0 if res["same_datasets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
