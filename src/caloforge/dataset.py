"""The shower dataset format: HDF5, compatible with the CaloChallenge convention.

Datasets (all in MeV): ``incident_energies`` (N, 1) float64, ``showers`` (N, n_cells) float32 with cells in
(layer, x, y) C order, ``incident_angles`` (N, 1) float64 in degrees, ``incident_positions`` (N, 2) float64 impact
point (x, y) in mm and ``incident_particles`` (N, 1) int32 PDG codes. Files without positions (written before, or by
other tools) mean the impact at the origin; without particles, the file attribute ``particle``. File attributes
describe where the
showers come from: detector name and full description (JSON), cell-array shape, particle, physics list,
Geant4 version, seed, caloforge version and ``source`` (``geant4`` or ``model:<family>``).

The sparse layout (attribute ``layout = "sparse"``, written by ``ShowerWriter(..., layout="sparse")``) replaces
``showers`` by the hits: ``hit_offsets`` (N+1,) int64, ``hit_cells`` (n_hits,) int32 flat cell indices (increasing
within a row) and ``hit_energies`` (n_hits,) float32 MeV, plus the attribute ``n_cells``; :class:`ShowerFile` reads
both layouts and always returns dense showers. ``compression`` is ``gzip`` (default), ``lzf`` or ``none``.

Files are written to a temporary name and renamed when complete, so a file with the final name is whole.
Everything read is validated; problems raise :class:`DatasetError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np

from caloforge import __version__
from caloforge.conditions import PARTICLE_PDG, Conditions, ConditionsError, canonical_particle
from caloforge.detector import Detector, DetectorError, builtin_detectors, load_detector

SHOWERS = "showers"
ENERGIES = "incident_energies"
ANGLES = "incident_angles"
POSITIONS = "incident_positions"
PARTICLES = "incident_particles"
CHUNK_ROWS = 100
UNKNOWN_PDG = 0  # a file that records no particle (neither column nor attribute)
# The sparse layout (attribute layout = "sparse"): row i's hits are hit_cells/hit_energies[hit_offsets[i]:
# hit_offsets[i + 1]], flat cell indices in (layer, x, y) C order, strictly increasing within a row.
HIT_OFFSETS = "hit_offsets"
HIT_CELLS = "hit_cells"
HIT_ENERGIES = "hit_energies"
HIT_CHUNK = 1 << 15  # hits per HDF5 chunk of the sparse datasets
SPARSE_READ_SPAN = 1 << 22  # at most this many hits are read at once (besides one row's own)
LAYOUTS = ("dense", "sparse")
COMPRESSIONS = ("gzip", "lzf", "none")


def compression_options(compression: str | None, shuffle: bool = True) -> dict:
    """h5py ``create_dataset`` options of a compression choice: ``gzip`` (level 1; the default), ``lzf`` or ``none``
    (also ``None``), with HDF5's byte shuffle in front when ``shuffle``. The writer shuffles the sparse hit datasets
    (it halves the hit cells' size) but not dense showers: on their mostly-zero cells it made files 30-40 % larger
    and writing 35-45 % slower (stop 34, BENCHMARKS.md)."""
    if compression is None or compression == "none":
        return {}
    if compression == "gzip":
        return dict(compression="gzip", compression_opts=1, shuffle=shuffle)
    if compression == "lzf":
        return dict(compression="lzf", shuffle=shuffle)
    raise ValueError(f"compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}")


class DatasetError(ValueError):
    """A dataset file is missing, malformed or does not match what was expected."""


@dataclass
class Batch:
    """A slice of a dataset: its :class:`~caloforge.conditions.Conditions` and showers (n, n_cells) in MeV."""

    conditions: Conditions
    showers: np.ndarray

    @property
    def energies(self) -> np.ndarray:
        return self.conditions.energy

    @property
    def angles(self) -> np.ndarray:
        return self.conditions.angle

    def __len__(self) -> int:
        return len(self.conditions)


def _check_values(path: str, field: str, a: np.ndarray, positive: bool = False) -> None:
    if a.size and a.dtype.kind == "f":  # the common case in two passes without temporaries: min and max
        lo, hi = a.min(), a.max()  # NaN propagates into both; +-inf shows in one
        if np.isfinite(lo) and np.isfinite(hi) and (lo > 0 if positive else lo >= 0):
            return
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))[0]) if a.ndim else 0
        raise DatasetError(f"{path}: field {field!r} holds NaN or inf (first at row {bad}); expected finite values")
    if positive and np.any(a <= 0):
        raise DatasetError(f"{path}: field {field!r} has values <= 0; expected positive energies in MeV")
    if not positive and np.any(a < 0):
        bad = int(np.flatnonzero((a < 0).reshape(len(a), -1).any(axis=1))[0])
        raise DatasetError(f"{path}: field {field!r} has negative energies (first at row {bad}); expected >= 0 MeV")


def _pieces(a) -> bool:
    """Whether ``a`` is a list of array pieces to join (not an array, nor a plain list of numbers)."""
    return isinstance(a, list | tuple) and len(a) > 0 and all(isinstance(x, np.ndarray) for x in a)


def _check_dtype(path: str, field: str, ds, kinds: str, what: str) -> None:
    """A dataset (not a group) of a plain numeric dtype of the given kinds that converts to float64 without loss
    of range (no compound, string, boolean, complex or extended-precision types)."""
    if not isinstance(ds, h5py.Dataset):
        raise DatasetError(f"{path}: {field!r} is a group; expected a dataset of {what}")
    dt = ds.dtype
    if dt.names is not None or dt.subdtype is not None or dt.kind not in kinds or dt.itemsize > 8 \
            or not np.can_cast(dt, np.float64, "same_kind"):
        raise DatasetError(f"{path}: field {field!r} has dtype {dt}; expected {what}")


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
        if os.path.isdir(self.path):
            raise DatasetError(f"{self.path}: is a directory; expected a shower file (HDF5)")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise DatasetError(f"{self.path}: not a readable HDF5 file ({err})") from None
        try:
            self._check(detector, expected_detector)
        except BaseException:
            self._h5.close()
            raise
        self._energies: np.ndarray | None = None
        self._angles: np.ndarray | None = None
        self._positions: np.ndarray | None = None
        self._pdg: np.ndarray | None = None

    def _check(self, detector: Detector | None, expected_detector: Detector | str | None) -> None:
        """Validate the structure and attributes of the file (not the values: those are checked as read)."""
        h5 = self._h5
        self.layout = "sparse" if SHOWERS not in h5 and HIT_OFFSETS in h5 else "dense"
        for key in (ENERGIES, SHOWERS) if self.layout == "dense" else (ENERGIES, HIT_CELLS, HIT_ENERGIES):
            if key not in h5:
                raise DatasetError(f"{self.path}: missing dataset {key!r}; expected {ENERGIES!r} and {SHOWERS!r}" + (
                    "" if self.layout == "dense" else f" (or {HIT_OFFSETS!r}, {HIT_CELLS!r} and {HIT_ENERGIES!r})"))
        for key, kinds, what in ((ENERGIES, "fiu", "real numbers (MeV)"), (SHOWERS, "fiu", "real numbers (MeV)"),
                                 (ANGLES, "fiu", "real numbers (deg)"), (POSITIONS, "fiu", "real numbers (mm)"),
                                 (PARTICLES, "iu", "integer PDG codes"), (HIT_OFFSETS, "iu", "integer offsets"),
                                 (HIT_CELLS, "iu", "integer cell numbers"), (HIT_ENERGIES, "fiu", "reals (MeV)")):
            if key in h5:
                _check_dtype(self.path, key, h5[key], kinds, what)
        e = h5[ENERGIES]
        if e.ndim != 2 or e.shape[1] != 1:
            raise DatasetError(f"{self.path}: field {ENERGIES!r} has shape {e.shape}; expected (N, 1)")
        s = h5[SHOWERS] if self.layout == "dense" else self._check_sparse(e.shape[0])
        cells_field = SHOWERS if self.layout == "dense" else HIT_CELLS
        if s.ndim != 2 or s.shape[1] < 1:
            raise DatasetError(f"{self.path}: field {SHOWERS!r} has shape {s.shape}; expected (N, n_cells)")
        if s.shape[0] != e.shape[0]:
            raise DatasetError(
                f"{self.path}: field {SHOWERS!r} has {s.shape[0]} rows but {ENERGIES!r} has {e.shape[0]}"
            )
        if ANGLES in h5 and h5[ANGLES].shape != e.shape:
            raise DatasetError(f"{self.path}: field {ANGLES!r} has shape {h5[ANGLES].shape}; expected {e.shape}")
        if POSITIONS in h5 and h5[POSITIONS].shape != (e.shape[0], 2):
            raise DatasetError(f"{self.path}: field {POSITIONS!r} has shape {h5[POSITIONS].shape}; expected "
                               f"({e.shape[0]}, 2) impact points (x, y) in mm")
        if PARTICLES in h5 and h5[PARTICLES].shape != e.shape:
            raise DatasetError(f"{self.path}: field {PARTICLES!r} has shape {h5[PARTICLES].shape}; expected {e.shape}")
        try:
            self.attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in h5.attrs.items()}
        except (OSError, TypeError, ValueError) as err:
            raise DatasetError(f"{self.path}: unreadable attributes ({err})") from None
        complete = self.attrs.get("complete", True)
        if not isinstance(complete, bool | np.bool_ | int | np.integer) or complete not in (0, 1):
            raise DatasetError(f"{self.path}: attribute 'complete' is {complete!r:.60}; expected a boolean")
        if not complete:
            raise DatasetError(f"{self.path}: file is marked incomplete (an interrupted write)")
        self.detector = detector or self._detector_from_attrs()
        if self.detector is not None:
            try:
                self.shape = self.detector.shape_for_cells(s.shape[1])
            except DetectorError as err:
                raise DatasetError(f"{self.path}: field {cells_field!r}: {err}") from None
        if "shape" in self.attrs:
            try:
                shape = tuple(int(x) for x in np.asarray(self.attrs["shape"]).reshape(-1))
            except (TypeError, ValueError):
                shape = ()
            if not shape or int(np.prod(shape)) != s.shape[1] or (self.detector is not None and shape != self.shape):
                want = f"{self.shape}" if self.detector is not None else f"dimensions multiplying to {s.shape[1]}"
                raise DatasetError(f"{self.path}: attribute 'shape' is {self.attrs['shape']!r:.60}; expected {want} "
                                   f"(the field {cells_field!r} has {s.shape[1]} cells per shower)")
            if self.detector is None:
                self.shape = shape
        elif self.detector is None:
            self.shape = (s.shape[1],)
        if expected_detector is not None:
            want = expected_detector if isinstance(expected_detector, Detector) else load_detector(expected_detector)
            got = self.detector
            if got is None or got.to_dict() != want.to_dict():
                raise DatasetError(
                    f"{self.path}: attribute 'detector' is {getattr(got, 'name', None)!r}; expected detector "
                    f"{want.name!r} (the file was made for another detector)"
                )

    def _check_sparse(self, n_rows: int) -> SimpleNamespace:
        """The structure of a sparse file (offsets read and checked here, hits as read); returns a stand-in for the
        dense field: ``shape`` (N, n_cells)."""
        h5 = self._h5
        off, cells, en = h5[HIT_OFFSETS], h5[HIT_CELLS], h5[HIT_ENERGIES]
        if off.shape != (n_rows + 1,):
            raise DatasetError(f"{self.path}: field {HIT_OFFSETS!r} has shape {off.shape}; expected ({n_rows + 1},), "
                               f"one more than the rows of {ENERGIES!r}")
        if cells.ndim != 1 or en.shape != cells.shape:
            raise DatasetError(f"{self.path}: fields {HIT_CELLS!r} and {HIT_ENERGIES!r} have shapes {cells.shape} and "
                               f"{en.shape}; expected the same shape (n_hits,)")
        try:
            raw = h5.attrs.get("n_cells")
        except (OSError, TypeError, ValueError):
            raw = None
        if isinstance(raw, np.ndarray) and raw.ndim == 0:
            raw = raw.item()
        if not isinstance(raw, int | np.integer) or isinstance(raw, bool | np.bool_) or not 0 < raw < 2**31:
            raise DatasetError(f"{self.path}: attribute 'n_cells' is {raw!r:.60}; expected the number of cells per "
                               f"shower (a positive integer; sparse layout)")
        offsets = off[:].astype(np.int64)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != cells.shape[0]:
            raise DatasetError(f"{self.path}: field {HIT_OFFSETS!r} does not index the {cells.shape[0]} hits; expected "
                               f"non-decreasing offsets from 0 to {cells.shape[0]}")
        self._offsets = offsets
        self._n_cells = int(raw)
        return SimpleNamespace(ndim=2, shape=(n_rows, int(raw)))

    def _sparse_rows(self, rows: np.ndarray) -> np.ndarray:
        """Dense showers (len(rows), n_cells) of the sorted rows ``rows`` of a sparse file, the hits checked."""
        off, n_cells = self._offsets, self._n_cells
        out = np.zeros((len(rows), n_cells), np.float32)
        i = 0
        while i < len(rows):  # groups of rows whose hits span at most SPARSE_READ_SPAN (at least one row)
            lo = off[rows[i]]
            j = i + max(1, int(np.searchsorted(off[rows[i:] + 1], lo + SPARSE_READ_SPAN, side="right")))
            grp = rows[i:j]
            hi = off[grp[-1] + 1]
            cells = self._h5[HIT_CELLS][lo:hi].astype(np.int64)
            energies = self._h5[HIT_ENERGIES][lo:hi]
            counts = off[grp + 1] - off[grp]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            sel = np.arange(int(counts.sum())) + np.repeat(off[grp] - lo - starts, counts)
            local = np.repeat(np.arange(i, j), counts)
            c = cells[sel]
            key = local * n_cells + c
            if len(c) and (c.min() < 0 or c.max() >= n_cells or np.any(np.diff(key) <= 0)):
                raise DatasetError(f"{self.path}: field {HIT_CELLS!r} (rows {grp[0]}-{grp[-1]}) holds cell indices "
                                   f"outside [0, {n_cells}) or not increasing within a row; expected each row's cells "
                                   f"once, in increasing order")
            out[local, c] = energies[sel]
            i = j
        return out

    def _detector_from_attrs(self) -> Detector | None:
        name = self.attrs.get("detector")
        if name is not None and not isinstance(name, str | bytes):
            raise DatasetError(f"{self.path}: attribute 'detector' is {name!r:.60}; expected a detector name")
        name = name.decode(errors="replace") if isinstance(name, bytes) else name
        if "detector_json" in self.attrs:
            text = self.attrs["detector_json"]
            if not isinstance(text, str | bytes):
                raise DatasetError(f"{self.path}: attribute 'detector_json' is {text!r:.60}; expected JSON text")
            try:
                det = Detector.from_json(text, f"{self.path}: attribute 'detector_json'")
            except (DetectorError, ValueError) as err:
                msg = str(err).removeprefix(f"{self.path}: attribute 'detector_json': ")
                raise DatasetError(f"{self.path}: attribute 'detector_json' is invalid: {msg}") from None
            if name is not None and name != det.name:
                raise DatasetError(f"{self.path}: attribute 'detector' is {name!r} but attribute 'detector_json' "
                                   f"describes {det.name!r}; expected the same detector")
            return det
        if name is not None and name in builtin_detectors():  # a name only, never a path read from a data file
            return load_detector(name)
        return None

    # ---- metadata -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._h5[ENERGIES].shape[0])

    @property
    def n_cells(self) -> int:
        return self._n_cells if self.layout == "sparse" else int(self._h5[SHOWERS].shape[1])

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

    @property
    def positions(self) -> np.ndarray:
        """Impact points (N, 2) in mm (the origin when the file has none)."""
        if self._positions is None:
            if POSITIONS in self._h5:
                p = self._h5[POSITIONS][:].astype(np.float64)
                if not np.all(np.isfinite(p)):
                    raise DatasetError(f"{self.path}: field {POSITIONS!r} holds NaN or inf; expected finite mm")
            else:
                p = np.zeros((len(self), 2))
            self._positions = p
        return self._positions

    @property
    def pdg(self) -> np.ndarray:
        """PDG codes (N,) from the ``incident_particles`` column, else from the ``particle`` attribute; 0 = unknown."""
        if self._pdg is None:
            if PARTICLES in self._h5:
                ds = self._h5[PARTICLES]
                if ds.dtype.kind not in "iu":
                    raise DatasetError(f"{self.path}: field {PARTICLES!r} has dtype {ds.dtype}; expected integer "
                                       f"PDG codes")
                raw = ds[:, 0]
                bad = ~np.isin(raw, list(PARTICLE_PDG.values()))  # before any cast: no code may wrap around
                if np.any(bad):
                    raise DatasetError(f"{self.path}: field {PARTICLES!r} holds code {int(raw[bad][0])}; expected PDG "
                                       f"codes {sorted(PARTICLE_PDG.values())}")
                p = raw.astype(np.int32)
            else:
                p = np.full(len(self), self._attr_pdg(), dtype=np.int32)
            self._pdg = p
        return self._pdg

    def _attr_pdg(self) -> int:
        name = str(self.attrs.get("particle", "") or "")
        try:
            return PARTICLE_PDG[canonical_particle(name)] if name else UNKNOWN_PDG
        except ConditionsError:
            return UNKNOWN_PDG

    @property
    def conditions(self) -> Conditions:
        """All conditions of the file, validated; a DatasetError when the file does not say which particle."""
        if np.any(self.pdg == UNKNOWN_PDG):
            raise DatasetError(f"{self.path}: no field {PARTICLES!r} and attribute 'particle' is "
                               f"{self.attrs.get('particle')!r}; expected one of {', '.join(PARTICLE_PDG)}")
        return self._conditions(slice(None))

    def _conditions(self, index) -> Conditions:
        pos = self.positions[index]
        return Conditions(self.energies[index], self.angles[index], pos[:, 0], pos[:, 1], self.pdg[index])

    # ---- data -----------------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None, index: np.ndarray | None = None) -> Batch:
        """Rows [start, stop) (or the sorted rows ``index``) as a validated :class:`Batch`."""
        if index is not None:
            index = np.asarray(index)
            showers = self._rows(np.sort(index)) if len(index) else np.zeros((0, self.n_cells), np.float32)
            order = np.argsort(np.argsort(index))
            showers = showers[order]
            cond = self._conditions(index)
            first = 0
        else:
            stop = len(self) if stop is None else min(stop, len(self))
            showers = self._rows(slice(start, stop))
            cond = self._conditions(slice(start, stop))
            first = start
        showers = np.asarray(showers, dtype=np.float32)
        try:
            _check_values(self.path, SHOWERS, showers)
        except DatasetError as err:
            if first:
                raise DatasetError(f"{err} (rows counted from {first})") from None
            raise
        return Batch(cond, showers)

    def _rows(self, rows: slice | np.ndarray) -> np.ndarray:
        """Showers of a slice or of sorted row numbers, as stored (dense) or made dense (sparse)."""
        if self.layout == "dense":
            return self._h5[SHOWERS][rows]
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(len(self))
            rows = np.arange(start, max(start, stop))
        return self._sparse_rows(np.asarray(rows, np.int64))

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
    ``layout``: ``dense`` (the ``showers`` field) or ``sparse`` (``hit_offsets``, ``hit_cells``, ``hit_energies``);
    ``compression``: ``gzip`` (level 1), ``lzf`` or ``none`` (see :func:`compression_options`).
    """

    def __init__(self, path: str | Path, detector: Detector, n_cells: int, attrs: dict | None = None,
                 compression: str | None = "gzip", layout: str = "dense"):
        self.path = str(path)
        self.tmp = self.path + ".tmp"
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        kw = compression_options(compression)
        self.layout = layout
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        detector.shape_for_cells(n_cells)
        self.detector = detector
        self.n_cells = n_cells
        self._n_hits = 0
        self._h5 = h5py.File(self.tmp, "w")
        self._h5.create_dataset(ENERGIES, shape=(0, 1), maxshape=(None, 1), dtype="f8", chunks=(CHUNK_ROWS, 1))
        self._h5.create_dataset(ANGLES, shape=(0, 1), maxshape=(None, 1), dtype="f8", chunks=(CHUNK_ROWS, 1))
        self._h5.create_dataset(POSITIONS, shape=(0, 2), maxshape=(None, 2), dtype="f8", chunks=(CHUNK_ROWS, 2))
        self._h5.create_dataset(PARTICLES, shape=(0, 1), maxshape=(None, 1), dtype="i4", chunks=(CHUNK_ROWS, 1))
        if layout == "dense":
            self._h5.create_dataset(SHOWERS, shape=(0, n_cells), maxshape=(None, n_cells), dtype="f4",
                                    chunks=(min(CHUNK_ROWS, 32), n_cells), **compression_options(compression, False))
        else:
            self._h5.create_dataset(HIT_OFFSETS, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,),
                                    **kw)
            self._h5.create_dataset(HIT_CELLS, shape=(0,), maxshape=(None,), dtype="i4", chunks=(HIT_CHUNK,), **kw)
            self._h5.create_dataset(HIT_ENERGIES, shape=(0,), maxshape=(None,), dtype="f4", chunks=(HIT_CHUNK,), **kw)
        base = {
            "detector": detector.name,
            "detector_json": detector.to_json(),
            "shape": list(detector.shape_for_cells(n_cells)),
            "caloforge_version": __version__,
            "energy_unit": "MeV",
            "angle_unit": "deg",
            "position_unit": "mm",
            "particle_code": "PDG",
            "layout": layout,
            "compression": compression or "none",
        }
        if layout == "sparse":
            base["n_cells"] = int(n_cells)
        base.update(attrs or {})
        for k, v in base.items():
            self._h5.attrs[k] = v if not isinstance(v, dict) else json.dumps(v)
        self._h5.attrs["complete"] = False
        self.n = 0

    def append(self, conditions: Conditions, showers: np.ndarray, legacy_showers: np.ndarray | None = None) -> None:
        """Append showers with their conditions (``append(energies, angles, showers)`` also works: photons at the
        origin, or the writer's ``particle`` attribute)."""
        if not isinstance(conditions, Conditions):
            particle = str(self._h5.attrs.get("particle", "gamma"))
            try:
                particle = canonical_particle(particle)
            except ConditionsError:
                particle = "gamma"
            conditions = Conditions.make(conditions, showers, particle=particle)
            showers = legacy_showers
        c = conditions
        showers = np.asarray(showers, np.float32)
        n = len(c)
        if showers.shape != (n, self.n_cells):
            raise DatasetError(f"{self.path}: cannot append showers {showers.shape} for {n} rows of conditions")
        _check_values(self.path, SHOWERS, showers)
        if self.layout == "sparse":  # hits in row-major order: rows, then cells increasing
            flat = np.flatnonzero(showers)
            row = flat // self.n_cells
            self._append(c, hits=(np.bincount(row, minlength=n), (flat - row * self.n_cells).astype(np.int32),
                                  showers.reshape(-1)[flat]))
        else:
            self._append(c, showers=showers)

    def append_hits(self, conditions: Conditions, counts: np.ndarray | list, cells: np.ndarray | list,
                    energies: np.ndarray | list) -> None:
        """Append showers given as their hits (sparse layout only): ``counts`` (n,) hits per shower, then ``cells``
        (cell index within the shower) and ``energies`` (MeV) of every hit, shower after shower, cells increasing.
        This is what a GPU hands back without the dense array; the file is the same as :meth:`append` would write.
        Each may also be a list of pieces in order (a model's decoding chunks), joined here."""
        n = len(conditions)
        if self.layout != "sparse":
            raise DatasetError(f"{self.path}: append_hits needs the sparse layout; this file is {self.layout}")
        counts, cells, energies = (np.concatenate([np.reshape(x, -1) for x in a]) if _pieces(a) else a
                                   for a in (counts, cells, energies))
        counts = np.asarray(counts, np.int64).reshape(-1)
        cells = np.asarray(cells, np.int32).reshape(-1)
        energies = np.asarray(energies, np.float32).reshape(-1)
        if counts.shape != (n,) or counts.min(initial=0) < 0 or int(counts.sum()) != len(cells) \
                or len(energies) != len(cells):
            raise DatasetError(f"{self.path}: append_hits got {counts.shape} counts (sum {int(counts.sum())}), "
                               f"{len(cells)} cells and {len(energies)} energies for {n} rows; expected n counts "
                               f"summing to the number of hits")
        if len(cells) and (cells.min() < 0 or cells.max() >= self.n_cells):
            raise DatasetError(f"{self.path}: hit cell indices span [{cells.min()}, {cells.max()}]; expected "
                               f"[0, {self.n_cells})")
        _check_values(self.path, HIT_ENERGIES, energies)
        self._append(conditions, hits=(counts, cells, energies))

    def _append(self, c: Conditions, showers: np.ndarray | None = None,
                hits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Check the conditions, then append them with the dense showers or the hits (counts, cells, energies)."""
        n = len(c)
        _check_values(self.path, ENERGIES, c.energy, positive=True)
        try:
            c.validate(self.path)
        except ConditionsError as err:
            raise DatasetError(str(err)) from None
        if hits is not None:
            self._write_hits(*hits)
        for key, arr in ((ENERGIES, c.energy[:, None]), (ANGLES, c.angle[:, None]), (POSITIONS, c.position),
                         (PARTICLES, c.pdg[:, None])) + (((SHOWERS, showers),) if showers is not None else ()):
            ds = self._h5[key]
            ds.resize(self.n + n, axis=0)
            ds[self.n:] = arr
        self.n += n

    def _write_hits(self, counts: np.ndarray, cells: np.ndarray, energies: np.ndarray) -> None:
        """Append the hits of the next ``len(counts)`` rows (sparse layout); the caller appends their conditions."""
        m = len(cells)
        if m:
            for key, arr in ((HIT_CELLS, cells), (HIT_ENERGIES, energies)):
                ds = self._h5[key]
                ds.resize(self._n_hits + m, axis=0)
                ds[self._n_hits:] = arr
        if len(counts):
            off = self._h5[HIT_OFFSETS]
            off.resize(self.n + len(counts) + 1, axis=0)
            off[self.n + 1:] = self._n_hits + np.cumsum(counts, dtype=np.int64)
        self._n_hits += m

    def add_table(self, name: str, columns: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """A group ``name`` of 1-D columns of equal length beside the showers (per-event records: readers of
        shower files ignore it)."""
        lengths = {len(np.asarray(v)) for v in columns.values()}
        if len(lengths) > 1:
            raise DatasetError(f"{self.path}: table {name!r} has columns of different lengths {sorted(lengths)}")
        group = self._h5.create_group(name)
        for key, v in columns.items():
            group.create_dataset(key, data=np.asarray(v))
        for key, v in (attrs or {}).items():
            group.attrs[key] = v

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


def write_showers(path: str | Path, detector: Detector, conditions: Conditions | np.ndarray, showers: np.ndarray,
                  legacy_showers: np.ndarray | None = None, attrs: dict | None = None, *, compression: str = "gzip",
                  layout: str = "dense") -> None:
    """Write a whole shower file atomically (``write_showers(path, det, energies, angles, showers)`` also works)."""
    if not isinstance(conditions, Conditions):
        conditions = Conditions.make(conditions, showers, particle=str((attrs or {}).get("particle", "gamma")))
        showers = legacy_showers
    showers = np.asarray(showers, np.float32).reshape(len(conditions), -1)
    with ShowerWriter(path, detector, showers.shape[1], attrs, compression, layout) as w:
        for i in range(0, len(conditions), 1000):
            w.append(conditions[i:i + 1000], showers[i:i + 1000])


def describe(path: str | Path) -> str:
    """A human-readable summary of a shower file (``caloforge info``)."""
    with ShowerFile(path) as f:
        e, a = f.energies, f.angles
        lines = [f"file:              {f.path}", f"showers:           {len(f)} x {f.n_cells} cells, shape {f.shape}"]
        if f.detector is not None:
            lines.append(f"detector:          {f.detector.name}")
            lines.append(f"readout:           {f.detector.readout_summary()}")
            if f.detector.dead_cells:
                lines.append(f"dead cells:        {f.detector.dead_cells_summary()}")
        for key in ("source", "particle", "physics_list", "physics_limits", "geant4_version", "production_cut_mm",
                    "seed", "caloforge_version", "energy_spec", "angle_spec", "model", "layout", "compression"):
            if key in f.attrs:
                lines.append(f"{key + ':':<19}{f.attrs[key]}")
        if len(f):
            lines.append(
                f"energy [GeV]:      min {e.min() / 1e3:.3f}  mean {e.mean() / 1e3:.3f}  max {e.max() / 1e3:.3f}"
            )
            lines.append(f"angle [deg]:       min {a.min():.2f}  mean {a.mean():.2f}  max {a.max():.2f}")
            p = f.positions
            lines.append(f"impact x, y [mm]:  x {p[:, 0].min():.2f} .. {p[:, 0].max():.2f}  "
                         f"y {p[:, 1].min():.2f} .. {p[:, 1].max():.2f}")
            codes, counts = np.unique(f.pdg, return_counts=True)
            names = {v: k for k, v in PARTICLE_PDG.items()}
            lines.append("particles:         " + ", ".join(f"{names.get(int(c), 'unknown')} {k}"
                                                           for c, k in zip(codes, counts)))
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
    """A ``torch.utils.data.Dataset`` streaming (conditions (5,), shower) rows from disk; the conditions are the
    columns :data:`~caloforge.conditions.CONDITION_COLUMNS` (energy MeV, angle deg, x mm, y mm, PDG code).

    Each worker process opens its own HDF5 handle; nothing but the conditions is held in memory.
    """
    import torch
    from torch.utils.data import Dataset

    class _ShowerTorchDataset(Dataset):
        def __init__(self) -> None:
            f = ShowerFile(path, expected_detector)
            self.cond = torch.as_tensor(f.conditions.as_array(), dtype=torch.float32)
            f.close()
            self._file: ShowerFile | None = None

        def __len__(self) -> int:
            return len(self.cond)

        def __getitem__(self, i: int):
            if self._file is None:
                self._file = ShowerFile(path)
            b = self._file.read(int(i), int(i) + 1)
            return self.cond[i], torch.from_numpy(b.showers[0])

    return _ShowerTorchDataset()
