"""The shower dataset format: HDF5, compatible with the CaloChallenge convention.

Datasets (all in MeV): ``incident_energies`` (N, 1) float64, ``showers`` (N, n_cells) float32 with cells in
(layer, x, y) C order, ``incident_angles`` (N, 1) float64 in degrees. File attributes describe where the
showers come from: detector name and full description (JSON), cell-array shape, particle, physics list,
Geant4 version, seed, caloforge version and ``source`` (``geant4`` or ``model:<family>``).

Files are written to a temporary name and renamed when complete, so a file with the final name is whole.
Everything read is validated; problems raise :class:`DatasetError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from caloforge import __version__
from caloforge.detector import Detector, DetectorError, load_detector

SHOWERS = "showers"
ENERGIES = "incident_energies"
ANGLES = "incident_angles"
CHUNK_ROWS = 100


class DatasetError(ValueError):
    """A dataset file is missing, malformed or does not match what was expected."""


@dataclass
class Batch:
    """A slice of a dataset: incident energies (n,) MeV, angles (n,) degrees, showers (n, n_cells) MeV."""

    energies: np.ndarray
    angles: np.ndarray
    showers: np.ndarray

    def __len__(self) -> int:
        return len(self.energies)


def _check_values(path: str, field: str, a: np.ndarray, positive: bool = False) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))[0]) if a.ndim else 0
        raise DatasetError(f"{path}: field {field!r} holds NaN or inf (first at row {bad}); expected finite values")
    if positive and np.any(a <= 0):
        raise DatasetError(f"{path}: field {field!r} has values <= 0; expected positive energies in MeV")
    if not positive and np.any(a < 0):
        bad = int(np.flatnonzero((a < 0).reshape(len(a), -1).any(axis=1))[0])
        raise DatasetError(f"{path}: field {field!r} has negative energies (first at row {bad}); expected >= 0 MeV")


class ShowerFile:
    """Read access to a shower file, validating as it reads; streams in batches, never loads all showers.

    ``expected_detector``: raise if the file was made for another detector.
    """

    def __init__(self, path: str | Path, expected_detector: Detector | str | None = None,
                 detector: Detector | None = None):
        self.path = str(path)
        if not os.path.exists(self.path):
            hint = ""
            if os.path.isdir(self.path + ".chunks"):
                hint = " (an unfinished simulation exists: run the same `caloforge simulate` again to finish it)"
            raise DatasetError(f"{self.path}: file not found{hint}")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise DatasetError(f"{self.path}: not a readable HDF5 file ({err})") from None
        h5 = self._h5
        for key in (ENERGIES, SHOWERS):
            if key not in h5:
                raise DatasetError(f"{self.path}: missing dataset {key!r}; expected {ENERGIES!r} and {SHOWERS!r}")
        e, s = h5[ENERGIES], h5[SHOWERS]
        if e.ndim != 2 or e.shape[1] != 1:
            raise DatasetError(f"{self.path}: field {ENERGIES!r} has shape {e.shape}; expected (N, 1)")
        if s.ndim != 2:
            raise DatasetError(f"{self.path}: field {SHOWERS!r} has shape {s.shape}; expected (N, n_cells)")
        if s.shape[0] != e.shape[0]:
            raise DatasetError(
                f"{self.path}: field {SHOWERS!r} has {s.shape[0]} rows but {ENERGIES!r} has {e.shape[0]}"
            )
        if ANGLES in h5 and h5[ANGLES].shape != e.shape:
            raise DatasetError(f"{self.path}: field {ANGLES!r} has shape {h5[ANGLES].shape}; expected {e.shape}")
        if not bool(h5.attrs.get("complete", True)):
            raise DatasetError(f"{self.path}: file is marked incomplete (an interrupted write)")
        self.attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in h5.attrs.items()}
        self.detector = detector or self._detector_from_attrs()
        if self.detector is not None:
            try:
                self.shape = self.detector.shape_for_cells(s.shape[1])
            except DetectorError as err:
                raise DatasetError(f"{self.path}: field {SHOWERS!r}: {err}") from None
        else:
            self.shape = tuple(int(x) for x in self.attrs["shape"]) if "shape" in self.attrs else (s.shape[1],)
        if expected_detector is not None:
            want = expected_detector if isinstance(expected_detector, Detector) else load_detector(expected_detector)
            got = self.detector
            if got is None or got.to_dict() != want.to_dict():
                raise DatasetError(
                    f"{self.path}: attribute 'detector' is {getattr(got, 'name', None)!r}; expected detector "
                    f"{want.name!r} (the file was made for another detector)"
                )
        self._energies: np.ndarray | None = None
        self._angles: np.ndarray | None = None

    def _detector_from_attrs(self) -> Detector | None:
        if "detector_json" in self.attrs:
            try:
                return Detector.from_json(self.attrs["detector_json"], f"{self.path}: attribute 'detector_json'")
            except (DetectorError, json.JSONDecodeError) as err:
                raise DatasetError(f"{self.path}: attribute 'detector_json' is invalid: {err}") from None
        if "detector" in self.attrs:
            try:
                return load_detector(str(self.attrs["detector"]))
            except DetectorError:
                return None
        return None

    # ---- metadata -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._h5[ENERGIES].shape[0])

    @property
    def n_cells(self) -> int:
        return int(self._h5[SHOWERS].shape[1])

    @property
    def energies(self) -> np.ndarray:
        """Incident energies (N,) in MeV, validated."""
        if self._energies is None:
            e = self._h5[ENERGIES][:, 0].astype(np.float64)
            _check_values(self.path, ENERGIES, e, positive=True)
            self._energies = e
        return self._energies

    @property
    def angles(self) -> np.ndarray:
        """Incidence angles (N,) in degrees (zeros when the file has none)."""
        if self._angles is None:
            if ANGLES in self._h5:
                a = self._h5[ANGLES][:, 0].astype(np.float64)
                _check_values(self.path, ANGLES, np.abs(a))
            else:
                a = np.zeros(len(self))
            self._angles = a
        return self._angles

    # ---- data -----------------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None, index: np.ndarray | None = None) -> Batch:
        """Rows [start, stop) (or the sorted rows ``index``) as a validated :class:`Batch`."""
        if index is not None:
            index = np.asarray(index)
            showers = self._h5[SHOWERS][np.sort(index)] if len(index) else np.zeros((0, self.n_cells), np.float32)
            order = np.argsort(np.argsort(index))
            showers = showers[order]
            e, a = self.energies[index], self.angles[index]
            first = 0
        else:
            stop = len(self) if stop is None else min(stop, len(self))
            showers = self._h5[SHOWERS][start:stop]
            e, a = self.energies[start:stop], self.angles[start:stop]
            first = start
        showers = np.asarray(showers, dtype=np.float32)
        try:
            _check_values(self.path, SHOWERS, showers)
        except DatasetError as err:
            if first:
                raise DatasetError(f"{err} (rows counted from {first})") from None
            raise
        return Batch(e, a, showers)

    def iter_batches(self, batch_size: int = 1000, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop, batch_size):
            yield self.read(i, min(i + batch_size, stop))

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_showers(path: str | Path, expected_detector: Detector | str | None = None) -> ShowerFile:
    return ShowerFile(path, expected_detector)


def read_showers(path: str | Path, expected_detector: Detector | str | None = None) -> Batch:
    """The whole file in memory (for small files; use :class:`ShowerFile` to stream)."""
    with ShowerFile(path, expected_detector) as f:
        return f.read()


class ShowerWriter:
    """Writes a shower file incrementally to ``PATH.tmp`` and renames it to ``PATH`` on :meth:`close`.

    A crash leaves only the ``.tmp`` file, never a file with the final name that looks complete.
    """

    def __init__(self, path: str | Path, detector: Detector, n_cells: int, attrs: dict | None = None,
                 compression: str | None = "gzip"):
        self.path = str(path)
        self.tmp = self.path + ".tmp"
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        detector.shape_for_cells(n_cells)
        self.detector = detector
        self._h5 = h5py.File(self.tmp, "w")
        kw = dict(compression=compression, compression_opts=1, shuffle=True) if compression == "gzip" else {}
        self._h5.create_dataset(ENERGIES, shape=(0, 1), maxshape=(None, 1), dtype="f8", chunks=(CHUNK_ROWS, 1))
        self._h5.create_dataset(ANGLES, shape=(0, 1), maxshape=(None, 1), dtype="f8", chunks=(CHUNK_ROWS, 1))
        self._h5.create_dataset(SHOWERS, shape=(0, n_cells), maxshape=(None, n_cells), dtype="f4",
                                chunks=(min(CHUNK_ROWS, 32), n_cells), **kw)
        base = {
            "detector": detector.name,
            "detector_json": detector.to_json(),
            "shape": list(detector.shape_for_cells(n_cells)),
            "caloforge_version": __version__,
            "energy_unit": "MeV",
            "angle_unit": "deg",
        }
        base.update(attrs or {})
        for k, v in base.items():
            self._h5.attrs[k] = v if not isinstance(v, dict) else json.dumps(v)
        self._h5.attrs["complete"] = False
        self.n = 0

    def append(self, energies: np.ndarray, angles: np.ndarray, showers: np.ndarray) -> None:
        energies = np.asarray(energies, np.float64).reshape(-1)
        angles = np.asarray(angles, np.float64).reshape(-1)
        showers = np.asarray(showers, np.float32)
        n = len(energies)
        if showers.shape != (n, self._h5[SHOWERS].shape[1]) or angles.shape != (n,):
            raise DatasetError(
                f"{self.path}: cannot append showers {showers.shape}, angles {angles.shape} for {n} energies"
            )
        _check_values(self.path, SHOWERS, showers)
        _check_values(self.path, ENERGIES, energies, positive=True)
        for key, arr in ((ENERGIES, energies[:, None]), (ANGLES, angles[:, None]), (SHOWERS, showers)):
            ds = self._h5[key]
            ds.resize(self.n + n, axis=0)
            ds[self.n:] = arr
        self.n += n

    def close(self) -> None:
        """Finish the file and move it to its final name."""
        self._h5.attrs["complete"] = True
        self._h5.attrs["n_showers"] = self.n
        self._h5.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._h5.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> ShowerWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_showers(path: str | Path, detector: Detector, energies: np.ndarray, angles: np.ndarray,
                  showers: np.ndarray, attrs: dict | None = None) -> None:
    """Write a whole shower file atomically."""
    showers = np.asarray(showers, np.float32).reshape(len(energies), -1)
    with ShowerWriter(path, detector, showers.shape[1], attrs) as w:
        for i in range(0, len(energies), 1000):
            w.append(energies[i:i + 1000], angles[i:i + 1000], showers[i:i + 1000])


def describe(path: str | Path) -> str:
    """A human-readable summary of a shower file (``caloforge info``)."""
    with ShowerFile(path) as f:
        e, a = f.energies, f.angles
        lines = [f"file:              {f.path}", f"showers:           {len(f)} x {f.n_cells} cells, shape {f.shape}"]
        if f.detector is not None:
            lines.append(f"detector:          {f.detector.name}")
        for key in ("source", "particle", "physics_list", "geant4_version", "production_cut_mm", "seed",
                    "caloforge_version", "energy_spec", "angle_spec", "model"):
            if key in f.attrs:
                lines.append(f"{key + ':':<19}{f.attrs[key]}")
        if len(f):
            lines.append(
                f"energy [GeV]:      min {e.min() / 1e3:.3f}  mean {e.mean() / 1e3:.3f}  max {e.max() / 1e3:.3f}"
            )
            lines.append(f"angle [deg]:       min {a.min():.2f}  mean {a.mean():.2f}  max {a.max():.2f}")
            n = min(len(f), 1000)
            b = f.read(0, n)
            vis = b.showers.sum(axis=1)
            lines.append(
                f"visible/incident (first {n}): mean {np.mean(vis / b.energies):.4f}  "
                f"std {np.std(vis / b.energies):.4f}"
            )
            lines.append(f"non-zero cells (first {n}): mean {np.mean((b.showers > 0).sum(axis=1)):.1f}")
        return "\n".join(lines)


def torch_dataset(path: str | Path, expected_detector: Detector | str | None = None):
    """A ``torch.utils.data.Dataset`` streaming (energy, angle, shower) rows from disk.

    Each worker process opens its own HDF5 handle; nothing but the conditions is held in memory.
    """
    import torch
    from torch.utils.data import Dataset

    class _ShowerTorchDataset(Dataset):
        def __init__(self) -> None:
            f = ShowerFile(path, expected_detector)
            self.energies = torch.as_tensor(f.energies, dtype=torch.float32)
            self.angles = torch.as_tensor(f.angles, dtype=torch.float32)
            f.close()
            self._file: ShowerFile | None = None

        def __len__(self) -> int:
            return len(self.energies)

        def __getitem__(self, i: int):
            if self._file is None:
                self._file = ShowerFile(path)
            b = self._file.read(int(i), int(i) + 1)
            return self.energies[i], self.angles[i], torch.from_numpy(b.showers[0])

    return _ShowerTorchDataset()
