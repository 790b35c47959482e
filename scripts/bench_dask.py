"""Dask Geant4 production vs the process pool: wall time of each and whether the files are identical.

    python scripts/bench_dask.py -n 2000 --workers 2 --out data/bench-dask

runs ``caloforge simulate --energy 10:100 -n N --seed S`` twice (``nice -n 10``), once with the process pool and once
with ``--backend dask`` (a LocalCluster of the same number of worker processes), into OUT/pool.h5 and OUT/dask.h5,
then compares every dataset bit for bit, the attributes and the file bytes, and prints (and writes OUT/result.json)
the figures. ``--together`` runs the two at once (on a machine shared with other work: the same load for both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np


def _cmd(out: Path, args: argparse.Namespace, backend: str) -> list[str]:
    return ["nice", "-n", "10", sys.executable, "-m", "caloforge", "simulate", "--energy", args.energy, "-n",
            str(args.n), "--seed", str(args.seed), "--workers", str(args.workers), "--backend", backend, "-q",
            "--overwrite", "-o", str(out)]


def _run(out: Path, args: argparse.Namespace, backend: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(_cmd(out, args, backend), check=True)
    return time.perf_counter() - t0


def _run_together(out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Both runs at once: the same code (started together) and the same load on a shared machine."""
    t0 = time.perf_counter()
    procs = {b: subprocess.Popen(_cmd(out / f"{b}.h5", args, b)) for b in ("pool", "dask")}
    done: dict[str, float] = {}
    while len(done) < len(procs):
        for b, proc in procs.items():
            if b not in done and proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"{b} run failed ({proc.returncode})")
                done[b] = round(time.perf_counter() - t0, 1)
                print(f"{b}: {done[b]} s", flush=True)
        time.sleep(1)
    return done


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
    p.add_argument("--together", action="store_true",
                   help="run both at once (same code, same load: for a machine shared with other work)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"n": args.n, "energy": args.energy, "seed": args.seed, "workers": args.workers}
    if args.together:
        t = _run_together(out, args)
        res.update(pool_s=t["pool"], dask_s=t["dask"], together=True)
    else:
        res["pool_s"] = round(_run(out / "pool.h5", args, "pool"), 1)
        print(f"pool: {res['pool_s']} s", flush=True)
        res["dask_s"] = round(_run(out / "dask.h5", args, "dask"), 1)
        print(f"dask: {res['dask_s']} s", flush=True)
    res["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    res.update(_compare(out / "pool.h5", out / "dask.h5"))
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0 if res["same_datasets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
