"""Time a model against Geant4 on this machine: ms per shower per batch size, and the speed-up per energy.

Model timings: warm-up, then several repeats of ``model.sample`` (noise drawing included), median reported.
Geant4 timings come from :func:`caloforge.simulate.time_geant4` in the same run, at the same energies.
``--whole-job N`` also times whole generate jobs (:func:`time_whole_job`: conditions, model, copies, checks,
compression and writing into a temporary file) per file format and compression; the torch threads and the CPU cores
available are printed and stored, so that ratios can be read per core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from caloforge.generate import add_sampling_arguments, apply_sampling

#: The largest batch size timed (a batch of showers is held in memory).
MAX_BATCH = 100_000
#: The whole jobs timed by --whole-job (FORMAT:COMPRESSION[:serial]); the first is today's default written serially.
WHOLE_JOB_FORMATS = "dense:gzip:serial,dense:gzip,sparse:gzip,dense:lzf,sparse:lzf,dense:none,sparse:none"
#: The largest --whole-job.
MAX_WHOLE_JOB = 10_000_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="trained model directory (default: the shipped pretrained model)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    add_sampling_arguments(p)
    p.add_argument("--batch-sizes", default="1,10,100,1000,10000", help="comma-separated batch sizes")
    p.add_argument("--energies", default="10,50,100", help="comma-separated energies in GeV")
    p.add_argument("--angle", type=float, default=0.0, help="incidence angle in degrees (default 0)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per point (median; default 5)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="fewer repeats (at least 2) where a point would take longer than this")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--geant4-showers", type=int, default=20, help="Geant4 showers per energy (default 20)")
    p.add_argument("--no-geant4", action="store_true", help="skip the Geant4 timing")
    p.add_argument("--particle", help="particle for Geant4 (default: the model's training particle, else gamma)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--whole-job", type=int, default=0, metavar="N",
                   help="also time whole generate jobs of N showers into a temporary file (model, copies, checks, "
                        "writing; imports and interpreter start-up excluded), per --whole-job-formats")
    p.add_argument("--whole-job-formats", default=WHOLE_JOB_FORMATS,
                   help=f"comma-separated FORMAT:COMPRESSION[:serial] jobs (FORMAT dense|sparse, COMPRESSION "
                        f"gzip|lzf|none; ':serial' writes without the background writer thread; default "
                        f"{WHOLE_JOB_FORMATS})")


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: expected comma-separated integers") from None
    if not vals or min(vals) <= 0 or max(vals) > MAX_BATCH:
        raise ValueError(f"--{what} {text!r}: expected integers in [1, {MAX_BATCH}]")
    return vals


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: expected comma-separated numbers") from None
    from caloforge.conditions import MAX_ENERGY_GEV

    if not vals or not all(0 < v <= MAX_ENERGY_GEV for v in vals):  # also refuses NaN
        raise ValueError(f"--{what} {text!r}: expected numbers in (0, {MAX_ENERGY_GEV:g}] GeV")
    return vals


def time_model(model, batch_size: int, energies_gev: list[float], angle: float = 0.0, repeats: int = 5,
               max_seconds: float = 20.0, particle: str | None = None) -> dict:
    """Median ms per shower of ``model.sample`` at one batch size (energies cycle over ``energies_gev``), into one
    output buffer reused across the repeats as ``generate`` does."""
    import numpy as np
    import torch

    device = model.cond_mean.device
    e = torch.as_tensor(np.resize(np.asarray(energies_gev) * 1e3, batch_size), dtype=torch.float32, device=device)
    a = torch.full_like(e, angle)
    particle = particle or model.default_particle
    gen = torch.Generator(device=device).manual_seed(0)
    out = torch.empty((batch_size, int(np.prod(model.window_shape(angle > 0)))), device=device)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.sample(e, a, generator=gen, particles=particle, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conditions-range warnings are irrelevant to timing
        first = once()  # warm-up
        n_rep = max(2, min(repeats, int(max_seconds / max(first, 1e-9))))
        times = [once() for _ in range(n_rep)]
    med = statistics.median(times)
    return {"batch_size": batch_size, "ms_per_shower": 1e3 * med / batch_size, "repeats": n_rep,
            "showers_per_s": batch_size / med}


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity where the system tells it)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _jobs(text: str) -> list[tuple[str, str, bool]]:
    from caloforge.dataset import COMPRESSIONS, LAYOUTS

    jobs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in LAYOUTS or parts[1] not in COMPRESSIONS \
                or parts[2:] not in ([], ["serial"]):
            raise ValueError(f"--whole-job-formats {item!r}: expected FORMAT:COMPRESSION[:serial] with FORMAT in "
                             f"{'|'.join(LAYOUTS)} and COMPRESSION in {'|'.join(COMPRESSIONS)}")
        jobs.append((parts[0], parts[1], len(parts) == 2))
    if not jobs:
        raise ValueError("--whole-job-formats is empty; expected FORMAT:COMPRESSION[:serial],...")
    return jobs


def time_whole_job(model, n: int, jobs: list[tuple[str, str, bool]], energies_gev: list[float], angle: float = 0.0,
                   particle: str | None = None, batch_size: int = 1000, seed: int = 0) -> list[dict]:
    """Time :func:`caloforge.generate.generate_file` of ``n`` showers into a temporary file per (layout, compression,
    overlap) job: conditions, model, copies, checks, compression, writing and the final rename (the model is loaded
    and imports are done before). Energies cycle over ``energies_gev``; the file is deleted after each job."""
    import tempfile

    from caloforge.conditions import ConditionSampler
    from caloforge.generate import generate_file

    particle = particle or model.default_particle
    sampler = ConditionSampler.parse(",".join(f"{e:g}" for e in energies_gev), f"{angle:g}", "0,0", particle,
                                     model.detector.cell_size_mm)
    rows = []
    with tempfile.TemporaryDirectory(prefix="caloforge-bench-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conditions-range warnings are irrelevant to timing
        for i, (layout, compression, overlap) in enumerate(jobs):
            out = Path(tmp) / f"job{i}.h5"
            stats: dict = {}
            t0, c0 = time.perf_counter(), time.process_time()
            generate_file(model, out, n, sampler, batch_size=batch_size, seed=seed, layout=layout,
                          compression=compression, overlap=overlap, stats=stats)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            size = out.stat().st_size
            out.unlink()
            rows.append({"format": layout, "compression": compression, "overlap": overlap, "n_showers": n,
                         "batch_size": batch_size, "total_s": total, "ms_per_shower": 1e3 * total / n,
                         "cpu_s": cpu, "cpu_ms_per_shower": 1e3 * cpu / n,
                         "model_ms_per_shower": 1e3 * stats["model_s"] / n,
                         "write_ms_per_shower": 1e3 * stats.get("write_s", 0.0) / n,
                         "wait_ms_per_shower": 1e3 * stats["wait_s"] / n,
                         "file_bytes": size, "bytes_per_shower": size / n})
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from caloforge.conditions import canonical_particle
    from caloforge.models import load_default_model, load_model
    from caloforge.train import pick_device
    from caloforge.validate import check_float, check_int, check_output_file

    batch_sizes = _ints(args.batch_sizes, "batch-sizes")
    energies = _floats(args.energies, "energies")
    check_float(args.angle, "--angle", 0.0, 90.0, hi_open=True)
    check_int(args.repeats, "--repeats", 1, 10**6)
    check_float(args.max_seconds, "--max-seconds", 0.0, 1e6, lo_open=True)
    check_int(args.threads, "--threads", 0, 4096)
    check_int(args.whole_job, "--whole-job", 0, MAX_WHOLE_JOB)
    jobs = _jobs(args.whole_job_formats)
    check_int(args.geant4_showers, "--geant4-showers", 1, 10**6)
    if args.particle is not None:
        canonical_particle(args.particle)
    if args.json:
        check_output_file(args.json, "--json")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    t_load = time.perf_counter()
    if args.model:
        path, model = args.model, load_model(args.model, device=device)
    else:  # the shipped default that covers the timed conditions
        import numpy as np

        from caloforge.conditions import Conditions

        want = Conditions.make(np.asarray(energies) * 1e3, args.angle, particle=args.particle or "gamma")
        model = load_default_model(want, device=device)
        path = model.meta["path"]
    apply_sampling(model, args.steps, args.solver)
    t_load = time.perf_counter() - t_load
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} "\
                                                                                  f"threads)"
    result: dict = {"model": str(path), "family": model.family, "device": device_name,
                    "energies_gev": energies, "angle_deg": args.angle, "batch_sizes": [], "per_energy": []}
    print(f"model {model.family} ({path}) on {device_name}")
    cores = cpu_cores()
    result.update(torch_threads=torch.get_num_threads(), cpu_cores=cores, model_load_s=t_load)
    print(f"torch uses {torch.get_num_threads()} CPU threads of {cores} available cores (ms/shower x threads = "
          f"core-ms/shower); model loaded in {t_load:.2f} s")
    particle = args.particle or model.default_particle  # Geant4's; the model's too where it takes that particle
    m_particle = particle if particle in model.particles else model.default_particle
    result.update(model_particle=m_particle)
    print(f"{'batch':>8} {'ms/shower':>12} {'showers/s':>12} {'repeats':>8}  ({m_particle})")
    for bs in batch_sizes:
        r = time_model(model, bs, energies, args.angle, args.repeats, args.max_seconds, m_particle)
        result["batch_sizes"].append(r)
        print(f"{bs:>8} {r['ms_per_shower']:>12.4f} {r['showers_per_s']:>12.1f} {r['repeats']:>8}", flush=True)
    ref_bs = max([b for b in batch_sizes if b <= 1000] or [min(batch_sizes)])
    time_geant4 = None
    if not args.no_geant4:
        try:
            from caloforge.simulate import time_geant4
        except ImportError as err:
            print(f"Geant4 timing skipped: caloforge.simulate.time_geant4 is not available ({err})")
    from caloforge.conditions import hadron_names, parse_particles

    hadronic = "bertini" if hadron_names(parse_particles(particle)) else "none"  # pions: the Bertini placeholder
    g4_label = f"{particle} with the Bertini placeholder" if hadronic != "none" else particle
    result.update(geant4_particle=particle, geant4_hadronic=hadronic)
    print(f"\nper energy (model at batch {ref_bs}; Geant4 {g4_label}, {args.geant4_showers} showers per energy)")
    print(f"{'E [GeV]':>8} {'model ms':>10} {'Geant4 ms':>10} {'speed-up':>10}")
    for e_gev in energies:
        r = time_model(model, ref_bs, [e_gev], args.angle, args.repeats, args.max_seconds, m_particle)
        g4 = None
        if time_geant4 is not None:
            g4 = float(time_geant4(model.detector, particle, e_gev, args.geant4_showers, hadronic=hadronic))
        row = {"energy_gev": e_gev, "batch_size": ref_bs, "model_ms_per_shower": r["ms_per_shower"],
               "geant4_ms_per_shower": g4, "speedup": (g4 / r["ms_per_shower"]) if g4 else None}
        result["per_energy"].append(row)
        g4s = f"{g4:>10.2f}" if g4 is not None else f"{'-':>10}"
        sus = f"{row['speedup']:>9.0f}x" if row["speedup"] else f"{'-':>10}"
        print(f"{e_gev:>8g} {r['ms_per_shower']:>10.4f} {g4s} {sus}", flush=True)
    if args.whole_job:
        alone = next(r for r in result["batch_sizes"] if r["batch_size"] == ref_bs)["ms_per_shower"]
        print(f"\nwhole job: generate {args.whole_job} showers into a temporary file at batch {ref_bs} (energies "
              f"cycling over {args.energies} GeV; conditions, model, copies, checks, compression, writing; imports, "
              f"model loading and interpreter start-up excluded); torch {torch.get_num_threads()} threads + 1 writer "
              f"thread on {cores} cores; model alone (above): {alone:.4f} ms/shower. Wall ms per shower; 'CPU ms': "
              f"CPU time of all threads of this process per shower")
        print(f"{'format':>7} {'compr.':>6} {'writer':>10} {'ms/shower':>10} {'model ms':>9} {'write ms':>9} "
              f"{'wait ms':>8} {'x alone':>8} {'CPU ms':>8} {'kB/shower':>10}")
        rows = time_whole_job(model, args.whole_job, jobs, energies, args.angle, m_particle, batch_size=ref_bs)
        result["whole_job"] = rows
        result["whole_job_model_alone_ms_per_shower"] = alone
        for r in rows:
            print(f"{r['format']:>7} {r['compression']:>6} {'background' if r['overlap'] else 'serial':>10} "
                  f"{r['ms_per_shower']:>10.4f} {r['model_ms_per_shower']:>9.4f} {r['write_ms_per_shower']:>9.4f} "
                  f"{r['wait_ms_per_shower']:>8.4f} {r['ms_per_shower'] / alone:>7.2f}x "
                  f"{r['cpu_ms_per_shower']:>8.4f} {r['bytes_per_shower'] / 1e3:>10.2f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
