"""Simulate reference showers with Geant4: ``caloforge simulate``.

The run is cut into chunks of a fixed number of showers. Chunk ``k`` draws its conditions and its Geant4
seed from ``(seed, k)`` alone, so the showers do not depend on the number of workers, and the first ``m``
showers of a run are the same whatever ``-n`` is. Workers (separate processes: one Geant4 per process)
write each finished chunk atomically to ``OUTPUT.chunks/``; a killed run started again with the same command
skips the chunks already there. When all chunks exist they are merged into ``OUTPUT`` (written as
``OUTPUT.tmp`` and renamed), so a file with the final name is always complete. ``--backend dask`` runs the same
chunks as Dask tasks (:mod:`caloforge.dask_backend`), on a local cluster or a remote or batch one: the same file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from caloforge.conditions import Conditions, ConditionSampler, parse_angle_spec, parse_particles
from caloforge.dataset import ShowerFile, ShowerWriter
from caloforge.detector import Detector, load_detector

DEFAULT_CHUNK = 50
MAX_SHOWERS = 100_000_000  # per run (-n), and per chunk


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines the showers of a run (and nothing that does not, like the worker count)."""

    detector_json: str
    particle: str  # one particle or a list, "gamma,e-" (rows cycle over it)
    energy: str
    angle: str
    n: int
    seed: int
    chunk_size: int
    physics: str  # "standard" or "data-free", with "+bertini" when the hadronic placeholder is on
    position: str = "0,0"  # impact point spec (mm); runs recorded before positions existed hit the origin
    multiplicity: int = 1  # primaries per event (rows of conditions per shower row)
    fastsim: str = ""  # a model (shipped name or directory): e/gamma it takes get their shower from it
    fastsim_threshold_mev: float = 0.0  # 0: the model's lowest training energy

    @property
    def detector(self) -> Detector:
        return Detector.from_json(self.detector_json)

    @property
    def angled(self) -> bool:
        return parse_angle_spec(self.angle).bounds[1] > 0

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunk_rows(self, k: int) -> int:
        return min(self.chunk_size, self.n - k * self.chunk_size)

    @property
    def sampler(self) -> ConditionSampler:
        return ConditionSampler.parse(self.energy, self.angle, self.position, self.particle,
                                      self.detector.cell_size_mm or 0.0)

    def chunk_conditions(self, k: int) -> tuple[Conditions, int]:
        """The conditions and the Geant4 seed of chunk ``k``.

        Separate random streams per quantity keep the first rows of a chunk identical whatever its length.
        """
        m, first, mult = self.chunk_rows(k), k * self.chunk_size, self.multiplicity
        rngs = tuple(np.random.default_rng(np.random.SeedSequence([self.seed, k, j])) for j in (1, 2, 4))
        # Draw a whole chunk's worth and keep the first m rows: the first rows never depend on the run's length.
        cond = self.sampler.sample(self.chunk_size * mult, rngs, offset=first * mult)[:m * mult]
        g4_seed = int(np.random.SeedSequence([self.seed, k, 3]).generate_state(1)[0] % 2_147_483_647) or 1
        return cond, g4_seed

    def shows_same_showers(self, other: RunConfig) -> list[str]:
        """Fields (other than n) that differ: chunks of one run cannot be reused by the other."""
        a, b = asdict(self), asdict(other)
        return [k for k in a if k != "n" and a[k] != b[k]]


def resolve_physics(physics: str, hadronic: str = "none") -> str:
    """The run's physics: the EM list (``standard`` or ``data-free``), with ``+bertini`` for the hadronic
    placeholder (e/gamma runs keep the plain EM name they always had)."""
    from caloforge.geant4_setup import real_em_data
    from caloforge.physics import HADRONIC

    if physics == "auto":
        physics = "standard" if real_em_data() is not None else "data-free"
    if physics not in ("standard", "data-free"):
        raise ValueError(f"physics {physics!r}: expected auto, standard or data-free")
    if hadronic not in HADRONIC:
        raise ValueError(f"--hadronic {hadronic!r}: expected one of {', '.join(HADRONIC)}")
    return physics if hadronic == "none" else f"{physics}+{hadronic}"


