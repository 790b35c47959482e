"""Geant4 speed on this machine: ms per shower at fixed energies (one process) and throughput (all workers).

    python scripts/bench_geant4.py [--particle gamma] [--energies 10,50,100] [-n 20] [--workers N] [--json out.json]

Start-up and physics-table building are excluded from the per-shower times (one warm-up shower first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from caloforge.simulate import simulate, time_geant4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", default="ild-ecal")
    p.add_argument("--particle", default="gamma")
    p.add_argument("--energies", default="10,50,100", help="GeV")
    p.add_argument("-n", type=int, default=20, help="showers per energy for the single-process timing")
    p.add_argument("--throughput-n", type=int, default=40, help="showers at 50 GeV for the all-worker run")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "particle": args.particle, "detector": args.detector, "single_process_ms_per_shower": {}}
    print(f"Geant4, {args.detector}, {args.particle}, one process ({args.n} showers each):")
    for e in [float(x) for x in args.energies.split(",")]:
        ms = time_geant4(args.detector, args.particle, e, args.n)
        result["single_process_ms_per_shower"][str(e)] = ms
        print(f"  {e:6.0f} GeV: {ms:8.1f} ms/shower  ({ms / e:.2f} ms/GeV)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate(args.detector, args.particle, "50", "0", args.throughput_n, 1, Path(tmp) / "t.h5",
                 workers=args.workers, chunk_size=max(1, args.throughput_n // (2 * args.workers)), quiet=True)
        dt = time.perf_counter() - t0
    result["throughput_50GeV"] = {"workers": args.workers, "showers_per_s": args.throughput_n / dt,
                                  "ms_per_shower": dt / args.throughput_n * 1e3, "includes_startup": True}
    print(f"  50 GeV with {args.workers} workers: {args.throughput_n / dt:.2f} showers/s "
          f"({dt / args.throughput_n * 1e3:.0f} ms/shower wall, start-up and merge included)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
