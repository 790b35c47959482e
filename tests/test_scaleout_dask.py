"""Geant4 production on Dask: the same file as the process pool, resumable, nothing lost when a worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from caloforge.dask_backend import DaskBackendError, load_cluster_config, make_jobqueue_cluster
from caloforge.simulate import simulate

distributed = pytest.importorskip("distributed")

RUN = dict(detector="ild-ecal", particle="gamma", angle="0", seed=5, chunk_size=3, quiet=True)


def _same_file(a, b) -> None:
    """Same datasets bit for bit and the same attributes; the files themselves are byte-identical too."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert sorted(fa) == sorted(fb)
        for key in fa:
            assert fa[key].dtype == fb[key].dtype and np.array_equal(fa[key][()], fb[key][()]), key
        assert {k: str(v) for k, v in fa.attrs.items()} == {k: str(v) for k, v in fb.attrs.items()}
    assert open(a, "rb").read() == open(b, "rb").read()


def test_local_cluster_gives_the_pool_file(tmp_path):
    pool = simulate(energy="1:3", n=10, output=tmp_path / "pool.h5", workers=2, **RUN)
    dask = simulate(energy="1:3", n=10, output=tmp_path / "dask.h5", workers=2, backend="dask", **RUN)
    _same_file(pool, dask)
    assert not (tmp_path / "dask.h5.chunks").exists()


def test_a_worker_killed_mid_chunk_loses_nothing(tmp_path):
    """SIGKILL a Dask worker while it simulates a chunk: Dask reruns the chunk elsewhere, the file is unchanged."""
    import logging

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=logging.CRITICAL)
    kw = dict(energy="20", n=12, workers=2, chunk_size=2, detector="ild-ecal", particle="gamma", angle="0", seed=3,
              quiet=True)
    errors: list[BaseException] = []
    killed: list[int] = []
    with cluster, distributed.Client(cluster) as client:
        def target():
            try:
                simulate(output=tmp_path / "dask.h5", backend="dask", scheduler=cluster.scheduler_address, **kw)
            except BaseException as err:  # noqa: BLE001 - the test inspects it
                errors.append(err)

        thread = threading.Thread(target=target)
        thread.start()
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            # kill a worker once it has been running a caloforge chunk for a moment (Geant4 started, mid-chunk)
            busy = [w for w, keys in client.processing().items() if any("caloforge-chunk" in str(k) for k in keys)]
            if busy and list((tmp_path / "dask.h5.chunks").glob("chunk-*.npz")):
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)
        thread.join(300)
    assert killed, "no worker was busy with a chunk"
    assert not errors, errors
    ref = simulate(output=tmp_path / "pool.h5", **kw)
    _same_file(ref, tmp_path / "dask.h5")


def test_killed_dask_run_resumes_to_the_same_file(tmp_path):
    out = tmp_path / "run.h5"
    cmd = [sys.executable, "-m", "caloforge", "simulate", "--backend", "dask", "--energy", "20", "-n", "16",
           "--seed", "4", "--chunk-size", "2", "--workers", "2", "-q", "-o", str(out)]
    proc = subprocess.Popen(cmd)
    chunk_dir = tmp_path / "run.h5.chunks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunk_dir.glob("chunk-*.npz"))) < 2:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    n_done = len(list(chunk_dir.glob("chunk-*.npz")))
    assert not out.exists() and 2 <= n_done < 8
    subprocess.run(cmd, check=True)  # resumes: only the missing chunks are simulated
    assert out.exists() and not chunk_dir.exists()
    ref = simulate("ild-ecal", "gamma", "20", "0", 16, 4, tmp_path / "ref.h5", workers=2, chunk_size=2, quiet=True)
    _same_file(ref, out)


def test_bad_backend_options_are_refused(tmp_path, capsys, monkeypatch):
    from caloforge import dask_backend
    from caloforge.cli import main

    monkeypatch.setattr(dask_backend, "CONNECT_TIMEOUT", "1s")
    out = str(tmp_path / "x.h5")
    with pytest.raises(ValueError, match="need --backend dask"):
        simulate(energy="3", n=2, output=out, backend="pool", scheduler="tcp://127.0.0.1:1", **RUN)
    with pytest.raises(ValueError, match="--cluster-config needs --cluster"):
        simulate(energy="3", n=2, output=out, backend="dask", cluster_config="c.toml", **RUN)
    with pytest.raises(DaskBackendError, match="cannot connect"):
        simulate(energy="3", n=2, output=out, backend="dask", scheduler="tcp://127.0.0.1:9", **RUN)
    with pytest.raises(ValueError, match="needs --workers"):
        simulate(energy="3", n=2, output=out, backend="dask", cluster="slurm", **RUN)
    assert main(["simulate", "-n", "2", "-o", out, "--cluster", "slurm", "--workers", "4", "--cluster-config",
                 str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("kind, suffix, text, expect", [
    ("slurm", ".toml", 'cores = 4\nmemory = "8GB"\nqueue = "short"\nwalltime = "02:00:00"\n',
     ["#SBATCH -p short", "#SBATCH -t 02:00:00", "--nworkers 4", "--nthreads 1"]),
    ("htcondor", ".yaml", "cores: 2\nmemory: 4GB\ndisk: 1GB\n",
     ["MY.DaskWorkerCores = 2", "--nworkers 2", "--nthreads 1"]),
])
def test_batch_cluster_job_scripts(tmp_path, kind, suffix, text, expect):
    pytest.importorskip("dask_jobqueue")
    path = tmp_path / f"cluster{suffix}"
    path.write_text(text)
    with make_jobqueue_cluster(kind, load_cluster_config(path)) as cluster:
        script = cluster.job_script()
    for line in expect:
        assert line in script, (line, script)


def test_bad_cluster_configs_are_refused(tmp_path):
    pytest.importorskip("dask_jobqueue")
    bad = tmp_path / "bad.toml"
    bad.write_text("cores = [")
    with pytest.raises(DaskBackendError, match="bad.toml: invalid TOML"):
        load_cluster_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DaskBackendError, match="expected a table"):
        load_cluster_config(listy)
    with pytest.raises(DaskBackendError, match="SLURMCluster"):
        make_jobqueue_cluster("slurm", {"cores": 2, "memory": "1GB", "no_such_option": 1})