def split_physics(physics: str) -> tuple[str, str]:
    """(EM list, hadronic list) of a run's physics string."""
    em, _, hadronic = physics.partition("+")
    return em, hadronic or "none"


# ---- worker side ---------------------------------------------------------------------------------
_APP = None
_CFG: RunConfig | None = None


def _exit_with_parent(parent: int) -> None:
    """Worker side: leave as soon as the driver process is gone (killed runs leave no Geant4 behind)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(cfg: RunConfig, quiet_stdout: bool = True, parent: int | None = None) -> None:
    global _APP, _CFG
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if quiet_stdout:  # Geant4 prints its banner and messages on stdout; keep the user's terminal clean
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    _CFG = cfg
    _APP = make_app(cfg)


def make_app(cfg: RunConfig):
    """The Geant4 application of a run: with its fast-simulation model when the run has one."""
    from caloforge.geant4_app import Geant4App

    fastsim = None
    if cfg.fastsim:
        import torch

        from caloforge.fastsim import FastSim

        torch.set_num_threads(1)  # one Geant4 and one model per worker process
        fastsim = FastSim.load(cfg.fastsim, cfg.detector, threshold_mev=cfg.fastsim_threshold_mev or None)
    em, hadronic = split_physics(cfg.physics)
    return Geant4App(cfg.detector, parse_particles(cfg.particle)[0], physics=em, fastsim=fastsim, hadronic=hadronic)


def simulate_chunk(app, cfg: RunConfig, k: int) -> dict[str, np.ndarray]:
    """Chunk ``k`` of the run with a Geant4 app: its conditions and showers as sparse arrays (what a chunk file
    holds; the same for any backend, worker or order)."""
    cond, g4_seed = cfg.chunk_conditions(k)
    if app.fastsim is not None:  # the model's noise depends on the chunk alone, not on the worker
        app.fastsim.seed, app.fastsim._calls = int(np.random.SeedSequence([cfg.seed, k, 5]).generate_state(1)[0]), 0
    showers = app.simulate(cond, seed=g4_seed, angled=cfg.angled, multiplicity=cfg.multiplicity)
    rows, cells = np.nonzero(showers)
    out = {"conditions": cond.as_array(), "rows": rows.astype(np.int32), "cells": cells.astype(np.int32),
           "values": showers[rows, cells], "n_cells": np.int64(showers.shape[1])}
    if app.gate:
        out.update({f"fastsim_{key}": v for key, v in app.last_records.items()})
    return out


def write_chunk(chunk_dir: str | Path, k: int, arrays: dict[str, np.ndarray]) -> None:
    """Write chunk ``k`` atomically (a temporary file renamed), so a chunk file that exists is complete."""
    final = Path(chunk_dir) / f"chunk-{k:06d}.npz"
    tmp = final.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, final)


def _run_chunk(args: tuple[int, str]) -> tuple[int, int]:
    k, chunk_dir = args
    assert _APP is not None and _CFG is not None
    arrays = simulate_chunk(_APP, _CFG, k)
    write_chunk(chunk_dir, k, arrays)
    return k, len(arrays["conditions"]) // _CFG.multiplicity


def _load_chunk(path: Path, cfg: RunConfig) -> tuple[Conditions, np.ndarray, dict[str, np.ndarray]]:
    """A chunk's conditions (the first primary of each event), showers and fast-simulation records."""
    with np.load(path, allow_pickle=False) as z:
        if "conditions" in z:
            cond = Conditions.from_array(z["conditions"])[::cfg.multiplicity]
        else:  # a chunk written before positions and particles were recorded: photons at the origin
            cond = Conditions.make(z["energies"], z["angles"], particle=parse_particles(cfg.particle)[0])
        showers = np.zeros((len(cond), int(z["n_cells"])), np.float32)
        showers[z["rows"], z["cells"]] = z["values"]
        records = {key.removeprefix("fastsim_"): z[key] for key in z.files if key.startswith("fastsim_")}
    return cond, showers, records


