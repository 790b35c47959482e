#!/usr/bin/env python
"""Time ``caloforge evaluate`` on N vs N showers and print the peak memory.

    python scripts/bench_evaluate.py --n 2000                      # synthetic toy showers (house detector)
    python scripts/bench_evaluate.py --reference A.h5 --candidate B.h5 [--max-showers N]

Synthetic showers come from :func:`toy_showers`, a cheap stand-in for Geant4 (gamma-function longitudinal
profile in radiation lengths, exponential lateral profile, MIP-like deposits with sampling by layer thickness);
the tests use the same generator. Run heavy benchmarks with ``OMP_NUM_THREADS=1 nice``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

X0_W_MM = 3.5
MOLIERE_MM = 9.3
EC_MEV = 8.0


def toy_showers(detector, energies: np.ndarray, angle_deg: float = 0.0, seed: int = 0,
                deposits_per_gev: float = 200.0) -> np.ndarray:
    """Toy electromagnetic showers (N, n_cells) float32 MeV in ``detector``'s readout window.

    Deposits: depth ~ Gamma in X0 with a per-shower fluctuating maximum near ln(E/Ec) + 0.5, kept with
    probability 1 / sampling weight of their layer; radius ~ exponential(Moliere radius / 2) about an axis
    tilted by ``angle_deg`` towards +y; energy 0.15 MeV x lognormal(0.35), plus soft sub-threshold deposits.
    """
    rng = np.random.default_rng(seed)
    energies = np.asarray(energies, float)
    angled = angle_deg > 0 and detector.readout.n_y_angled is not None
    n_l, n_x, n_y = detector.shape(angled)
    z_layer = detector.layer_z_mm()
    x0_edges = np.concatenate([[0.0], np.cumsum([ly.absorber_mm + ly.active_mm for ly in detector.layers])]) / X0_W_MM
    weights = detector.sampling_weights()
    n_dep = rng.poisson(deposits_per_gev * energies / 1e3)
    row = np.repeat(np.arange(len(energies)), n_dep)
    t_max = np.log(energies / EC_MEV) + 0.5 + rng.normal(0, 0.6, len(energies))
    b = 0.5
    t = rng.gamma(b * t_max[row] + 1, 1 / b)
    layer = np.searchsorted(x0_edges, t) - 1
    keep = (layer >= 0) & (layer < n_l)
    keep &= rng.random(len(t)) < 1.0 / weights[np.clip(layer, 0, n_l - 1)]
    row, layer = row[keep], layer[keep]
    r = rng.exponential(MOLIERE_MM / 2, len(row)) * (1 + 0.05 * layer)
    phi = rng.uniform(0, 2 * np.pi, len(row))
    x = r * np.cos(phi)
    y = r * np.sin(phi) + z_layer[layer] * np.tan(np.radians(angle_deg))
    e = 0.15 * rng.lognormal(0.0, 0.35, len(row))
    soft = rng.random(len(row)) < 0.3
    e[soft] = rng.exponential(0.02, soft.sum())
    c = detector.cell_size_mm
    ix = np.floor((x - detector.readout.x_min_mm) / c).astype(int)
    iy = np.floor((y - detector.readout.y_min_mm) / c).astype(int)
    inside = (ix >= 0) & (ix < n_x) & (iy >= 0) & (iy < n_y)
    flat = ((layer * n_x + ix) * n_y + iy)[inside]
    n_cells = n_l * n_x * n_y
    out = np.bincount(row[inside] * n_cells + flat, weights=e[inside], minlength=len(energies) * n_cells)
    return out.reshape(len(energies), n_cells).astype(np.float32)


def write_toy_file(path: Path, detector, n: int, energies_gev: tuple[float, ...] = (10.0, 50.0),
                   angle_deg: float = 0.0, seed: int = 0, scale: float = 1.0, layer_shift: int = 0,
                   batch: int = 500) -> Path:
    """A toy shower file with ``n`` showers at discrete energies; optionally energy-scaled or layer-shifted."""
    from caloforge.dataset import ShowerWriter

    rng = np.random.default_rng(seed)
    energies = rng.choice(np.asarray(energies_gev) * 1e3, n)
    angled = angle_deg > 0 and detector.readout.n_y_angled is not None
    shape = detector.shape(angled)
    with ShowerWriter(path, detector, int(np.prod(shape)), {"source": "toy"}) as w:
        for i in range(0, n, batch):
            e = energies[i:i + batch]
            s = toy_showers(detector, e, angle_deg, seed=seed * 100003 + i) * np.float32(scale)
            if layer_shift:
                s = np.roll(s.reshape(len(e), *shape), layer_shift, axis=1)
                s[:, :layer_shift] = 0
                s = s.reshape(len(e), -1)
            w.append(e, np.full(len(e), angle_deg), s)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="synthetic showers per sample (default 2000)")
    parser.add_argument("--reference", help="reference file (instead of synthetic showers)")
    parser.add_argument("--candidate", help="candidate file (instead of synthetic showers)")
    parser.add_argument("--max-showers", type=int)
    parser.add_argument("--no-classifier", action="store_true")
    parser.add_argument("--classifier-size", default="small", choices=["small", "challenge"])
    parser.add_argument("--output", default=None, help="report directory (default: a temporary one)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from caloforge.detector import load_detector
    from caloforge.evaluate import evaluate, summary_lines

    tmp = tempfile.TemporaryDirectory()
    t0 = time.time()
    if args.reference and args.candidate:
        ref, cand = args.reference, args.candidate
    else:
        det = load_detector("ild-ecal")
        ref = write_toy_file(Path(tmp.name) / "ref.h5", det, args.n, seed=1)
        cand = write_toy_file(Path(tmp.name) / "cand.h5", det, args.n, seed=2)
        print(f"generated 2 x {args.n} toy showers in {time.time() - t0:.1f} s")
    stamps = [time.time()]

    def log(msg: str) -> None:
        now = time.time()
        print(f"[{now - stamps[0]:7.1f} s, +{now - stamps[-1]:6.1f} s, peak RSS {peak_rss_mb():7.0f} MiB] {msg}")
        stamps.append(now)

    out = args.output or str(Path(tmp.name) / "report")
    t1 = time.time()
    results = evaluate(str(ref), [("candidate", str(cand))], out, max_showers=args.max_showers,
                       classifier=not args.no_classifier, classifier_size=args.classifier_size, log=log)
    log("done")
    print("\n".join(summary_lines(results)))
    print(f"evaluate: {time.time() - t1:.1f} s total, peak RSS {peak_rss_mb():.0f} MiB")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
