"""Every seed detector in Geant4: ms per shower, sampling fraction and containment at one energy, and the sample.

    python scripts/bench_detectors.py [--detectors calogan-3layer,...] [-n 1000] [--energy 50] [--workers 2]
        [--out-dir data/bench-detectors] [--json reports/bench-detectors.json]

Per detector, ``n`` showers of its seed's particle at normal incidence (in chunks over ``workers`` processes) are
written to ``OUT_DIR/NAME-EGeV.h5`` (a regular shower file: evaluate its halves against each other) and
summarised: ms per shower (CPU time inside Geant4's BeamOn per shower, start-up excluded), the sampling fraction
(active / (active + passive) energy per shower), the containment ((active + passive) / incident) and the share
of the active energy inside the stored cells; mean +- standard error of the mean.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

#: the seed's particle and impact point per detector (clic-ecal: the centre of its central cell)
SEEDS = {"calogan-3layer": ("e+", (0.0, 0.0)), "atlas-4layer": ("gamma", (0.0, 0.0)),
         "hgcal-proto": ("e-", (0.0, 0.0)), "clic-ecal": ("e-", (2.5, 2.5)), "cc-ds2": ("e-", (0.0, 0.0)),
         "ild-ecal": ("gamma", (0.0, 0.0))}
_APP = {}


def _chunk(task: tuple) -> tuple[np.ndarray, np.ndarray, float]:
    """One chunk in a worker process (one Geant4 application per process, built on first use)."""
    name, pdg, energy_mev, pos, n, seed = task
    from caloforge.conditions import Conditions
    from caloforge.detector import load_detector
    from caloforge.geant4_app import Geant4App

    if name not in _APP:
        _APP.clear()
        _APP[name] = Geant4App(load_detector(name), deposits=True)
    app = _APP[name]
    cond = Conditions.make(np.full(n, energy_mev), 0.0, np.tile(pos, (n, 1)), pdg)
    t0 = time.process_time()
    showers = app.simulate(cond, seed=seed)
    return showers, app.last_deposits, time.process_time() - t0


def bench(name: str, n: int, energy_gev: float, workers: int, out_dir: Path, chunk: int = 25) -> dict:
    from caloforge.conditions import PARTICLE_PDG, Conditions
    from caloforge.dataset import ShowerWriter
    from caloforge.detector import load_detector

    det = load_detector(name)
    particle, pos = SEEDS.get(name, ("e-", (0.0, 0.0)))
    pdg, e_mev = PARTICLE_PDG[particle], energy_gev * 1e3
    tasks = [(name, pdg, e_mev, pos, min(chunk, n - k), 1000 + i) for i, k in enumerate(range(0, n, chunk))]
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(workers) as pool:
        parts = pool.map(_chunk, tasks, chunksize=1)
    wall = time.perf_counter() - t0
    showers = np.concatenate([p[0] for p in parts])
    dep = np.concatenate([p[1] for p in parts])
    cpu = sum(p[2] for p in parts)
    out = out_dir / f"{name}-{energy_gev:g}GeV.h5"
    out.parent.mkdir(parents=True, exist_ok=True)
    attrs = {"source": "geant4", "particle": particle, "energy_spec": f"{energy_gev:g}", "angle_spec": "0",
             "position_spec": f"{pos[0]:g},{pos[1]:g}", "seed": 1000}
    with ShowerWriter(out, det, showers.shape[1], attrs) as w:
        w.append(Conditions.make(np.full(n, e_mev), 0.0, np.tile(pos, (n, 1)), pdg), showers)
    active = dep[:, 0] + dep[:, 1]
    total = active + dep[:, 2]

    def mean_err(x: np.ndarray) -> tuple[float, float]:
        return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x)))

    res = {"detector": name, "particle": particle, "energy_gev": energy_gev, "n": n, "file": str(out),
           "ms_per_shower_cpu": cpu / n * 1e3, "wall_s": wall, "workers": workers,
           "sampling_fraction": mean_err(active / total), "containment": mean_err(total / e_mev),
           "in_cells": mean_err(dep[:, 0] / active), "visible_over_incident": mean_err(dep[:, 0] / e_mev)}
    mip = np.array([ly.mip_sampling_fraction() for ly in det.layers])
    res["mip_sampling_fraction_range"] = [float(mip.min()), float(mip.max())]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detectors", default="calogan-3layer,atlas-4layer,hgcal-proto,clic-ecal,cc-ds2")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--energy", type=float, default=50.0, help="GeV")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-dir", default="data/bench-detectors")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    rows = []
    print("| detector | particle | showers | ms/shower (CPU) | sampling fraction | containment | in stored cells |")
    print("|---|---|---|---|---|---|---|")
    for name in args.detectors.split(","):
        r = bench(name, args.n, args.energy, args.workers, Path(args.out_dir))
        rows.append(r)
        sf, ct, ic = r["sampling_fraction"], r["containment"], r["in_cells"]
        print(f"| `{name}` | {r['particle']} {args.energy:g} GeV | {r['n']} | {r['ms_per_shower_cpu']:.0f} | "
              f"{sf[0]:.4f} +- {sf[1]:.4f} | {ct[0]:.4f} +- {ct[1]:.4f} | {ic[0]:.4f} +- {ic[1]:.4f} |", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
