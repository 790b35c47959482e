"""Geant4 production on a Dask cluster: the chunks of ``caloforge simulate --backend dask`` as Dask tasks.

The chunks are the ones of the process-pool path (chunk ``k`` depends on the run and ``k`` alone), so the merged file
is the same file. A task returns its chunk's sparse arrays to the client, which writes the chunk file atomically:
workers of a remote cluster need no file system shared with the client, and a chunk file that exists is complete,
so an interrupted run resumes exactly as the pool path does. A task that raises is retried (``retries``), and a
task whose worker dies (crash, out-of-memory killer, a batch job's end) is rescheduled by Dask on another worker
(up to ``distributed.scheduler.allowed-failures`` deaths).

Clusters: a ``LocalCluster`` of ``workers`` processes by default, a running scheduler (``scheduler`` address), or a
dask-jobqueue batch cluster (``cluster`` = slurm or htcondor, its options in a TOML/YAML file). Workers need
caloforge and geant4-pybind installed (the same versions as the client).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = 'pip install "caloforge[dask]"'
#: dask-jobqueue cluster classes by --cluster name
JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "htcondor": "HTCondorCluster"}
#: how long to try to reach a --scheduler
CONNECT_TIMEOUT = "30s"


class DaskBackendError(ValueError):
    """The Dask backend cannot run as asked (a missing package, a bad cluster configuration)."""


def import_distributed():
    """``dask.distributed``, or a clear error naming the install command."""
    try:
        import distributed
    except ImportError:
        raise DaskBackendError(f"--backend dask needs the packages dask and distributed: {INSTALL_HINT}") from None
    return distributed


# ---- worker side ---------------------------------------------------------------------------------
# One Geant4 per worker process, driven from one dedicated thread: Geant4 keeps thread-local state, and Dask may
# run tasks on any of its executor threads.
_LOCK = threading.Lock()
_WORKER: dict[str, Any] = {}


def _start_geant4(cfg) -> Any:
    import os

    from caloforge.simulate import make_app

    devnull = os.open(os.devnull, os.O_WRONLY)  # Geant4 prints its banner and messages on stdout
    os.dup2(devnull, 1)
    return make_app(cfg)  # with the run's fast-simulation model, if any


def chunk_task(cfg_json: str, k: int) -> dict[str, np.ndarray]:
    """Dask task: simulate chunk ``k`` of the run ``cfg_json`` (a RunConfig as JSON) and return its arrays."""
    from caloforge.simulate import RunConfig, simulate_chunk

    cfg = RunConfig(**json.loads(cfg_json))
    # what the worker's app is built from (the other fields vary from chunk to chunk or run to run harmlessly)
    key = json.dumps({name: v for name, v in asdict(cfg).items()
                      if name in ("detector_json", "physics", "fastsim", "fastsim_threshold_mev")})
    with _LOCK:
        if not _WORKER:
            thread = ThreadPoolExecutor(1, thread_name_prefix="geant4")
            _WORKER.update(key=key, thread=thread, app=thread.submit(_start_geant4, cfg).result())
        elif _WORKER["key"] != key:
            raise RuntimeError("this Dask worker process already runs Geant4 for another detector, physics list or "
                               "fast-simulation model (one Geant4 per process): give each run its own workers")
    return _WORKER["thread"].submit(simulate_chunk, _WORKER["app"], cfg, k).result()


# ---- client side ---------------------------------------------------------------------------------
def load_cluster_config(path: str | Path | None) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster class from a TOML or YAML table (empty without a file)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise DaskBackendError(f"--cluster-config {p}: file not found")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise DaskBackendError(f"--cluster-config {p}: expected a .toml, .yaml or .yml file")
    except DaskBackendError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise DaskBackendError(f"--cluster-config {p}: invalid {p.suffix[1:].upper()} ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise DaskBackendError(f"--cluster-config {p}: expected a table of dask-jobqueue options (cores, memory, "
                               f"queue, walltime, ...), got {type(data).__name__}")
    return data


def make_jobqueue_cluster(kind: str, options: dict[str, Any], source: str = "--cluster-config"):
    """A dask-jobqueue cluster (not yet scaled). One thread per worker process: one Geant4 per process."""
    if kind not in JOBQUEUE_CLUSTERS:
        raise DaskBackendError(f"--cluster {kind!r}: expected one of {', '.join(JOBQUEUE_CLUSTERS)}")
    try:
        import dask_jobqueue
    except ImportError:
        raise DaskBackendError(f"--cluster {kind} needs the package dask-jobqueue: {INSTALL_HINT}") from None
    opts = dict(options)
    if "cores" in opts and "processes" not in opts:
        opts["processes"] = opts["cores"]
    try:
        return getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[kind])(**opts)
    except (TypeError, ValueError) as err:
        raise DaskBackendError(f"{source}: options {sorted(opts)} rejected by dask-jobqueue's "
                               f"{JOBQUEUE_CLUSTERS[kind]}: {err}") from None


_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")


def check_scheduler_address(address: str) -> str:
    """``tcp://host:port`` (scheme and port optional; ``inproc://...`` too), or a clear error before any work."""
    m = _ADDRESS.match(address)
    port_ok = m is not None and (m.group(1) is None or 0 < int(m.group(1)) < 65536)
    if not (address.startswith("inproc://") and len(address) > 9) and not port_ok:
        raise DaskBackendError(f"--scheduler {address!r}: expected a Dask scheduler address such as "
                               f"tcp://host:8786")
    return address


