"""Pions with the Bertini placeholder: ms per shower and visible energy against electrons (e/pi), per detector.

    python scripts/bench_hadrons.py [--detectors ild-ecal,calogan-3layer] [-n 200] [--energy 20] [--workers 2]
        [--json reports/bench-hadrons.json]

Per detector, ``n`` pi+ and ``n`` e- at normal incidence on (0, 0) run in one Geant4 application with
``hadronic="bertini"`` (:mod:`caloforge.hadronic`; e- showers use the same EM processes as the plain EM list), in
chunks over ``workers`` processes. Reported: ms per shower (CPU time inside Geant4's BeamOn, start-up excluded),
visible energy / incident (energy in the stored cells), containment ((active + passive) / incident) and the
e/pi ratio of the mean visible energies; mean +- standard error. The pion figures come from a PLACEHOLDER
hadronic list (Bertini at all energies), not a validated hadronic reference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

_APP = {}


def _chunk(task: tuple) -> tuple[np.ndarray, float]:
    """One chunk in a worker process: (deposits per shower, CPU seconds); one Geant4 application per process."""
    name, pdg, energy_mev, n, seed = task
    from caloforge.conditions import Conditions
    from caloforge.detector import load_detector
    from caloforge.geant4_app import Geant4App

    if name not in _APP:
        _APP.clear()
        _APP[name] = Geant4App(load_detector(name), "pi+", deposits=True, hadronic="bertini")
        for code in (211, 11):  # physics tables are built on the first event of each particle: not timed
            _APP[name].simulate(Conditions.make(np.full(1, energy_mev), particle=code), seed=1)
    app = _APP[name]
    t0 = time.process_time()
    app.simulate(Conditions.make(np.full(n, energy_mev), particle=pdg), seed=seed)
    return app.last_deposits.copy(), time.process_time() - t0


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x)))


def bench(name: str, n: int, energy_gev: float, workers: int, chunk: int = 20) -> dict:
    e_mev = energy_gev * 1e3
    res: dict = {"detector": name, "energy_gev": energy_gev, "n": n, "workers": workers}
    with mp.get_context("spawn").Pool(workers) as pool:
        for particle, pdg in (("pi+", 211), ("e-", 11)):
            tasks = [(name, pdg, e_mev, min(chunk, n - k), 2000 + i) for i, k in enumerate(range(0, n, chunk))]
            parts = pool.map(_chunk, tasks, chunksize=1)
            dep = np.concatenate([p[0] for p in parts])
            visible = dep[:, 0] / e_mev
            res[particle] = {"ms_per_shower_cpu": sum(p[1] for p in parts) / n * 1e3,
                             "visible_over_incident": _mean_err(visible),
                             "resolution": float(np.std(visible) / np.mean(visible)),
                             "containment": _mean_err(dep.sum(axis=1) / e_mev)}
    (ve, se), (vp, sp) = res["e-"]["visible_over_incident"], res["pi+"]["visible_over_incident"]
    res["e_over_pi"] = (ve / vp, ve / vp * float(np.hypot(se / ve, sp / vp)))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detectors", default="ild-ecal,calogan-3layer")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--energy", type=float, default=20.0, help="GeV")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    rows = []
    print("| detector | particle | ms/shower (CPU) | visible / incident | resolution | containment | e/pi |")
    print("|---|---|---|---|---|---|---|")
    for name in args.detectors.split(","):
        r = bench(name, args.n, args.energy, args.workers)
        rows.append(r)
        for particle in ("pi+", "e-"):
            q = r[particle]
            (v, dv), (c, dc) = q["visible_over_incident"], q["containment"]
            ratio = f"{r['e_over_pi'][0]:.2f} +- {r['e_over_pi'][1]:.2f}" if particle == "pi+" else ""
            print(f"| `{name}` | {particle} {args.energy:g} GeV | {q['ms_per_shower_cpu']:.0f} | {v:.4f} +- {dv:.4f} | "
                  f"{q['resolution']:.2f} | {c:.3f} +- {dc:.3f} | {ratio} |", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
