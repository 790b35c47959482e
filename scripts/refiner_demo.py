"""The refiner demonstration (docs/refiner.md): does training on refined simulation remove the bias on "data"?

From one Geant4 photon file (true energies), the first half of the rows is the "simulation", the second half is
digitized with the detector effects of ``--effects`` into "data" (different showers: the samples are unpaired).
Each half is split into train (2/3) and held-out (1/3) rows. Then:

1. a refiner is trained on sim-train vs data-train (``caloforge refine train``; resumed if the run exists);
2. an energy regression (an MLP on the log of the 30 layer energies, predicting log E_inc) is trained on
   (a) raw sim-train, (b) refined sim-train, (c) data-train, and evaluated on held-out data: bias = mean relative
   error, resolution = its standard deviation;
3. classifier two-sample tests (caloforge.classifier, high-level inputs) of held-out data against raw and refined
   held-out simulation on the observables the effects touch: hit count, cell-energy spectrum, layer energies,
   with the floor from data against data (data-train rows, same size).

    python scripts/refiner_demo.py --sim data/refine-sim.h5 --effects configs/effects-demo.toml -o data/refine-demo

Writes ``results.json`` and plots into ``-o``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from caloforge.dataset import ShowerFile, read_showers, write_showers
from caloforge.digitize import digitize_file, load_effects
from caloforge.observables import cell_energy_spectrum, layer_energies, spectrum_edges

GROUPS = ("n_hits", "spectrum", "layer_energies", "all")


def split_files(sim_path: Path, out: Path, n: int | None) -> dict[str, Path]:
    """sim-train / sim-holdout (true energies) and data-truth (to be digitized) from the rows of one file."""
    paths = {k: out / f"{k}.h5" for k in ("sim-train", "sim-holdout", "data-truth")}
    if all(p.exists() for p in paths.values()):
        return paths
    with ShowerFile(sim_path) as f:
        n = len(f) if n is None else min(n, len(f))
        half = n // 2
        b = f.read(0, 2 * half)
        attrs = {k: v for k, v in f.attrs.items() if k not in ("complete", "n_showers", "layout", "compression")}
        det = f.detector
    n_train = 2 * half // 3
    for key, rows in (("sim-train", slice(0, n_train)), ("sim-holdout", slice(n_train, half)),
                      ("data-truth", slice(half, 2 * half))):
        write_showers(paths[key], det, b.conditions[rows], b.showers[rows], attrs={**attrs, "demo_split": key})
    return paths


def split_data(data_path: Path, out: Path) -> dict[str, Path]:
    """data-train / data-holdout from the digitized data half (the same 2/3 : 1/3 split)."""
    paths = {k: out / f"{k}.h5" for k in ("data-train", "data-holdout")}
    if all(p.exists() for p in paths.values()):
        return paths
    with ShowerFile(data_path) as f:
        b = f.read()
        attrs = {k: v for k, v in f.attrs.items() if k not in ("complete", "n_showers", "layout", "compression")}
        det = f.detector
    n_train = 2 * len(b) // 3
    for key, rows in (("data-train", slice(0, n_train)), ("data-holdout", slice(n_train, len(b)))):
        write_showers(paths[key], det, b.conditions[rows], b.showers[rows], attrs={**attrs, "demo_split": key})
    return paths


# ---- the energy regression ------------------------------------------------------------------------------
def regression_features(showers: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """log(1 + E_layer / 1 MeV) for each layer: what a simple energy reconstruction sees."""
    return np.log1p(layer_energies(showers, shape)).astype(np.float32)


def train_regression(x: np.ndarray, energies: np.ndarray, seed: int, epochs: int = 300):
    """An MLP (30 -> 64 -> 64 -> 1) predicting log E_inc; full-batch Adam, seeded. Returns a predict function."""
    import torch

    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    y = np.log(energies).astype(np.float32)
    ym, ys = float(y.mean()), float(y.std())
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                              torch.nn.SiLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy((x - mu) / sd), torch.from_numpy((y - ym) / ys)
    for _ in range(epochs):
        opt.zero_grad()
        loss = ((net(xt).squeeze(1) - yt) ** 2).mean()
        loss.backward()
        opt.step()

    def predict(xn: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.exp(net(torch.from_numpy((xn - mu) / sd)).squeeze(1).numpy() * ys + ym)

    return predict


def response(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    r = pred / true - 1.0
    return {"bias": float(r.mean()), "bias_err": float(r.std() / np.sqrt(len(r))), "resolution": float(r.std())}


# ---- classifier tests -----------------------------------------------------------------------------------
def classifier_features(showers: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-shower features of the observables the effects touch, as stored (no analysis threshold)."""
    spec = cell_energy_spectrum(showers, spectrum_edges())
    spec = spec[:, 15:80]  # 0.0075 MeV (0.05 MIP) to 350 MeV: the sub-threshold cells and the MIP peak included
    return {"n_hits": (showers > 0).sum(1, keepdims=True).astype(float),
            "spectrum": np.log1p(spec), "layer_energies": np.log1p(layer_energies(showers, shape))}


