"""Generate showers with a trained model into a shower file that ``caloforge evaluate`` reads directly.

Conditions come from specs (``--energy`` in GeV: ``50``, ``10:100``, ``log:10:100``, ``20,50,80``; ``--angle`` in
degrees) or from the rows of a reference file (``--conditions-from REF.h5``). Generation is batched and seeded:
the same model, conditions, seed and batch size give the same file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="trained model directory (runs/NAME); default: the shipped pretrained model")
    p.add_argument("-n", "--n-showers", type=int, help="number of showers (default: all rows of --conditions-from)")
    p.add_argument("--energy", default="10:100", help="incident energy spec in GeV: 50 | 10:100 | log:10:100 | "
                                                       "20,50,80 (default 10:100)")
    p.add_argument("--angle", default="0", help="incidence angle spec in degrees (default 0)")
    p.add_argument("--conditions-from", metavar="REF.h5", help="take energies and angles row by row from a file")
    p.add_argument("-o", "--output", required=True, help="output shower file (.h5)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--batch-size", type=int, default=1000, help="showers per model call (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the conditions and of the model noise")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def generate_file(model, output: str | Path, n: int, energy_spec=None, angle_spec=None,
                  conditions: tuple[np.ndarray, np.ndarray] | None = None, batch_size: int = 1000, seed: int = 0,
                  quiet: bool = True, attrs: dict | None = None) -> Path:
    """Generate ``n`` showers with ``model`` into ``output``; conditions from specs or explicit arrays."""
    import torch

    from caloforge.dataset import ShowerWriter
    from caloforge.models import ConditionsWarning
    from caloforge.progress import progress

    if n <= 0:
        raise ValueError(f"number of showers must be > 0, got {n}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {batch_size}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=model.cond_mean.device).manual_seed(seed)
    if conditions is not None:
        energies_all, angles_all = conditions
        model.check_conditions(energies_all[:n], angles_all[:n])
    else:
        lo_e, hi_e = energy_spec.bounds
        lo_a, hi_a = angle_spec.bounds
        model.check_conditions(np.array([lo_e, hi_e]), np.array([lo_a, hi_a]))
    meta = {
        "source": f"model:{model.family}",
        "model": str(model.meta.get("path", "")),
        "model_family": model.family,
        "seed": seed,
        "batch_size": batch_size,
    }
    if "particle" in model.meta:
        meta["particle"] = model.meta["particle"]
    if energy_spec is not None:
        meta["energy_spec"] = energy_spec.text
        meta["angle_spec"] = angle_spec.text
    meta.update(attrs or {})
    with ShowerWriter(output, model.detector, model.n_cells, meta) as writer, \
            progress(n, desc=f"generate {model.family}", unit="shower", quiet=quiet) as bar, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", ConditionsWarning)  # warned once above
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            if conditions is not None:
                e, a = conditions[0][start:start + m], conditions[1][start:start + m]
            else:
                e, a = energy_spec.sample(m, rng, offset=start), angle_spec.sample(m, rng, offset=start)
            showers = model.sample(e, a, generator=gen).float().cpu().numpy()
            writer.append(e, a, showers)
            bar.update(m)
    return Path(output)


def run(args: argparse.Namespace) -> int:
    import torch

    from caloforge.conditions import parse_angle_spec, parse_energy_spec
    from caloforge.dataset import ShowerFile
    from caloforge.models import default_model_path, load_model
    from caloforge.train import pick_device

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    path = args.model or default_model_path()
    model = load_model(path, device=device)
    conditions = None
    e_spec = a_spec = None
    if args.conditions_from:
        with ShowerFile(args.conditions_from) as ref:
            e, a = ref.energies, ref.angles
        n = args.n_showers if args.n_showers is not None else len(e)
        if n > len(e):
            raise ValueError(f"{args.conditions_from}: -n {n} but the file has only {len(e)} rows of conditions")
        conditions = (e[:n], a[:n])
    else:
        if args.n_showers is None:
            raise ValueError("-n is required unless --conditions-from is given")
        n = args.n_showers
        e_spec, a_spec = parse_energy_spec(args.energy), parse_angle_spec(args.angle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate_file(model, args.output, n, e_spec, a_spec, conditions, args.batch_size, args.seed, args.quiet,
                            attrs={"conditions_from": str(args.conditions_from)} if args.conditions_from else None)
    for w in caught:
        print(f"caloforge generate: warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {n} showers to {out}", file=sys.stderr)
    return 0
