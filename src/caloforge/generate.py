"""Generate showers with a trained model into a shower file that ``caloforge evaluate`` reads directly.

Conditions come from specs (``--energy`` in GeV: ``50``, ``10:100``, ``log:10:100``, ``20,50,80``; ``--angle`` in
degrees; ``--position`` in mm; ``--particle``) or from the rows of a reference file (``--conditions-from REF.h5``).
The readout window (normal, or angled for angles > 0) follows from the conditions and the detector. Generation is
batched and seeded: the same model, conditions, seed and batch size give the same file.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

#: Bounds of -n and --batch-size (all conditions are drawn up front; a batch of showers is held in memory).
MAX_SHOWERS = 100_000_000
MAX_BATCH = 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="trained model directory (runs/NAME); default: the shipped pretrained model")
    p.add_argument("-n", "--n-showers", type=int, help="number of showers (default: all rows of --conditions-from)")
    p.add_argument("--energy", default="10:100", help="incident energy spec in GeV: 50 | 10:100 | log:10:100 | "
                                                       "20,50,80 (default 10:100)")
    p.add_argument("--angle", default="0", help="incidence angle spec in degrees, tilting towards +y (default 0)")
    p.add_argument("--position", default="0,0", help="impact point spec in mm: '0,0' | 'cell' (uniform over one "
                                                      "cell) | '0:5,0:5' | '0,0;2.5,2.5' (default 0,0)")
    p.add_argument("--particle", default=None, help="gamma, e- or e+, or a list 'gamma,e-' (default: photons "
                                                     "where the model takes them, else its particle)")
    p.add_argument("--conditions-from", metavar="REF.h5",
                   help="take the conditions (energy, angle, impact point, particle) row by row from a shower file")
    p.add_argument("-o", "--output", required=True, help="output shower file (.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or auto (default). The same seed gives the same showers on the same kind of "
                        "device; CPU and CUDA draw different random numbers, so their showers differ (same "
                        "distribution). The file's 'device' attribute says which was used.")
    p.add_argument("--batch-size", type=int, default=1000, help="showers per model call (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the conditions and of the model noise")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--format", default="dense", choices=["dense", "sparse"],
                   help="dense: the CaloChallenge 'showers' array (default); sparse: the hits only (hit_offsets, "
                        "hit_cells, hit_energies), read back as dense showers by every caloforge command")
    p.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"],
                   help="HDF5 compression of the showers: gzip (level 1; default, smallest), lzf (faster, "
                        "larger) or none (fastest, largest)")
    add_sampling_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


class _BackgroundWriter:
    """Appends batches to a :class:`~caloforge.dataset.ShowerWriter` from a thread of its own, so that batch k is
    checked, compressed and written while batch k + 1 is generated. Until :meth:`finish` that thread is the only one
    touching the file (h5py serialises its calls; one thread owning the file is safe). Its first error stops the
    writing and is raised in the generating thread at the next :meth:`put` or at :meth:`finish`."""

    def __init__(self, writer, depth: int = 1):
        self.writer = writer
        self.depth = depth  # batches queued beside the one being written
        self.error: BaseException | None = None
        self.write_s = 0.0  # time spent appending, in the writer thread
        self.wait_s = 0.0  # time the generating thread waited for the writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, name="caloforge-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:  # after an error: drain the queue without writing
                t0 = time.perf_counter()
                try:
                    method, args = item
                    getattr(self.writer, method)(*args)
                except BaseException as err:  # noqa: BLE001 - handed to the generating thread
                    self.error = err
                self.write_s += time.perf_counter() - t0

    def put(self, method: str, *args) -> None:
        """Queue ``writer.<method>(*args)`` (``append`` or ``append_hits``)."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self._queue.put((method, args))
        self.wait_s += time.perf_counter() - t0

    def finish(self, raise_error: bool = True) -> None:
        """Wait until every batch is written (call it also after an error), then raise the writer's error."""
        t0 = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        self.wait_s += time.perf_counter() - t0
        if raise_error and self.error is not None:
            raise self.error


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """``--steps`` and ``--solver``: the sampling knobs of families that integrate an ODE (cfm)."""
    p.add_argument("--steps", type=int, default=None,
                   help="ODE steps of models that integrate one (cfm; default: the model's config)")
    p.add_argument("--solver", default=None, help="ODE solver of such models: euler, midpoint or heun")


