"""Where a candidate's Fisher-z excess sits: each variable's share of the chi2 and its worst partners, per process.

The event evaluator's Fisher-z chi2/ndf sums z^2 over all 325 pairs of the 26 high-level variables; this splits it:
for each variable the mean z^2 over the 25 pairs it is in (about 1 for a perfect model; the floor from Pythia
training events against the same reference beside it), and the pairs with the largest |z|. The candidate and the
floor sample are drawn to the reference's size per process (seeded), as ``caloforge events evaluate`` compares them.

    python scripts/fisher_pairs.py --reference data/ttx32-test.h5 --candidate data/s33/gen-b8192.h5 \\
        --floor data/ttx33-train.h5 --top 8
"""

from __future__ import annotations

import argparse

import numpy as np

from caloforge.events import PROCESSES
from caloforge.events.eventfile import read_events
from caloforge.events.quality import fisher_z


def _draw(ev, ref, rng: np.random.Generator):
    """As many events of each process as ``ref`` has, drawn from ``ev`` without replacement, in file order."""
    rows = np.concatenate([rng.permutation(np.flatnonzero(ev.process == lab))[:int((ref.process == lab).sum())]
                           for lab in PROCESSES.values()])
    return ev.select(np.sort(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, help="held-out Pythia events")
    p.add_argument("--candidate", required=True, help="generated events")
    p.add_argument("--floor", help="other Pythia events (the floor: the same split against the reference)")
    p.add_argument("--top", type=int, default=8, help="variables listed per process")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ref, cand = read_events(args.reference), read_events(args.candidate)
    floor = read_events(args.floor) if args.floor else None
    rng = np.random.default_rng(args.seed)
    res = fisher_z(_draw(cand, ref, rng), ref, top=args.top)
    res_f = fisher_z(_draw(floor, ref, rng), ref, top=len(ref.names)) if floor is not None else None
    for name in PROCESSES:
        r = res[name]
        f = res_f[name] if res_f is not None else {"chi2_ndf": float("nan"), "variables": {}}
        print(f"{name}: chi2/ndf {r['chi2_ndf']:.3f} (floor {f['chi2_ndf']:.3f})")
        for var, share in r["variables"].items():
            print(f"  {var:27s} mean z^2 {share:5.2f} (floor {f['variables'].get(var, float('nan')):4.2f})")
        print("  largest pulls: " + "; ".join(f"{a} x {b} {z:+.1f}" for a, b, z in r["pairs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
