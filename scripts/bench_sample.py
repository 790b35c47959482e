"""CPU and wall time per shower of ``sample`` (dense window) and ``sample_hits`` (sparse hits), several models in one
process, at random conditions over the multi-condition space (10-100 GeV, 0-60 degrees, impact over a cell,
photons and electrons alternating). CPU time (``time.process_time``) is what to compare on a shared machine.

    python scripts/bench_sample.py --threads 1 -n 1000 multi /path/to/other/model
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from caloforge.conditions import Conditions
from caloforge.models import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model directories or shipped names")
    p.add_argument("-n", type=int, default=1000, help="showers per call (default 1000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="best of this many calls")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = args.n
    c = Conditions(rng.uniform(1e4, 1e5, n), rng.uniform(0, 60, n), rng.uniform(0, 5, n), rng.uniform(0, 5, n),
                   np.where(np.arange(n) % 2, 11, 22))
    for path in args.models:
        m = load_model(path).eval()
        m.sample(c[:min(n, 200)], seed=1)  # warm-up
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for name, f in (("sample", m.sample), ("sample_hits", m.sample_hits)):
                t, w = time.process_time(), time.perf_counter()
                f(c, seed=1)
                cur = ((time.process_time() - t) / n * 1e3, (time.perf_counter() - w) / n * 1e3)
                best[name] = min(best.get(name, cur), cur)
        print(f"{path}: " + ", ".join(f"{k} cpu {v[0]:.3f} ms / wall {v[1]:.3f} ms" for k, v in best.items())
              + f" per shower ({args.threads} thread(s), n = {n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
