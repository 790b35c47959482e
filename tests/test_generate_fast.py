"""A faster generate: the sparse hit layout, the compression choice, the background writer, bench's whole-job timing."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.dataset import (
    HIT_CELLS,
    HIT_ENERGIES,
    HIT_OFFSETS,
    SHOWERS,
    DatasetError,
    ShowerFile,
    ShowerWriter,
    torch_dataset,
    write_showers,
)
from caloforge.generate import generate_file
from caloforge.models import load_model
from conftest_models import toy_detector, toy_showers

H5_COMPRESSION = {"gzip": "gzip", "lzf": "lzf", "none": None}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _showers(n: int = 30, seed: int = 1):
    det = toy_detector()
    b = toy_showers(det, n, seed=seed)
    b.showers[3] = 0.0  # a row without hits
    b.showers[5, -1] = 7.5  # the last cell
    return det, b


def _generate(model_dir, out, *extra) -> None:
    assert main(["generate", "--model", str(model_dir), "-n", "25", "--energy", "20:90", "--batch-size", "10",
                 "--seed", "5", "--quiet", "--device", "cpu", "-o", str(out), *extra]) == 0


def test_sparse_and_dense_generate_hold_the_same_showers(model_dir, tmp_path):
    _generate(model_dir, tmp_path / "dense.h5")
    _generate(model_dir, tmp_path / "sparse.h5", "--format", "sparse")
    _generate(model_dir, tmp_path / "sparse-none.h5", "--format", "sparse", "--compression", "none")
    with ShowerFile(tmp_path / "dense.h5") as d, ShowerFile(tmp_path / "sparse.h5", toy_detector()) as s, \
            ShowerFile(tmp_path / "sparse-none.h5") as s2:
        assert d.layout == "dense" and s.layout == "sparse" and s.n_cells == d.n_cells and s.shape == d.shape
        rd, rs, rs2 = d.read(), s.read(), s2.read()
        assert rd.showers.any() and np.array_equal(rd.showers, rs.showers) and np.array_equal(rd.showers, rs2.showers)
        assert np.array_equal(rd.conditions.as_array(), rs.conditions.as_array())
        assert s.attrs["layout"] == "sparse" and s.attrs["compression"] == "gzip" and s.attrs["n_cells"] == d.n_cells
        assert s.attrs["source"] == "model:layerflow" and s.attrs["seed"] == 5
    with h5py.File(tmp_path / "sparse.h5") as h:
        assert SHOWERS not in h and h[HIT_OFFSETS].dtype == np.int64 and h[HIT_OFFSETS].shape == (26,)
        assert h[HIT_CELLS].dtype == np.int32 and h[HIT_ENERGIES].dtype == np.float32
        off = h[HIT_OFFSETS][:]
        row = np.repeat(np.arange(25), np.diff(off))
        assert np.array_equal(rd.showers[row, h[HIT_CELLS][:]], h[HIT_ENERGIES][:])
        assert off[-1] == np.count_nonzero(rd.showers)
    # evaluate/info read sparse files unchanged
    assert main(["info", str(tmp_path / "sparse.h5")]) == 0


def test_sparse_file_reads_back_exactly(tmp_path):
    det, b = _showers()
    path = tmp_path / "s.h5"
    with ShowerWriter(path, det, b.showers.shape[1], {"particle": "gamma"}, layout="sparse") as w:
        for i in range(0, len(b), 7):
            w.append(b.conditions[i:i + 7], b.showers[i:i + 7])
    with ShowerFile(path, expected_detector=det) as f:
        assert len(f) == len(b) and f.n_cells == b.showers.shape[1]
        assert np.array_equal(f.read().showers, b.showers)
        assert np.array_equal(np.concatenate([x.showers for x in f.iter_batches(4)]), b.showers)
        idx = np.array([17, 3, 29, 0, 5])
        assert np.array_equal(f.read(index=idx).showers, b.showers[idx])
        assert f.read(index=np.array([], int)).showers.shape == (0, f.n_cells)
        assert np.array_equal(f.read(28, 99).showers, b.showers[28:])
        assert np.array_equal(f.conditions.energy, b.conditions.energy)
    ds = torch_dataset(path)
    assert torch.equal(ds[5][1], torch.from_numpy(b.showers[5]))
    import caloforge.dataset as dataset  # reads in groups of at most SPARSE_READ_SPAN hits: exercise the grouping

    old, dataset.SPARSE_READ_SPAN = dataset.SPARSE_READ_SPAN, 50
    try:
        with ShowerFile(path) as f:
            assert np.array_equal(f.read().showers, b.showers)
            assert np.array_equal(f.read(index=idx).showers, b.showers[idx])
    finally:
        dataset.SPARSE_READ_SPAN = old


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_compression_round_trips(tmp_path, layout, compression):
    det, b = _showers(12)
    path = tmp_path / "c.h5"
    write_showers(path, det, b.conditions, b.showers, attrs={"particle": "gamma"}, compression=compression,
                  layout=layout)
    with h5py.File(path) as h:
        ds = h[SHOWERS] if layout == "dense" else h[HIT_ENERGIES]
        assert ds.compression == H5_COMPRESSION[compression] and h.attrs["compression"] == compression
        assert h.attrs["layout"] == layout
        # the byte shuffle only in front of the sparse hit datasets (on dense showers it costs size and time)
        assert ds.shuffle is (compression != "none" and layout == "sparse")
    with ShowerFile(path) as f:
        assert f.layout == layout and np.array_equal(f.read().showers, b.showers)


def test_bad_layout_or_compression(model_dir, tmp_path, capsys):
    det, b = _showers(6)
    with pytest.raises(ValueError, match="compression 'zstd'"):
        ShowerWriter(tmp_path / "x.h5", det, b.showers.shape[1], compression="zstd")
    with pytest.raises(ValueError, match="layout 'coo'"):
        ShowerWriter(tmp_path / "x.h5", det, b.showers.shape[1], layout="coo")
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir), "-n", "2", "-o", str(tmp_path / "y.h5"), "--format", "coo"])
    assert not (tmp_path / "y.h5").exists()


def _corrupt(path, key, fn) -> None:
    with h5py.File(path, "r+") as h:
        a = fn(h[key][:])
        del h[key]
        h[key] = a


@pytest.mark.parametrize("key, fn, match", [
    (HIT_OFFSETS, lambda a: a[:-1], "hit_offsets.*shape"),
    (HIT_OFFSETS, lambda a: a + 1, "hit_offsets.*non-decreasing"),
    (HIT_CELLS, lambda a: np.where(np.arange(len(a)) == 4, 10**6, a), "outside"),
    (HIT_CELLS, lambda a: np.where(np.arange(len(a)) == 1, a[0], a), "increasing"),
    (HIT_ENERGIES, lambda a: np.where(np.arange(len(a)) == 2, -1.0, a).astype(np.float32), "negative"),
    (HIT_ENERGIES, lambda a: a[:-1], "same shape"),
])
def test_corrupt_sparse_files_are_refused(tmp_path, key, fn, match):
    det, b = _showers(6)
    path = tmp_path / "s.h5"
    write_showers(path, det, b.conditions, b.showers, attrs={"particle": "gamma"}, layout="sparse")
    _corrupt(path, key, fn)
    with pytest.raises(DatasetError, match=match):
        with ShowerFile(path) as f:
            f.read()


def test_sparse_needs_n_cells(tmp_path):
    det, b = _showers(6)
    path = tmp_path / "s.h5"
    write_showers(path, det, b.conditions, b.showers, attrs={"particle": "gamma"}, layout="sparse")
    with h5py.File(path, "r+") as h:
        h.attrs["n_cells"] = "many"
    with pytest.raises(DatasetError, match="'n_cells'"):
        ShowerFile(path)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("side", ["model", "writer"])
def test_failure_mid_generation_leaves_no_file(model_dir, tmp_path, monkeypatch, overlap, side):
    from caloforge.conditions import ConditionSampler

    model = load_model(model_dir, device="cpu")
    sampler = ConditionSampler.parse("20:90", "0", "0,0", "gamma", model.detector.cell_size_mm)
    calls = []
    if side == "model":
        sample = model.sample

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("model failed")
            return sample(*a, **k)

        monkeypatch.setattr(model, "sample", failing)
    else:
        append = ShowerWriter.append

        def failing(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            return append(self, *a, **k)

        monkeypatch.setattr(ShowerWriter, "append", failing)
    out = tmp_path / "g.h5"
    with pytest.raises(RuntimeError if side == "model" else OSError, match="failed" if side == "model" else "disk"):
        generate_file(model, out, 50, sampler, batch_size=5, overlap=overlap)
    assert not list(tmp_path.iterdir())  # neither the file nor its .tmp
    if side == "writer":
        assert len(calls) < 10  # generation stopped soon after the writer failed


def test_background_writer_gives_the_same_file(model_dir, tmp_path):
    from caloforge.conditions import ConditionSampler

    model = load_model(model_dir, device="cpu")
    sampler = ConditionSampler.parse("20:90", "0", "0,0", "gamma", model.detector.cell_size_mm)
    stats: dict = {}
    generate_file(model, tmp_path / "a.h5", 23, sampler, batch_size=4, seed=2, overlap=True, stats=stats)
    generate_file(model, tmp_path / "b.h5", 23, sampler, batch_size=4, seed=2, overlap=False, layout="sparse")
    assert set(stats) >= {"model_s", "write_s", "wait_s"} and stats["model_s"] > 0
    with ShowerFile(tmp_path / "a.h5") as a, ShowerFile(tmp_path / "b.h5") as b:
        assert np.array_equal(a.read().showers, b.read().showers)


def test_bench_whole_job(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model_dir), "--batch-sizes", "4", "--energies", "20,50", "--repeats", "1",
                 "--no-geant4", "--whole-job", "6", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["torch_threads"] == 1 and r["cpu_cores"] >= 1
    jobs = {(j["format"], j["compression"], j["overlap"]) for j in r["whole_job"]}
    assert len(jobs) == 7 and ("dense", "gzip", False) in jobs and ("sparse", "none", True) in jobs
    for j in r["whole_job"]:
        assert j["n_showers"] == 6 and j["ms_per_shower"] > 0 and j["file_bytes"] > 0
    text = capsys.readouterr().out
    assert "whole job" in text and "sparse" in text and "threads" in text
    assert not list(tmp_path.glob("*.h5"))
    assert main(["bench", "--model", str(model_dir), "--whole-job", "2", "--whole-job-formats", "dense:zip",
                 "--no-geant4"]) == 2


@pytest.mark.parametrize("overlap", [True, False])
def test_hits_straight_from_the_model_are_the_dense_showers(model_dir, tmp_path, overlap):
    """The sparse layout takes the hits from ``sample_hits`` (no dense window); they are exactly the non-zero cells
    of the dense file made with the same seed, at normal incidence and angled, impact points across cell edges."""
    from caloforge.conditions import ConditionSampler
    from caloforge.dataset import ShowerFile

    model = load_model(model_dir, device="cpu")
    sampler = ConditionSampler.parse("20:90", "0", "-4:9,-4:9", "gamma", model.detector.cell_size_mm)
    generate_file(model, tmp_path / "d.h5", 23, sampler, batch_size=4, seed=2, layout="dense", overlap=overlap)
    generate_file(model, tmp_path / "s.h5", 23, sampler, batch_size=4, seed=2, layout="sparse", overlap=overlap)
    with ShowerFile(tmp_path / "d.h5") as d, ShowerFile(tmp_path / "s.h5") as s:
        dense, sparse = d.read().showers, s.read().showers
    assert (dense > 0).sum() > 100 and np.array_equal(dense, sparse)


def test_sample_hits_equal_the_non_zero_cells_of_sample(model_dir):
    """``sample_hits`` gives the non-zero cells of ``sample`` for the same seed (layerflow overrides it)."""
    from caloforge.models.base import dense_hits

    model = load_model(model_dir, device="cpu")
    e = np.linspace(2e4, 9e4, 9)
    dense = model.sample(e, 0.0, seed=4, positions=np.c_[np.linspace(-3, 7, 9), np.linspace(7, -3, 9)])
    counts, cells, energies = model.sample_hits(e, 0.0, seed=4, positions=np.c_[np.linspace(-3, 7, 9),
                                                                                np.linspace(7, -3, 9)])
    row, cells_d, energies_d = dense_hits(dense)
    assert torch.equal(counts, torch.bincount(row, minlength=9)) and counts.sum() > 50
    assert torch.equal(cells, cells_d) and torch.equal(energies, energies_d)


def test_append_hits_refuses_inconsistent_hits(tmp_path):
    det, b = _showers(6)
    c, showers = b.conditions[:4], b.showers[:4]
    with ShowerWriter(tmp_path / "d.h5", det, det.n_cells(), layout="dense") as w:
        with pytest.raises(DatasetError, match="needs the sparse layout"):
            w.append_hits(c, np.zeros(4), [], [])
        w.append(c, showers)
    with ShowerWriter(tmp_path / "s.h5", det, det.n_cells(), layout="sparse") as w:
        with pytest.raises(DatasetError, match="counts"):
            w.append_hits(c, [1, 0, 0, 0], [3, 4], [1.0, 2.0])
        with pytest.raises(DatasetError, match="cell indices"):
            w.append_hits(c, [1, 0, 0, 0], [det.n_cells()], [1.0])
        with pytest.raises(DatasetError, match="NaN"):
            w.append_hits(c, [1, 0, 0, 0], [3], [np.nan])
        w.append_hits(c, [1, 0, 0, 1], [3, 5], [1.0, 2.0])
    with ShowerFile(tmp_path / "s.h5") as f:
        s = f.read().showers
    assert s[0, 3] == 1.0 and s[3, 5] == 2.0 and s.sum() == 3.0
    # the same hits as pieces (a model's decoding chunks, as generate hands them over): the same file
    with ShowerWriter(tmp_path / "p.h5", det, det.n_cells(), layout="sparse") as w:
        w.append_hits(c, [np.array([1, 0]), np.array([0, 1])], [np.array([3], np.int32), np.array([5], np.int32)],
                      [np.array([1.0], np.float32), np.array([2.0], np.float32)])
        with pytest.raises(DatasetError, match="counts"):  # the pieces are checked once joined
            w.append_hits(c, [np.array([1, 0]), np.array([0, 1])], [np.array([3], np.int32)],
                          [np.array([1.0], np.float32)])
    with h5py.File(tmp_path / "s.h5") as a, h5py.File(tmp_path / "p.h5") as b:
        assert all(np.array_equal(a[k][()], b[k][()]) for k in a if isinstance(a[k], h5py.Dataset))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cli_keeps_freed_memory_unless_told_not_to(monkeypatch):
    from caloforge.cli import keep_freed_memory

    assert keep_freed_memory() is True  # mallopt accepted both settings
    monkeypatch.setenv("CALOFORGE_MALLOC", "0")
    assert keep_freed_memory() is False


def test_bench_alternate_times_each_tree(model_dir, tmp_path, capsys):
    """scripts/bench_alternate.py: one row per job with a median per tree (two labels for the same checkout)."""
    from pathlib import Path

    from conftest_models import load_script

    src = str(Path(__file__).resolve().parents[1] / "src")
    script = load_script("bench_alternate")
    out = tmp_path / "ab.json"
    assert script.main(["--tree", f"a={src}", "--tree", f"b={src}", "--models", str(model_dir), "--batch-sizes", "8",
                        "--reps", "1", "--whole-factor", "2", "--formats", "sparse:none", "--threads", "1",
                        "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith(str(model_dir)[:8])]
    assert any("sparse none" in r for r in rows) and any("model alone" in r for r in rows)
    data = json.loads(out.read_text())
    assert all(len(v) == 1 and v[0] > 0 for v in data.values()) and len(data) == 2 * 3
    with pytest.raises(SystemExit):
        script.main(["--tree", "nolabel"])