def apply_sampling(model, steps: int | None, solver: str | None) -> dict:
    """Set ``--steps``/``--solver`` on a model that takes them (a ValueError for one-pass families); returns the
    file attributes that record them."""
    from caloforge.validate import check_int

    if steps is None and solver is None:
        return {}
    if not hasattr(model, "set_sampling"):
        raise ValueError(f"--steps/--solver: the {model.family} model makes a shower in one pass; only families that "
                         f"integrate an ODE (cfm) take them")
    if steps is not None:
        check_int(steps, "--steps", 1, 10000)
    model.set_sampling(steps=steps, solver=solver)
    return {"sampling_steps": int(model.sample_steps), "sampling_solver": str(model.solver)}


class _BufferRing:
    """Dense batches written into a few host buffers used in turn instead of a fresh array per batch: on a small
    virtual machine the first touch of new memory costs about 1 ms per MB (0.1 ms per 108 kB house shower, as much
    as the model), and a fresh pinned buffer per batch costs a page-locking call. ``size`` buffers serve a writer
    that holds one batch and queues ``size - 2`` more while the next is made. Buffers are made on first use at the
    first batch's size and are pinned when the model runs on a GPU."""

    def __init__(self, size: int):
        self.size = size
        self._buffers: list = []
        self._next = 0

    def take(self, n: int, n_cells: int, pinned: bool):
        """A (n, n_cells) float32 torch tensor on the host (pinned if asked), not in use by the writer."""
        import torch

        i = self._next
        self._next = (i + 1) % self.size
        if i == len(self._buffers) or self._buffers[i].shape[0] < n or self._buffers[i].shape[1] != n_cells:
            buf = torch.empty((n, n_cells), dtype=torch.float32, pin_memory=pinned)
            self._buffers[i:i + 1] = [buf]
        return self._buffers[i][:n]


def _generate_batch(model, c, gen, angled: bool, layout: str, ring: _BufferRing) -> tuple[str, tuple]:
    """Generate one batch and hand it to the writer: the hits straight from the model (sparse: only they cross to the
    host, and families that make hits directly never build the dense window), or the dense array in a reused host
    buffer (from a GPU through pinned memory: a pageable copy runs at a tenth of the speed)."""
    import torch

    if layout == "sparse":
        pieces = model.sample_hit_pieces(c, generator=gen, angled=angled, cell_dtype=torch.int32)
        return "append_hits", tuple([t.cpu().numpy() for t in ts] for ts in pieces)  # joined by the writer
    on_gpu = model.cond_mean.device.type != "cpu"
    host = ring.take(len(c), int(np.prod(model.window_shape(angled))), pinned=on_gpu)
    if on_gpu:
        host.copy_(model.sample(c, generator=gen, angled=angled))
    else:
        model.sample(c, generator=gen, angled=angled, out=host)
    return "append", (host.numpy(),)


