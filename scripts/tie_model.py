"""Project a trained layerflow model's cell laws onto their mirror-tied part, without training (an experiment:
how much of a model's corner asymmetry the tie removes on its own; docs/models.md, layerflow item 9).

    python scripts/tie_model.py multi runs/multi-tied --core-block 8
"""

from __future__ import annotations

import argparse

import torch

from caloforge.models import get_family, save_model
from caloforge.models.base import load_model
from caloforge.train import init_from_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a trained layerflow model (directory or zoo name)")
    p.add_argument("output", help="where the tied model is written")
    p.add_argument("--core-block", type=int, default=None, help="core block of the tied model (must be even)")
    p.add_argument("--mode", choices=("corner", "halo", "full"), default="corner",
                   help="mirror_tie of the tied model (docs/models.md, layerflow item 9)")
    a = p.parse_args(argv)
    src = load_model(a.model)
    if src.family != "layerflow":
        raise SystemExit(f"{a.model}: a {src.family} model; expected layerflow")
    cfg = src.config.to_dict()
    cfg.update(mirror_tie=a.mode, **({"core_block": a.core_block} if a.core_block is not None else {}))
    cls = get_family("layerflow")
    tied = cls(src.detector, src.n_cells, cls.Config.from_dict(cfg), features=src.features, frame=src.frame)
    init_from_model(tied, a.model, a.output)  # the weights and preprocessing, as a fine-tune would start
    tied.meta = dict(src.meta)
    tied.meta["tied_from"] = str(a.model)
    with torch.no_grad():
        tied.tie_mirrors()
    save_model(tied, a.output)
    print(f"{a.output}: {a.model} with mirror-tied cell laws (core block {tied.config.core_block})")


if __name__ == "__main__":
    main()
