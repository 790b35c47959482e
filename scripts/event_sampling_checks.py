"""Two sampling-time checks of an event WGAN on validation events: the moving-average generator against the raw one
(both are in a run's checkpoint), and the scale of the generator's input noise (a temperature: < 1 narrows the
sample, > 1 widens it). Each setting's validation Fisher-z chi2/ndf and marginal W1 (`validation_scores`, as the
trainer computes them) over several noise seeds, so that the statistic's own spread shows.

    python scripts/event_sampling_checks.py --run runs/s33/eventwgan-b8192-r2 --val data/ttx32-val.h5 \\
        --scales 0.8,0.9,1,1.1,1.25 --seeds 1,2,3,4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.torch import load_file

    from caloforge.events.eventfile import read_events
    from caloforge.events.wgan import EventWGAN, validation_scores

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a training run (its model, and its checkpoint if kept)")
    p.add_argument("--val", required=True, help="validation events (never the test file)")
    p.add_argument("--scales", default="1", help="comma-separated noise scales")
    p.add_argument("--seeds", default="1,2,3,4", help="comma-separated noise seeds")
    args = p.parse_args(argv)
    val = read_events(args.val)
    model = EventWGAN.load(args.run)
    seeds = [int(s) for s in args.seeds.split(",")]
    generators = {"saved": None}
    ckpt = Path(args.run) / "checkpoint.safetensors"
    if ckpt.exists():
        t = load_file(str(ckpt))
        generators = {name: {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".")}
                      for name in ("ema", "generator") if any(k.startswith(name + ".") for k in t)}
    randn = torch.randn
    try:
        for name, state in generators.items():
            if state is not None:
                model.generator.load_state_dict(state)
            for scale in (float(s) for s in args.scales.split(",")):
                torch.randn = lambda *a, _s=scale, **k: randn(*a, **k) * _s  # EventWGAN.sample's noise, scaled
                scores = [validation_scores(model, val, seed=s) for s in seeds]
                fz = [s["fisher_z"] for s in scores]
                w1 = float(np.mean([s["marginal_w1"] for s in scores]))
                print(f"{name:9s} noise x {scale:<5g} Fisher-z {np.mean(fz):.3f} (seeds: "
                      f"{', '.join(f'{v:.2f}' for v in fz)}), marginal W1 {w1:.3f}")
    finally:
        torch.randn = randn
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
