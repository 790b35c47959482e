"""Full against fast simulation of the same events in the same Geant4 application (the Par04 comparison).

One Geant4 application with the fast-simulation gate: the events run once with fast simulation off (every particle
tracked by Geant4) and once on (e/gamma the model takes get its shower), same conditions, same Geant4 seed. Prints
ms per event for each and their ratio, per event kind, and writes the single-particle events of both runs as shower
files for ``caloforge evaluate``:

    python scripts/bench_fastsim.py --model multi -n 200 --out data/fastsim-bench
    caloforge generate --model multi --conditions-from data/fastsim-bench/full.h5 -o data/fastsim-bench/model.h5
    caloforge evaluate data/fastsim-bench/fast.h5 data/fastsim-bench/model.h5 \
        --reference data/fastsim-bench/full.h5 -o reports/fastsim
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="multi")
    p.add_argument("-n", type=int, default=100, help="single-photon events (50 GeV); also written as files")
    p.add_argument("--spray", type=int, default=20, help="events of 3 photons/electrons (10-50 GeV, 0-30 deg)")
    p.add_argument("--energy", type=float, default=50.0, help="GeV of the single-photon events")
    p.add_argument("--out", help="directory for full.h5 and fast.h5 (single-photon events)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from caloforge.conditions import Conditions
    from caloforge.dataset import ShowerWriter
    from caloforge.detector import load_detector
    from caloforge.fastsim import FastSim
    from caloforge.geant4_app import Geant4App, geant4_version

    det = load_detector("ild-ecal")
    fs = FastSim.load(args.model, det, seed=args.seed)
    app = Geant4App(det, fastsim=fs)
    rng = np.random.default_rng(args.seed)
    cell = det.cell_size_mm
    kinds = {
        "photon": (Conditions(np.full(args.n, args.energy * 1e3), 0.0, rng.uniform(0, cell, args.n),
                              rng.uniform(0, cell, args.n), 22), 1, False),
        "spray": (Conditions(rng.uniform(10e3, 50e3, 3 * args.spray), rng.uniform(0, 30, 3 * args.spray),
                             rng.uniform(-40, 40, 3 * args.spray), rng.uniform(-50, 10, 3 * args.spray),
                             rng.choice([22, 11], 3 * args.spray)), 3, True),
    }
    app.simulate(kinds["photon"][0][:2], seed=args.seed, angled=False)  # warm-up: physics tables, model
    res: dict = {"model": args.model, "geant4": geant4_version(), "torch_threads": torch.get_num_threads(),
                 "cpu_cores": len(os.sched_getaffinity(0)), "kinds": {}}
    showers: dict = {}
    for kind, (cond, mult, angled) in kinds.items():
        row: dict = {"events": len(cond) // mult, "primaries_per_event": mult}
        for mode in ("full", "fast"):
            fs.enabled = mode == "fast"
            fs._calls = 0
            t0 = time.perf_counter()
            out = app.simulate(cond, seed=args.seed + 1, angled=angled, multiplicity=mult)
            dt = time.perf_counter() - t0
            row[f"{mode}_ms_per_event"] = 1e3 * dt / row["events"]
            row[f"{mode}_fast_fraction"] = float(np.mean(app.last_records["reason"] == 0))
            showers[kind, mode] = out
        row["speedup"] = row["full_ms_per_event"] / row["fast_ms_per_event"]
        res["kinds"][kind] = row
        print(f"{kind}: {row['events']} events of {mult}: full {row['full_ms_per_event']:.1f} ms/event, fast "
              f"{row['fast_ms_per_event']:.2f} ms/event (model showers for {100 * row['fast_fast_fraction']:.0f} % "
              f"of the particles): x{row['speedup']:.0f}", flush=True)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        cond = kinds["photon"][0]
        for mode in ("full", "fast"):
            attrs = {"source": "geant4" if mode == "full" else "geant4+fastsim", "fastsim_model": args.model,
                     "seed": args.seed, "particle": "gamma"}
            with ShowerWriter(out_dir / f"{mode}.h5", det, det.n_cells(False), attrs) as w:
                w.append(cond, showers["photon", mode])
        print(f"wrote {out_dir}/full.h5 and {out_dir}/fast.h5")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
