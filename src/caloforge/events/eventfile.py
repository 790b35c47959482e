"""Event-level HDF5 files (``kind = "events"``): the high- and low-level variables of ttH / ttbb events.

Datasets: ``high_level`` (N, 26) float32, ``process`` (N,) int8 (1 = ttH, 0 = ttbb), and for Pythia files
``low_level`` (N, 32) float32 and ``aux`` (N, 4) float32 (n_jets, n_btags, MET, lepton PDG). The column names are
in the attributes ``high_level_names``, ``low_level_names``, ``aux_names`` (JSON lists); ``kind = "events"`` tells
them apart from shower files; ``source`` is ``pythia`` or ``model:eventwgan``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from caloforge import __version__

KIND = "events"
#: Largest magnitude of a stored variable: the files hold float32 (a larger value would be written as inf).
MAX_ABS = 1e30


class EventFileError(ValueError):
    """An event file that cannot be used: names the file, the field and what was expected."""


@dataclass
class Events:
    """An in-memory event sample."""

    high_level: np.ndarray
    process: np.ndarray
    names: list[str]
    low_level: np.ndarray | None = None
    low_level_names: list[str] = field(default_factory=list)
    aux: np.ndarray | None = None
    aux_names: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    path: str = ""

    def __len__(self) -> int:
        return len(self.process)

    def select(self, rows: np.ndarray) -> Events:
        """A subset of the rows."""
        return Events(self.high_level[rows], self.process[rows], self.names,
                      None if self.low_level is None else self.low_level[rows], self.low_level_names,
                      None if self.aux is None else self.aux[rows], self.aux_names, dict(self.attrs), self.path)


def is_event_file(path: str | Path) -> bool:
    """True for an HDF5 file with ``kind = "events"`` (False for shower files and anything unreadable)."""
    try:
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("kind") == KIND
    except OSError:
        return False


def _names(path: str, h5: h5py.File, key: str, width: int) -> list[str]:
    raw = h5.attrs.get(key)
    if raw is None:
        return [f"x{i}" for i in range(width)]
    try:
        names = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as err:
        raise EventFileError(f"{path}: attribute {key!r}: expected a JSON list of column names ({err})") from None
    if not isinstance(names, list) or len(names) != width:
        raise EventFileError(f"{path}: attribute {key!r}: expected a JSON list of {width} names")
    return [str(n) for n in names]


def _matrix(path: str, h5: h5py.File, key: str, n: int | None) -> np.ndarray:
    ds = h5[key]
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.dtype.kind not in "fiu":
        raise EventFileError(f"{path}: field {key!r}: expected a 2-D numeric dataset, got {ds}")
    a = np.asarray(ds[...], dtype=np.float64)
    if n is not None and len(a) != n:
        raise EventFileError(f"{path}: field {key!r}: expected {n} rows (as 'process'), got {len(a)}")
    if a.shape[1] == 0:
        raise EventFileError(f"{path}: field {key!r}: expected at least one column, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise EventFileError(f"{path}: field {key!r}: expected finite numbers, found NaN or inf")
    if a.size and np.abs(a).max() > MAX_ABS:
        raise EventFileError(f"{path}: field {key!r}: expected values of magnitude at most {MAX_ABS:g} (float32), "
                             f"found {np.abs(a).max():g}")
    return a


def read_events(path: str | Path) -> Events:
    """Read and validate an event file."""
    path = str(path)
    if not os.path.exists(path):
        raise EventFileError(f"{path}: no such event file")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise EventFileError(f"{path}: not a readable HDF5 file ({err})") from None
    with h5:
        if h5.attrs.get("kind") != KIND:
            raise EventFileError(f"{path}: attribute 'kind': expected {KIND!r} (an event file), got "
                                 f"{h5.attrs.get('kind')!r}")
        for key in ("high_level", "process"):
            if key not in h5:
                raise EventFileError(f"{path}: missing field {key!r}")
        if not isinstance(h5["process"], h5py.Dataset):
            raise EventFileError(f"{path}: field 'process': expected a 1-D integer dataset, got a group")
        proc = np.asarray(h5["process"][...])
        if proc.ndim != 1 or proc.dtype.kind not in "iu" or not np.isin(proc, (0, 1)).all():
            raise EventFileError(f"{path}: field 'process': expected a 1-D integer array of 0 (ttbb) and 1 (ttH)")
        hl = _matrix(path, h5, "high_level", len(proc))
        ev = Events(hl, proc.astype(np.int8), _names(path, h5, "high_level_names", hl.shape[1]),
                    attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in h5.attrs.items()}, path=path)
        if "low_level" in h5:
            ev.low_level = _matrix(path, h5, "low_level", len(proc))
            ev.low_level_names = _names(path, h5, "low_level_names", ev.low_level.shape[1])
        if "aux" in h5:
            ev.aux = _matrix(path, h5, "aux", len(proc))
            ev.aux_names = _names(path, h5, "aux_names", ev.aux.shape[1])
    return ev


def write_events(path: str | Path, ev: Events, attrs: dict | None = None) -> None:
    """Write an event file atomically (``path.tmp`` then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("high_level", data=ev.high_level.astype(np.float32), compression="gzip")
        h5.create_dataset("process", data=ev.process.astype(np.int8))
        h5.attrs["high_level_names"] = json.dumps(ev.names)
        if ev.low_level is not None:
            h5.create_dataset("low_level", data=ev.low_level.astype(np.float32), compression="gzip")
            h5.attrs["low_level_names"] = json.dumps(ev.low_level_names)
        if ev.aux is not None:
            h5.create_dataset("aux", data=ev.aux.astype(np.float32), compression="gzip")
            h5.attrs["aux_names"] = json.dumps(ev.aux_names)
        for k, v in {**ev.attrs, **(attrs or {})}.items():
            if k.endswith("_names"):
                continue
            h5.attrs[k] = v if isinstance(v, str | int | float | np.integer | np.floating) else json.dumps(v)
        h5.attrs["kind"] = KIND
        h5.attrs["caloforge_version"] = __version__
    os.replace(tmp, path)


def parse_fractions(text: str) -> list[float]:
    """``--fractions 0.75,0.25``: finite positive numbers summing to at most 1."""
    try:
        fractions = [float(x) for x in text.split(",")]
    except ValueError:
        raise EventFileError(f"--fractions {text!r}: expected comma-separated numbers such as 0.75,0.25") from None
    if not all(math.isfinite(f) and f > 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise EventFileError(f"--fractions {text!r}: expected positive fractions summing to at most 1")
    return fractions


def _row_keys(ev: Events) -> list[bytes]:
    """One key per event: the bytes of all its variables as stored (float32) and its process."""
    cols = [ev.high_level] + [a for a in (ev.low_level, ev.aux) if a is not None]
    rows = np.ascontiguousarray(np.concatenate([c.astype(np.float32) for c in cols], axis=1))
    return [r.tobytes() + bytes([int(p)]) for r, p in zip(rows, ev.process)]


def split_file(path: str, fractions: list[float], outputs: list[str], seed: int = 0,
               exclude: list[str] | None = None) -> list[int]:
    """Split an event file by a seeded permutation into len(fractions) files; returns their sizes.

    ``exclude``: event files whose events (identical in every variable) are dropped from the input first, so that a
    grown production can be split again without putting an earlier test file's events into the new training file."""
    from caloforge.validate import check_seed, same_file

    if len(fractions) != len(outputs):
        raise EventFileError(f"--fractions has {len(fractions)} entries but -o was given {len(outputs)} times")
    if not all(math.isfinite(f) and f > 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise EventFileError(f"--fractions {fractions}: expected positive fractions summing to at most 1")
    check_seed(seed)
    for i, out in enumerate(outputs):
        if same_file(out, path) or any(same_file(out, o) for o in outputs[:i]):
            raise EventFileError(f"-o {out}: is the input file or another -o; expected distinct new files")
    ev = read_events(path)
    for other in exclude or []:
        drop = set(_row_keys(read_events(other)))
        keep = np.array([k not in drop for k in _row_keys(ev)], dtype=bool)
        if keep.all() and drop:
            raise EventFileError(f"--exclude {other}: none of its {len(drop)} events is in {path}; expected a file "
                                 "split from (an earlier snapshot of) the same production")
        ev = ev.select(np.flatnonzero(keep))
    perm = np.random.default_rng(seed).permutation(len(ev))
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(ev)).astype(int)
    sizes = []
    for out, a, b in zip(outputs, bounds[:-1], bounds[1:]):
        write_events(out, ev.select(np.sort(perm[a:b])), {"split_of": path, "split_seed": seed})
        sizes.append(int(b - a))
    return sizes
