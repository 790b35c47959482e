"""Give a trained ``gan3d`` model a layer flow (config ``layer_flow``, docs/models.md): a small conditional flow fitted
by likelihood on the training showers' layer energies, to which sampling rescales each generated layer. The GAN's
weights are not touched; writes a copy of the model with the flow.

    python scripts/attach_layer_flow.py ild-ecal-gan3d data/ild-gamma-angled-train.h5 runs/gan3d-flow --steps 6000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from caloforge.dataset import open_showers
from caloforge.models import load_model, save_model


def layer_fractions(model, path: str, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer fractions (n, depth) of a shower file's first ``rows`` showers (0: all) in the model's frame, and
    their raw conditions."""
    fracs, conds = [], []
    with open_showers(path, model.detector) as f:
        for batch in f.iter_batches(2000, stop=rows or None):
            cond = batch.conditions.as_array()
            local = torch.as_tensor(model.to_local(batch.showers, cond), dtype=torch.float32)
            fracs.append(model.layer_fractions(local, torch.as_tensor(cond[:, 0])))
            conds.append(cond)
    return torch.cat(fracs), torch.as_tensor(np.concatenate(conds), dtype=torch.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a gan3d model (a run, a saved model or a zoo name)")
    p.add_argument("data", help="the model's training set")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=6000, help="Adam steps of batch 256 (default 6000)")
    p.add_argument("--rows", type=int, default=0, help="training showers used (the first N; 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--couple", type=int, default=0, metavar="N",
                   help="couple the flow to the generator's own layer energies, fitted on N generated showers at the "
                        "training conditions (config layer_flow_coupling; 0: the flow draws its own noise)")
    p.add_argument("--val", help="held-out showers (same conditions as the training set): their NLL is printed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    if not hasattr(model, "enable_layer_flow"):
        raise SystemExit(f"{args.model}: a gan3d model is needed, not {model.family}")
    frac, cond = layer_fractions(model, args.data, args.rows)
    if model.layer_flow is None:
        torch.manual_seed(args.seed)  # the flow's initial weights
        model.enable_layer_flow()
    t0 = time.perf_counter()
    nll = model.fit_layer_flow(frac, cond, args.steps, torch.Generator().manual_seed(args.seed),
                               progress=not args.quiet)
    model.eval()
    extra = {}
    if args.val:
        extra["val_nll"] = model.layer_flow_nll(*layer_fractions(model, args.val))
        print(f"held-out NLL on {args.val}: {extra['val_nll']:.3f} per shower")
    if args.couple > 0:
        idx = torch.randperm(len(cond), generator=torch.Generator().manual_seed(args.seed + 1))[:args.couple]
        extra = model.fit_flow_coupling(cond[idx], torch.Generator().manual_seed(args.seed + 2))
        print(f"coupling fitted on {min(args.couple, len(cond))} generated showers: {extra}")
    out = save_model(model, args.out, extra={"layer_flow_fit": {"data": str(args.data), "rows": len(cond),
                                                                  "steps": args.steps, "seed": args.seed,
                                                                  "final_nll": nll, "couple": args.couple,
                                                                  **extra}})
    print(f"{out}: layer flow fitted on {len(cond)} showers of {args.data} in {time.perf_counter() - t0:.0f} s "
          f"({args.steps} steps, final NLL {nll:.2f} per shower)")


if __name__ == "__main__":
    main()