# ---- driver side ---------------------------------------------------------------------------------
def _chunk_dir(output: Path) -> Path:
    return Path(str(output) + ".chunks")


def _done_chunks(chunk_dir: Path, cfg: RunConfig) -> set[int]:
    done = set()
    for k in range(cfg.n_chunks):
        if (chunk_dir / f"chunk-{k:06d}.npz").exists():
            done.add(k)
    return done


def _prepare_chunk_dir(chunk_dir: Path, cfg: RunConfig) -> None:
    manifest = chunk_dir / "run.json"
    if manifest.exists():
        old = RunConfig(**json.loads(manifest.read_text()))
        diff = cfg.shows_same_showers(old)
        if diff:
            raise ValueError(
                f"{chunk_dir}: holds an unfinished run with different {', '.join(diff)}; "
                f"run the original command to finish it, or delete {chunk_dir} to start afresh"
            )
    chunk_dir.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cfg), indent=1))
    os.replace(tmp, manifest)


def _attrs(cfg: RunConfig, complete_rows: int) -> dict:
    from caloforge.geant4_app import geant4_version
    from caloforge.hadronic import LIMITS
    from caloforge.physics import physics_list_name

    d = cfg.detector
    em, hadronic = split_physics(cfg.physics)
    return {
        "source": "geant4",
        "particle": cfg.particle,
        "physics_list": physics_list_name(em == "standard", hadronic),
        "geant4_version": geant4_version(),
        "production_cut_mm": d.production_cut_mm,
        "seed": cfg.seed,
        "energy_spec": cfg.energy,
        "angle_spec": cfg.angle,
        "position_spec": cfg.position,
        "chunk_size": cfg.chunk_size,
        "run_config": json.dumps({**asdict(cfg), "n": complete_rows}),
    } | ({"physics_limits": LIMITS} if hadronic != "none" else {}) | (
        {"multiplicity": cfg.multiplicity} if cfg.multiplicity > 1 else {}) | ({
        "source": "geant4+fastsim", "fastsim_model": cfg.fastsim,
        "fastsim_threshold_mev": cfg.fastsim_threshold_mev} if cfg.fastsim else {})


def _merge(cfg: RunConfig, chunk_dir: Path, output: Path, chunks: list[int], snapshot: bool = False) -> int:
    rows = sum(cfg.chunk_rows(k) for k in chunks)
    attrs = _attrs(cfg, rows)
    if snapshot:
        attrs.update(snapshot=True, snapshot_of_n=cfg.n)
    writer = ShowerWriter(output, cfg.detector, cfg.detector.n_cells(cfg.angled), attrs)
    tables: list[dict[str, np.ndarray]] = []
    try:
        for k in chunks:
            cond, showers, records = _load_chunk(chunk_dir / f"chunk-{k:06d}.npz", cfg)
            writer.append(cond, showers)
            if records:
                tables.append(dict(records, event=records["event"] + k * cfg.chunk_size))
        if tables:
            from caloforge.fastsim import REASONS

            writer.add_table("fastsim", {key: np.concatenate([t[key] for t in tables]) for key in tables[0]},
                             {"reasons": json.dumps(REASONS), "units": "energy MeV, angle and xtilt deg, x y mm",
                              "about": "one row per particle entering the calorimeter: reason 0 = shower made by "
                                       "the fast-simulation model, else tracked by Geant4 (see reasons)"})
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return rows