def draw_conditions(sampler, n: int, seed: int):
    """The ``n`` rows of conditions a :class:`~caloforge.conditions.ConditionSampler` gives for ``seed`` (what
    :func:`generate_file` generates at)."""
    rngs = tuple(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    return sampler.sample(n, rngs)


def generate_file(model, output: str | Path, n: int, sampler=None, conditions=None, batch_size: int = 1000,
                  seed: int = 0, quiet: bool = True, attrs: dict | None = None, angled: bool | None = None,
                  layout: str = "dense", compression: str = "gzip", overlap: bool = True,
                  stats: dict | None = None) -> Path:
    """Generate ``n`` showers with ``model`` into ``output``; conditions from a
    :class:`~caloforge.conditions.ConditionSampler` or an explicit :class:`~caloforge.conditions.Conditions`.

    ``angled`` picks the readout window (default: angled when any requested angle is > 0). ``layout`` (``dense`` or
    ``sparse``) and ``compression`` (``gzip``, ``lzf``, ``none``) choose the file layout (same showers either way).
    ``overlap``: write batch k in a background thread while batch k + 1 is generated (the file is the same). An error
    on either side removes the unfinished file. ``stats``: filled with seconds spent in the model (``model_s``),
    writing (``write_s``, in the writer thread when overlapping) and waiting for the writer (``wait_s``).
    The sparse layout takes the hits straight from the model (:meth:`~caloforge.models.ShowerModel.sample_hits`,
    computed where the model runs; only the hits cross to the host); dense showers from a GPU go through pinned
    memory. Both layouts hold the same showers.
    """
    import torch

    from caloforge.dataset import ShowerWriter
    from caloforge.models import ConditionsWarning
    from caloforge.progress import progress

    if n <= 0:
        raise ValueError(f"number of showers must be > 0, got {n}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {batch_size}")
    gen = torch.Generator(device=model.cond_mean.device).manual_seed(seed)
    if conditions is not None:
        if len(conditions) < n:
            raise ValueError(f"{n} showers requested but only {len(conditions)} rows of conditions given")
        conditions = conditions[:n]
    else:
        conditions = draw_conditions(sampler, n, seed)
    model.check_conditions(conditions, str(output))
    if angled is None:
        angled = bool(np.any(conditions.angle > 0))
    shape = model.window_shape(angled)
    meta = {
        "source": f"model:{model.family}",
        "model": str(model.meta.get("path", "")),
        "model_family": model.family,
        "seed": seed,
        "batch_size": batch_size,
        "particle": ",".join(sorted(set(conditions.particles))),
        "device": str(model.cond_mean.device),
    }
    if sampler is not None:
        meta.update(energy_spec=sampler.energy.text, angle_spec=sampler.angle.text,
                    position_spec=sampler.position.text)
    meta.update(attrs or {})
    model_s = 0.0
    with ShowerWriter(output, model.detector, int(np.prod(shape)), meta, compression, layout) as writer, \
            progress(n, desc=f"generate {model.family}", unit="shower", quiet=quiet) as bar, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", ConditionsWarning)  # warned once above
        bg = _BackgroundWriter(writer) if overlap else None
        ring = _BufferRing(bg.depth + 2 if bg is not None else 1)
        try:
            for start in range(0, n, batch_size):
                c = conditions[start:start + batch_size]
                t0 = time.perf_counter()
                method, payload = _generate_batch(model, c, gen, angled, layout, ring)
                model_s += time.perf_counter() - t0
                if bg is not None:
                    bg.put(method, c, *payload)
                else:
                    t0 = time.perf_counter()
                    getattr(writer, method)(c, *payload)
                    if stats is not None:
                        stats["write_s"] = stats.get("write_s", 0.0) + time.perf_counter() - t0
                bar.update(len(c))
        except BaseException:
            if bg is not None:
                bg.finish(raise_error=False)  # the writer thread stops before the file is removed
            raise
        if bg is not None:
            bg.finish()
    if stats is not None:
        stats["model_s"] = model_s
        if bg is not None:
            stats.update(write_s=bg.write_s, wait_s=bg.wait_s)
        stats.setdefault("wait_s", 0.0)
    return Path(output)


def run(args: argparse.Namespace) -> int:
    import torch

    from caloforge.conditions import ConditionSampler
    from caloforge.dataset import ShowerFile
    from caloforge.models import DEFAULT_MODELS, load_default_model, load_model
    from caloforge.train import pick_device
    from caloforge.validate import check_int, check_output_file, check_seed

    check_output_file(args.output, "-o", overwrite=args.overwrite)
    check_int(args.n_showers, "-n", 1, MAX_SHOWERS)
    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    check_int(args.threads, "--threads", 0, 4096)
    check_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # without --model: the specs are read with the first shipped default, which the conditions may then overrule
    model = load_model(args.model or DEFAULT_MODELS[0], device=device)
    conditions = sampler = None
    angled = None
    if args.conditions_from:
        if Path(args.conditions_from).resolve() == Path(args.output).resolve():
            raise ValueError(f"{args.output}: is the --conditions-from file; write to another file")
        with ShowerFile(args.conditions_from) as ref:
            if ref.detector is not None and ref.detector.to_dict() != model.detector.to_dict():
                raise ValueError(f"{args.conditions_from}: attribute 'detector' is {ref.detector.name!r}; the model "
                                 f"was trained for {model.detector.name!r}")
            conditions = ref.conditions
            angled = ref.detector is not None and ref.n_cells != ref.detector.n_cells(False)
        n = args.n_showers if args.n_showers is not None else len(conditions)
        if n > len(conditions):
            raise ValueError(f"{args.conditions_from}: -n {n} but the file has only {len(conditions)} rows of "
                             f"conditions")
    else:
        if args.n_showers is None:
            raise ValueError("-n is required unless --conditions-from is given")
        n = args.n_showers
        particle = args.particle or model.default_particle
        sampler = ConditionSampler.parse(args.energy, args.angle, args.position, particle,
                                         model.detector.cell_size_mm)
    if args.model is None:  # the shipped default that covers these conditions
        if conditions is None:
            conditions = draw_conditions(sampler, n, args.seed)
        model = load_default_model(conditions[:n], device=device, first=model, angled=bool(angled))
        if not args.quiet:
            print(f"caloforge generate: the shipped model {model.meta['name']!r} (no --model given)",
                  file=sys.stderr)
    sampling = apply_sampling(model, args.steps, args.solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate_file(model, args.output, n, sampler, conditions, args.batch_size, args.seed, args.quiet,
                            attrs={**sampling, **({"conditions_from": str(args.conditions_from)}
                                                  if args.conditions_from else {})} or None,
                            angled=angled, layout=args.format, compression=args.compression)
    for w in caught:
        print(f"caloforge generate: warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {n} showers to {out}", file=sys.stderr)
    return 0
