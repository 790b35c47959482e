"""Fit a layerflow model's ``sparse_map`` after training (docs/models.md, layerflow item 15): per layer and hit count
1..K, a quantile map of the layer energy (per unit of silicon path, log(E x cos angle)) from the flow's samples to
the training showers'. Writes a copy of the model with the map; nothing else changes.

    python scripts/fit_sparse_map.py runs/layerflow-v47 data/ild-mixed10-train.h5 runs/layerflow-v47-sm3 --k 3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from caloforge.dataset import open_showers
from caloforge.models import load_model, save_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model"), p.add_argument("data", help="the model's training set"), p.add_argument("out")
    p.add_argument("--k", type=int, default=3, help="layers with 1..K hits are mapped")
    p.add_argument("--rows", type=int, default=20000, help="training showers used (the first N)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = load_model(args.model, device="cpu")
    if model.family != "layerflow":
        raise SystemExit(f"{args.model}: a layerflow model is needed, not {model.family}")
    conds, energies, counts = [], [], []
    with open_showers(args.data, model.detector) as f:
        for batch in f.iter_batches(2000, stop=args.rows):
            cond = batch.conditions.as_array()
            local = model.to_local(batch.showers, cond).reshape(len(cond), model.n_layers, -1)
            conds.append(cond)
            energies.append(local.sum(axis=2))
            counts.append((local > 0).sum(axis=2))
    cond = torch.as_tensor(np.concatenate(conds), dtype=torch.float32)
    e_data = torch.as_tensor(np.concatenate(energies), dtype=torch.float32)
    n_data = torch.as_tensor(np.concatenate(counts), dtype=torch.float32)
    model.fit_sparse_map(cond, e_data, n_data, args.k, torch.Generator().manual_seed(args.seed))
    out = save_model(model, args.out, extra={"sparse_map_fit": {"data": str(args.data), "rows": len(cond),
                                                                  "seed": args.seed}})
    print(f"{out}: sparse_map = {args.k} fitted on {len(cond)} showers of {args.data}")


if __name__ == "__main__":
    main()