def check_window(det: Detector, sampler: ConditionSampler) -> None:
    """Refuse angles and impact points whose showers the detector's readout window cannot hold."""
    lo_a, hi_a = sampler.angle.bounds
    if hi_a > 60:
        raise ValueError(f"--angle {sampler.angle.text!r}: the incidence angle must be within 0-60 degrees "
                         f"(the {det.name} readout window holds showers tilted up to 60 degrees towards +y)")
    if hi_a > 0 and det.is_uniform and not det.readout.n_y_angled:
        raise ValueError(f"--angle {sampler.angle.text!r}: detector {det.name!r} has no angled readout window "
                         f"(readout.n_y_angled); only normal incidence (angle 0)")
    (x0, x1), (y0, y1) = sampler.position.bounds
    (lo_x, hi_x), (lo_y, hi_y) = det.impact_region()
    if x0 < lo_x or x1 > hi_x or y0 < lo_y or y1 > hi_y:
        raise ValueError(f"--position {sampler.position.text!r}: impact points must lie within x {lo_x:g}..{hi_x:g}"
                         f" mm and y {lo_y:g}..{hi_y:g} mm (the readout window of {det.name}, less a margin)")


def simulate(detector: Detector | str, particle: str, energy: str, angle: str, n: int, seed: int,
             output: str | Path, workers: int | None = None, chunk_size: int = DEFAULT_CHUNK,
             physics: str = "auto", quiet: bool = False, overwrite: bool = False, position: str = "0,0",
             backend: str = "pool", scheduler: str | None = None, cluster: str | None = None,
             cluster_config: str | Path | None = None, retries: int = 3, multiplicity: int = 1,
             fastsim: str | Path | None = None, fastsim_threshold_gev: float | None = None,
             hadronic: str = "none") -> Path:
    """Simulate ``n`` showers into ``output`` (resumable, reproducible for a seed whatever ``workers``).

    ``particle``: one particle or a list ('gamma,e-'); ``position``: impact point spec in mm ('0,0', 'cell', ...).
    ``backend``: ``pool`` (local worker processes) or ``dask`` (a LocalCluster of ``workers`` processes, the
    scheduler at ``scheduler``, or a dask-jobqueue ``cluster`` with options from ``cluster_config``; see
    :mod:`caloforge.dask_backend`); the file is the same for either. ``multiplicity``: primaries per event (each
    shower row then holds the showers of that many particles). ``fastsim``: a model (shipped name or directory):
    e/gamma entering the calorimeter that it takes (above ``fastsim_threshold_gev``, default its lowest training
    energy) get their shower from the model inside the Geant4 run (:mod:`caloforge.fastsim`). ``hadronic``:
    ``bertini`` adds the data-free Bertini placeholder (:mod:`caloforge.hadronic`) that pions and protons need; the
    file records it and its limits.
    """
    from caloforge.geant4_app import check_hadronic
    from caloforge.progress import progress
    from caloforge.validate import check_int, check_output_file, check_seed

    if not 0 < n <= MAX_SHOWERS:
        raise ValueError(f"-n must be > 0 and <= {MAX_SHOWERS}, got {n}")
    if not 0 < chunk_size <= MAX_SHOWERS:
        raise ValueError(f"--chunk-size must be > 0 and <= {MAX_SHOWERS}, got {chunk_size}")
    if workers is not None and workers <= 0:
        raise ValueError(f"--workers must be > 0, got {workers}")
    check_int(workers, "--workers", 1, 4096)
    check_int(retries, "--retries", 0, 100)
    if backend not in ("pool", "dask"):
        raise ValueError(f"--backend {backend!r}: expected pool or dask")
    if (scheduler is not None and not scheduler.strip()) or (cluster_config is not None and not str(cluster_config)):
        raise ValueError("--scheduler and --cluster-config: empty value; expected an address or a file")
    if backend == "pool" and (scheduler or cluster or cluster_config):
        raise ValueError("--scheduler, --cluster and --cluster-config need --backend dask")
    if cluster_config and not cluster:
        raise ValueError("--cluster-config needs --cluster slurm|htcondor")
    if cluster and workers is None:
        raise ValueError(f"--cluster {cluster} needs --workers: the number of worker processes to request")
    if backend == "dask":
        from caloforge.dask_backend import check_options

        cluster_options = check_options(scheduler, cluster, cluster_config)
    check_seed(seed)
    check_int(multiplicity, "--multiplicity", 1, 1000)
    check_output_file(output, "-o")
    det = detector if isinstance(detector, Detector) else load_detector(detector)
    if not det.is_uniform and str(position).strip().lower() == "cell":
        raise ValueError(f"--position cell: detector {det.name!r} has cells of several sizes and shapes; give the "
                         f"impact points as 'X,Y' or 'X0:X1,Y0:Y1' (mm)")
    sampler = ConditionSampler.parse(energy, angle, position, particle, det.cell_size_mm or 0.0)
    check_window(det, sampler)
    run_physics = resolve_physics(physics, hadronic)
    check_hadronic(sampler.particles, split_physics(run_physics)[1])
    fastsim_spec, threshold_mev = "", 0.0
    if fastsim_threshold_gev is not None and not fastsim:
        raise ValueError("--fastsim-threshold needs --fastsim MODEL")
    if fastsim:
        from caloforge.fastsim import FastSim

        fastsim_spec = str(Path(fastsim).resolve()) if Path(fastsim).exists() else str(fastsim)
        if fastsim_threshold_gev is not None:
            from caloforge.conditions import MAX_ENERGY_GEV

            if not 0 < fastsim_threshold_gev <= MAX_ENERGY_GEV:  # also refuses NaN and inf
                raise ValueError(f"--fastsim-threshold {fastsim_threshold_gev!r}: expected an energy in "
                                 f"(0, {MAX_ENERGY_GEV:g}] GeV")
            threshold_mev = float(fastsim_threshold_gev) * 1e3
        FastSim.load(fastsim_spec, det, threshold_mev=threshold_mev or None)  # refuse a wrong model here, not later
    cfg = RunConfig(det.to_json(), ",".join(sampler.particles), sampler.energy.text, sampler.angle.text, int(n),
                    int(seed), int(chunk_size), run_physics, sampler.position.text, int(multiplicity),
                    fastsim_spec, threshold_mev)
    output = Path(output)
    if output.exists():
        if overwrite:
            output.unlink()
        else:
            with ShowerFile(output) as f:
                old = json.loads(f.attrs.get("run_config", "{}"))
                is_snapshot = bool(f.attrs.get("snapshot", False))
            if old == asdict(cfg) and not is_snapshot:
                if not quiet:
                    print(f"{output}: already complete ({n} showers), nothing to do")
                return output
            same_run = bool(old) and not cfg.shows_same_showers(RunConfig(**old))
            if not (is_snapshot and same_run):
                raise ValueError(f"{output}: exists and was made by another command; use --overwrite to replace it")
            # a snapshot of this very run: continue the run, the final merge replaces the snapshot
    chunk_dir = _chunk_dir(output)
    _prepare_chunk_dir(chunk_dir, cfg)
    done = _done_chunks(chunk_dir, cfg)
    todo = [k for k in range(cfg.n_chunks) if k not in done]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    done_rows = sum(cfg.chunk_rows(k) for k in done)
    if done and not quiet:
        print(f"{output}: resuming, {done_rows} of {n} showers already simulated")
    if todo:
        with progress(total=n, desc="geant4", unit="shower", quiet=quiet, initial=done_rows) as bar:
            if backend == "dask":
                from caloforge.dask_backend import open_client, run_chunks

                with open_client(workers, scheduler, cluster, cluster_options, str(cluster_config)) as client:
                    for m in run_chunks(client, cfg, chunk_dir, todo, retries):
                        bar.update(m)
            else:
                for m in _run_chunks(cfg, chunk_dir, todo, workers):
                    bar.update(m)
    _merge(cfg, chunk_dir, output, list(range(cfg.n_chunks)))
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return output