def two_sample(ref: dict, cand: dict, e_ref: np.ndarray, e_cand: np.ndarray, group: str, seed: int) -> float:
    from caloforge.classifier import high_level_inputs, two_sample_test

    keys = [g for g in GROUPS[:-1]] if group == "all" else [group]
    xr = np.column_stack([ref[k] for k in keys])
    xc = np.column_stack([cand[k] for k in keys])
    mu, sd = xr.mean(0), xr.std(0)
    keep = (sd > 0) | (xc.std(0) > 0)
    sd = np.where(sd > 0, sd, 1.0)
    xr, xc = ((xr - mu) / sd)[:, keep], ((xc - mu) / sd)[:, keep]
    x, y = high_level_inputs(xr, xc, e_ref, e_cand, seed=seed)
    return two_sample_test(x, y, seed=seed, inputs=group).auc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", required=True, help="Geant4 shower file (true energies)")
    p.add_argument("--effects", required=True, help="detector effects of the data (TOML, see caloforge digitize)")
    p.add_argument("-o", "--output", required=True, help="work directory")
    p.add_argument("-n", type=int, help="use the first n rows of --sim (default all)")
    p.add_argument("--steps", type=int, help="refiner steps (default: RefinerConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="refiner option KEY=VALUE")
    p.add_argument("--seeds", type=int, default=3, help="classifier / regression seeds to average (default 3)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    paths = split_files(Path(args.sim), out, args.n)
    data_all = out / "data.h5"
    if not data_all.exists():
        digitize_file(paths["data-truth"], data_all, load_effects(args.effects), quiet=args.quiet)
    paths.update(split_data(data_all, out))

    from caloforge.refiner import RUN_FILE, RefinerConfig, _parse_overrides, create_run, refine_file, resume_run

    run_dir = out / "refiner"
    if (run_dir / RUN_FILE).exists() and (run_dir / "checkpoint.safetensors").exists():
        trainer = resume_run(run_dir, args.quiet)
    else:
        over = _parse_overrides(args.overrides)
        if args.steps:
            over["steps"] = args.steps
        trainer = create_run(paths["sim-train"], paths["data-train"], run_dir, RefinerConfig.from_dict(over, "--set"),
                             quiet=args.quiet)
    t1 = time.time()
    state = trainer.fit(args.steps)  # a resumed run stops at --steps when given (else at the configured steps)
    train_s = time.time() - t1
    for key in ("sim-train", "sim-holdout"):
        dst = out / f"refined-{key}.h5"
        if not dst.exists() or dst.stat().st_mtime < (run_dir / "refiner.safetensors").stat().st_mtime:
            refine_file(run_dir, paths[key], dst, seed=1, quiet=args.quiet)
        paths[f"refined-{key}"] = dst

    samples = {k: read_showers(v) for k, v in paths.items() if k != "data-truth"}
    shape = ShowerFile(paths["sim-train"]).shape
    truth_eff = load_effects(args.effects)
    results: dict = {"n": {k: len(v.energies) for k, v in samples.items()}, "effects": truth_eff.to_dict(),
                     "refiner": {"steps": state["step"], "train_s_this_call": round(train_s),
                                 "gain_layer": state["gain_layer"], "threshold_mev": state["threshold_mev"],
                                 "noise_mev": state["noise_mev"], "config": trainer.cfg.to_dict()}}

    # energy regression
    holdout = samples["data-holdout"]
    x_hold = regression_features(holdout.showers, shape)
    reg = {}
    for label, key in (("raw simulation", "sim-train"), ("refined simulation", "refined-sim-train"),
                       ("data", "data-train")):
        s = samples[key]
        runs = [response(train_regression(regression_features(s.showers, shape), s.energies, seed)(x_hold),
                         holdout.energies) for seed in range(args.seeds)]
        reg[label] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        reg[label]["bias_seed_spread"] = float(np.std([r["bias"] for r in runs]))
    results["regression_on_data_holdout"] = reg

    # classifier tests on held-out samples
    feats = {k: classifier_features(samples[k].showers, shape)
             for k in ("data-holdout", "data-train", "sim-holdout", "refined-sim-holdout")}
    n_ref = len(holdout.energies)
    floor_rows = slice(0, min(n_ref, len(samples["data-train"].energies)))
    cmp = {"data vs raw sim": "sim-holdout", "data vs refined sim": "refined-sim-holdout",
           "data vs data (floor)": "data-train"}
    auc: dict = {}
    for label, key in cmp.items():
        cand = feats[key] if key != "data-train" else {k: v[floor_rows] for k, v in feats[key].items()}
        e_c = samples[key].energies if key != "data-train" else samples[key].energies[floor_rows]
        auc[label] = {}
        for g in GROUPS:
            vals = [two_sample(feats["data-holdout"], cand, holdout.energies, e_c, g, seed)
                    for seed in range(args.seeds)]
            auc[label][g] = {"auc": float(np.mean(vals)), "spread": float(np.std(vals))}
    results["classifier_auc"] = auc
    results["layer_energy_ratio_to_data"] = {
        k: (layer_energies(samples[k].showers, shape).mean(0) / layer_energies(holdout.showers, shape).mean(0)).tolist()
        for k in ("sim-holdout", "refined-sim-holdout", "data-train")}
    results["wall_s"] = round(time.time() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        from refiner_plots import plot_all  # scripts/refiner_plots.py

        plot_all(samples, shape, out)
    except ImportError:
        pass
    print_tables(results)
    return 0


def print_tables(results: dict) -> None:
    print("\nEnergy regression on held-out data (relative error, mean over seeds):")
    print("| trained on | bias | resolution |")
    print("|---|---|---|")
    for label, r in results["regression_on_data_holdout"].items():
        print(f"| {label} | {100 * r['bias']:+.2f} % +- {100 * r['bias_err']:.2f} (seeds "
              f"{100 * r['bias_seed_spread']:.2f}) | {100 * r['resolution']:.2f} % |")
    print("\nClassifier AUC against held-out data (mean +- spread over seeds):")
    print("| comparison | " + " | ".join(GROUPS) + " |")
    print("|---|" + "---|" * len(GROUPS))
    for label, row in results["classifier_auc"].items():
        print(f"| {label} | " + " | ".join(f"{row[g]['auc']:.3f} +- {row[g]['spread']:.3f}" for g in GROUPS) + " |")
    print(f"\nsamples: {results['n']}; wall {results['wall_s']} s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