def check_cluster_options(kind: str, options: dict[str, Any], source: str) -> dict[str, Any]:
    """The batch cluster's options, checked before any work: known to dask-jobqueue's cluster and job classes, and
    the sizes (cores, processes, memory) positive. Without dask-jobqueue, only the sizes."""
    import inspect

    try:
        import dask_jobqueue
    except ImportError:
        known = None
    else:
        cls = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[kind])
        known = {p.name for k in (*cls.__mro__, *cls.job_cls.__mro__) if "__init__" in vars(k)
                 for p in inspect.signature(vars(k)["__init__"]).parameters.values()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    if known is not None and (unknown := sorted(set(options) - known)):
        raise DaskBackendError(f"{source}: unknown option {unknown[0]!r} for --cluster {kind}; expected options of "
                               f"dask-jobqueue's {JOBQUEUE_CLUSTERS[kind]} such as cores, memory, queue, walltime")
    for key in ("cores", "processes", "n_workers"):
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 - (key == "n_workers") <= v
                              <= 4096):
            raise DaskBackendError(f"{source}: option {key!r} is {v!r:.60}; expected an integer in "
                                   f"[{1 - (key == 'n_workers')}, 4096]")
    if "memory" in options:
        from dask.utils import parse_bytes

        v = options["memory"]
        try:
            ok = isinstance(v, str) and parse_bytes(v) > 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise DaskBackendError(f"{source}: option 'memory' is {v!r:.60}; expected a size such as '4GB'")
    return options


def check_options(scheduler: str | None, cluster: str | None, cluster_config: str | Path | None) -> dict[str, Any]:
    """Check the backend's options before any work starts; returns the batch cluster's options."""
    import_distributed()
    if scheduler and cluster:
        raise DaskBackendError("--scheduler and --cluster exclude each other: connect to a running scheduler, or "
                               "let caloforge start a batch cluster")
    if scheduler is not None:
        check_scheduler_address(scheduler)
    if cluster and cluster not in JOBQUEUE_CLUSTERS:
        raise DaskBackendError(f"--cluster {cluster!r}: expected one of {', '.join(JOBQUEUE_CLUSTERS)}")
    options = load_cluster_config(cluster_config)
    return check_cluster_options(cluster, options, f"--cluster-config {cluster_config}") if cluster else options


@contextmanager
def open_client(workers: int, scheduler: str | None = None, cluster: str | None = None,
                cluster_options: dict[str, Any] | None = None, source: str = "--cluster-config") -> Iterator[Any]:
    """A Dask client: on a running scheduler, on a batch cluster of ``workers`` workers, or on a LocalCluster of
    ``workers`` single-threaded processes; the clusters it starts are closed on exit."""
    import logging

    distributed = import_distributed()
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as err:
            raise DaskBackendError(f"--scheduler {scheduler}: cannot connect ({err})") from None
        with client:
            yield client
        return
    if cluster:
        jq = make_jobqueue_cluster(cluster, cluster_options or {}, source)
        with jq, distributed.Client(jq) as client:
            jq.scale(n=workers)
            yield client
        return
    local = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None, silence_logs=logging.ERROR)
    with local, distributed.Client(local) as client:
        yield client


def run_chunks(client, cfg, chunk_dir: Path, todo: list[int], retries: int = 3) -> Iterator[int]:
    """Submit the chunks ``todo`` as Dask tasks; write each finished chunk into ``chunk_dir`` (atomically) as it
    arrives and yield its number of showers."""
    from caloforge.simulate import write_chunk

    distributed = import_distributed()
    cfg_json = json.dumps(asdict(cfg))
    run_tag = uuid.uuid4().hex[:8]
    futures = {client.submit(chunk_task, cfg_json, k, key=f"caloforge-chunk-{run_tag}-{k:06d}", retries=retries,
                             pure=False): k for k in todo}
    pending = set(futures)
    try:
        for fut in distributed.as_completed(futures):
            k = futures[fut]
            try:
                arrays = fut.result()
            except distributed.KilledWorker:
                raise RuntimeError(
                    f"chunk {k} of {chunk_dir}: every Dask worker that ran it died (a crash inside Geant4 or the "
                    f"out-of-memory killer); the chunks finished so far are kept: run the same command again to "
                    f"continue") from None
            except Exception as err:
                raise RuntimeError(f"chunk {k} of {chunk_dir} failed on a Dask worker after {retries} retries: "
                                   f"{type(err).__name__}: {err}; the chunks finished so far are kept: run the "
                                   f"same command again to continue") from err
            write_chunk(chunk_dir, k, arrays)
            pending.discard(fut)
            fut.release()
            yield len(arrays["conditions"]) // cfg.multiplicity  # events (rows of the file)
    finally:
        if pending:
            client.cancel(list(pending))
