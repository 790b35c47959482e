"""Time the same `caloforge bench` in two or more source trees, alternating, and print medians per tree.

On a shared virtual machine absolute timings drift by 10-30 % within minutes, so a speed change is only visible when
both versions run back to back, several times. Each repetition runs every tree once per model and batch size (a new
process each: imports, numba cache and allocator settings as a user gets them); the figures are the medians (and
ranges) over repetitions of the model alone and of each whole generate job.

    git worktree add /tmp/old <commit>
    python scripts/bench_alternate.py --tree old=/tmp/old/src --tree new=src --models default,multi \
        --batch-sizes 1000,5000 --reps 3 --formats sparse:none,sparse:gzip,dense:none,dense:gzip
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def run_bench(src: str, model: str, batch: int, formats: str, threads: int, whole_factor: int, out: Path,
              device: str = "cpu") -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    cmd = [sys.executable, "-m", "caloforge", "bench", "--model", model, "--batch-sizes", str(batch), "--energies",
           "50", "--threads", str(threads), "--no-geant4", "--repeats", "3", "--whole-job", str(batch * whole_factor),
           "--whole-job-formats", formats, "--json", str(out), "--device", device]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=SRC",
                   help="a label and the src folder of a checkout (repeat for each version)")
    p.add_argument("--models", default="default,multi")
    p.add_argument("--batch-sizes", default="1000")
    p.add_argument("--formats", default="sparse:none,dense:none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--whole-factor", type=int, default=5, help="whole jobs of this many batches")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree]
    if any(len(t) != 2 for t in trees):
        raise SystemExit("--tree: expected NAME=SRC")
    res: dict[tuple, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, src in trees:
                for model in args.models.split(","):
                    for bs in map(int, args.batch_sizes.split(",")):
                        d = run_bench(src, model, bs, args.formats, args.threads, args.whole_factor,
                                      Path(tmp) / f"{name}-{model}-{bs}-{rep}.json", args.device)
                        res[(model, bs, "model alone", name)].append(d["batch_sizes"][0]["ms_per_shower"])
                        for r in d["whole_job"]:
                            job = f"{r['format']} {r['compression']}"
                            res[(model, bs, job, name)].append(r["ms_per_shower"])
                            res[(model, bs, job + " (CPU)", name)].append(r["cpu_ms_per_shower"])
            print(f"repetition {rep + 1} of {args.reps} done", file=sys.stderr)
    names = [n for n, _ in trees]
    print(f"ms per shower, median (min-max) of {args.reps} alternating repetitions, {args.threads} threads")
    w = max(8, *(len(k[0]) for k in res))
    print(f"{'model':{w}} {'batch':>6} {'job':24} " + " ".join(f"{n:>25}" for n in names))
    for model, bs, job in sorted({k[:3] for k in res}):
        cells = []
        for n in names:
            v = np.asarray(res[(model, bs, job, n)])
            cells.append(f"{np.median(v):.4g} ({v.min():.4g}-{v.max():.4g})")
        print(f"{model:{w}} {bs:>6} {job:24} " + " ".join(f"{c:>25}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"|".join(map(str, k)): v for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