def _pool(cfg: RunConfig, workers: int) -> ProcessPoolExecutor:
    """Fresh worker processes (spawn: one Geant4 per process), each initialised for the run."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(cfg, True, os.getpid()))


def _run_chunks(cfg: RunConfig, chunk_dir: Path, todo: list[int], workers: int):
    """Run the chunks ``todo`` on ``workers`` processes; yields the showers of each finished chunk.

    At most ``2 * workers`` chunks are in flight, so an interrupted run loses little work. A worker that dies
    (a crash inside Geant4, the out-of-memory killer) raises a RuntimeError naming the chunk instead of hanging.
    """
    pending = list(reversed(todo))
    with _pool(cfg, workers) as pool:
        running: dict = {}
        try:
            while pending or running:
                while pending and len(running) < 2 * workers:
                    k = pending.pop()
                    running[pool.submit(_run_chunk, (k, str(chunk_dir)))] = k
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    k = running.pop(fut)
                    try:
                        yield fut.result()[1]
                    except BrokenProcessPool:
                        raise RuntimeError(
                            f"a Geant4 worker process died while simulating chunk {k} of {chunk_dir} (a crash or "
                            f"abort inside Geant4, the out-of-memory killer, or an error while starting Geant4: see "
                            f"any message above); the chunks finished so far are kept: run the same command again "
                            f"to continue") from None
        finally:
            for fut in running:
                fut.cancel()


def snapshot(output: str | Path, to: str | Path) -> int:
    """Merge the chunks an unfinished (or running) simulation of ``output`` has finished into ``to``.

    Only the leading run of finished chunks is taken, so the snapshot is a prefix of the final file; it is
    marked with the attribute ``snapshot``. ``to`` may be the run's own output path: running the simulation
    command again then continues the run and replaces the snapshot with the complete file.
    Returns the number of showers written.
    """
    chunk_dir = _chunk_dir(Path(output))
    manifest = chunk_dir / "run.json"
    if not manifest.exists():
        raise ValueError(f"{chunk_dir}: no unfinished simulation to snapshot")
    cfg = RunConfig(**json.loads(manifest.read_text()))
    done = _done_chunks(chunk_dir, cfg)
    prefix = []
    while len(prefix) in done:
        prefix.append(len(prefix))
    if not prefix:
        raise ValueError(f"{chunk_dir}: no finished chunk yet")
    return _merge(cfg, chunk_dir, Path(to), prefix, snapshot=True)


def time_geant4(detector: Detector | str, particle: str, energy_gev: float, n_showers: int,
                physics: str = "auto", seed: int = 1, hadronic: str = "none") -> float:
    """Geant4 ms per shower at a fixed energy and normal incidence, in one fresh worker process.

    Start-up and physics-table building are excluded (one warm-up shower first).
    """
    det = detector if isinstance(detector, Detector) else load_detector(detector)
    cfg = RunConfig(det.to_json(), ",".join(parse_particles(particle)), str(energy_gev), "0", n_showers, seed,
                    n_showers, resolve_physics(physics, hadronic))
    with _pool(cfg, 1) as pool:
        return pool.submit(_time_in_worker, float(energy_gev), int(n_showers), seed).result()


def _time_in_worker(energy_gev: float, n: int, seed: int) -> float:
    assert _APP is not None
    _APP.simulate(np.array([energy_gev * 1e3]), np.zeros(1), seed)
    t0 = time.perf_counter()
    _APP.simulate(np.full(n, energy_gev * 1e3), np.zeros(n), seed + 1)
    return (time.perf_counter() - t0) / n * 1e3


# ---- CLI -----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default="ild-ecal", help="built-in detector name or a .toml/.yaml file")
    p.add_argument("--particle", default="gamma",
                   help="e-, e+, gamma (or pi+, pi-, proton with --hadronic bertini), or a list 'gamma,e-' (rows "
                        "cycle over it)")
    p.add_argument("--energy", default="10:100",
                   help="GeV: '50' fixed, '10:100' uniform, 'log:10:100' log-uniform, '20,50,80' points")
    p.add_argument("--angle", default="0", help="incidence angle in degrees, tilting towards +y: '0', '0:60', "
                                                "'0,30,60'")
    p.add_argument("--position", default="0,0",
                   help="impact point (x, y) in mm: '0,0' fixed, 'cell' uniform over one cell, '0:5,0:5' uniform, "
                        "'0,0;2.5,2.5' points; point specs of energy, angle, position and particle form a grid")
    p.add_argument("-n", type=int, help="number of showers (required unless --snapshot)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--output", required=True, help="output HDF5 file")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores); with --backend dask the LocalCluster's or batch "
                        "cluster's workers (ignored with --scheduler)")
    p.add_argument("--backend", choices=["pool", "dask"], default=None,
                   help="pool: local process pool (default); dask: Dask tasks (a LocalCluster by default; implied by "
                        "--scheduler and --cluster)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="with dask: a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--cluster", choices=["slurm", "htcondor"],
                   help="with dask: start a dask-jobqueue batch cluster of --workers workers")
    p.add_argument("--cluster-config", metavar="FILE",
                   help="TOML/YAML table of dask-jobqueue options for --cluster (cores, memory, queue, walltime, ...)")
    p.add_argument("--retries", type=int, default=3, help="with dask: retries of a chunk whose task fails (default 3)")
    p.add_argument("--multiplicity", type=int, default=1,
                   help="primaries per event, each drawn from the condition specs (default 1); a row of the file "
                        "holds the showers of all of them")
    p.add_argument("--fastsim", metavar="MODEL",
                   help="fast simulation inside Geant4: e/gamma entering the calorimeter that this model (shipped "
                        "name or directory) takes get their shower from it; everything else is tracked by Geant4")
    p.add_argument("--fastsim-threshold", type=float, metavar="GEV",
                   help="e/gamma below this energy are tracked by Geant4 (default: the model's lowest training "
                        "energy)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help="showers per chunk (part of the run's identity: changing it changes the showers)")
    p.add_argument("--physics", default="auto", choices=["auto", "standard", "data-free"],
                   help="auto: G4EmStandardPhysics when Geant4 data sets are configured, else data-free EM list")
    p.add_argument("--hadronic", default="none", choices=["none", "bertini"],
                   help="hadronic physics: none (e/gamma showers) or bertini, a data-free PLACEHOLDER (Bertini cascade "
                        "at all energies, crude low-energy neutrons; not a validated hadronic reference) that pi+, "
                        "pi- and proton need; recorded with its limits in the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--snapshot", metavar="PATH",
                   help="do not simulate: write the showers an unfinished run has finished so far to PATH")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.snapshot:
        from caloforge.validate import check_output_file

        check_output_file(args.snapshot, "--snapshot")
        rows = snapshot(args.output, args.snapshot)
        if not args.quiet:
            print(f"{args.snapshot}: {rows} showers from the unfinished run of {args.output}")
        return 0
    if args.n is None:
        raise ValueError("-n is required (the number of showers to simulate)")
    t0 = time.perf_counter()
    out = simulate(args.detector, args.particle, args.energy, args.angle, args.n, args.seed, args.output,
                   workers=args.workers, chunk_size=args.chunk_size, physics=args.physics, quiet=args.quiet,
                   overwrite=args.overwrite, position=args.position, retries=args.retries,
                   backend=args.backend or ("dask" if args.scheduler or args.cluster else "pool"),
                   scheduler=args.scheduler, cluster=args.cluster, cluster_config=args.cluster_config,
                   multiplicity=args.multiplicity, fastsim=args.fastsim, fastsim_threshold_gev=args.fastsim_threshold,
                   hadronic=args.hadronic)
    if not args.quiet:
        print(f"{out}: {args.n} showers ({time.perf_counter() - t0:.0f} s)")
    return 0
