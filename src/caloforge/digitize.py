"""Detector effects the simulation lacks (``caloforge digitize``): calibration, electronic noise, threshold, dead cells.

Geant4 files hold the true energy deposited in each Si cell. A real readout sees it through per-layer calibration
factors (a layer whose gain is off by a few percent), Gaussian electronic noise on every cell, a readout threshold
(cells at or below it read zero) and a few dead cells that always read zero. This module applies those effects, in
that order, to a shower file and writes the same file format with the effects recorded in the attributes
(``detector_effects``: the configuration as JSON; ``dead_cells``: the dead-cell map). It makes the "data" of the
refiner demonstration (see docs/refiner.md) and is usable on its own.

Seeding: the dead-cell map is a fixed property of the detector, drawn once from ``seed`` over the largest readout
window (the angled one when the detector has one, so that normal and angled files of the same detector share it);
the noise of row *i* is drawn from its own stream ``(seed, i)``, so the output does not depend on the batch size and
the same command with the same seed gives the same file. In ``ild-ecal`` a MIP deposits about 0.15 MeV in a cell
(most probable); the defaults are noise 0.1 MIP and threshold 0.5 MIP.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

MIP_MEV = 0.15  # most probable deposit of a MIP in 0.5 mm Si (ild-ecal)
MAX_FACTOR = 10.0


class EffectsError(ValueError):
    """A detector-effects configuration is malformed."""


@dataclass(frozen=True)
class DetectorEffects:
    """What the readout does to the true cell energies (MeV).

    ``calibration``: per-layer factors as a spec ``"0-9=1.10,20-29=0.95"`` (unlisted layers 1; a single number
    applies to all layers) or one factor per layer. ``dead_cells``: an explicit map ``[[layer, ix, iy], ...]`` in the
    cells of the largest window; when empty, ``dead_fraction`` of the cells are drawn dead from ``seed``.
    """

    noise_mev: float = 0.1 * MIP_MEV
    threshold_mev: float = 0.5 * MIP_MEV
    dead_fraction: float = 0.0
    calibration: str | tuple[float, ...] = ""
    dead_cells: tuple[tuple[int, int, int], ...] = ()
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = self.calibration if isinstance(self.calibration, str) else list(self.calibration)
        d["dead_cells"] = [list(c) for c in self.dead_cells]
        return d


def check_effects(fx: DetectorEffects, where: str = "detector effects") -> DetectorEffects:
    """The configuration with its numbers checked (finite, in range); raises :class:`EffectsError`."""
    for name, lo, hi in (("noise_mev", 0.0, 1e3), ("threshold_mev", 0.0, 1e4), ("dead_fraction", 0.0, 1.0)):
        v = getattr(fx, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise EffectsError(f"{where}: {name} is {v!r:.60}; expected a number in [{lo:g}, {hi:g}]")
    if isinstance(fx.seed, bool) or not isinstance(fx.seed, int) or not 0 <= fx.seed < 2**63:
        raise EffectsError(f"{where}: seed is {fx.seed!r:.60}; expected an integer in [0, 2^63)")
    if not isinstance(fx.calibration, str | tuple | list):
        raise EffectsError(f"{where}: calibration is {fx.calibration!r:.60}; expected a spec like '0-9=1.1' or a "
                           f"list of per-layer factors")
    return replace(fx, noise_mev=float(fx.noise_mev), threshold_mev=float(fx.threshold_mev),
                   dead_fraction=float(fx.dead_fraction))


def calibration_factors(spec: str | tuple[float, ...] | list, n_layers: int,
                        where: str = "calibration") -> np.ndarray:
    """Per-layer factors (n_layers,) from a spec ``"0-9=1.1,20-29=0.95"``, ``"1.02"`` or a list of factors."""
    out = np.ones(n_layers)
    if isinstance(spec, tuple | list):
        if len(spec) != n_layers:
            raise EffectsError(f"{where}: {len(spec)} factors; expected one per layer ({n_layers})")
        for i, v in enumerate(spec):
            out[i] = _factor(v, f"{where}[{i}]")
        return out
    text = spec.strip()
    if not text:
        return out
    if "=" not in text:
        return out * _factor(text, where)
    for item in text.split(","):
        layers, sep, value = item.partition("=")
        if not sep:
            raise EffectsError(f"{where}: item {item.strip()!r}; expected LAYERS=FACTOR, e.g. '0-9=1.1'")
        lo, dash, hi = layers.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise EffectsError(f"{where}: layers {layers.strip()!r}; expected a layer 'i' or a range 'i-j'") from None
        if not 0 <= a <= b < n_layers:
            raise EffectsError(f"{where}: layers {layers.strip()!r}; expected layers within 0-{n_layers - 1}")
        out[a:b + 1] = _factor(value.strip(), f"{where} of layers {layers.strip()}")
    return out


def _factor(v: Any, where: str) -> float:
    try:
        f = float(v) if not isinstance(v, bool) else math.nan
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or not 0 < f <= MAX_FACTOR:
        raise EffectsError(f"{where}: factor {v!r:.40}; expected a number in (0, {MAX_FACTOR:g}]")
    return f


def load_effects(path: str | Path) -> DetectorEffects:
    """A :class:`DetectorEffects` from a TOML file (keys: the dataclass fields)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as err:
        raise EffectsError(f"{path}: not valid TOML ({err})") from None
    known = {f.name for f in fields(DetectorEffects)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EffectsError(f"{path}: unknown key {unknown[0]!r}; expected some of {', '.join(sorted(known))}")
    cal = data.get("calibration", "")
    if isinstance(cal, list):
        data["calibration"] = tuple(cal)
    cells = data.get("dead_cells", ())
    if not isinstance(cells, list | tuple) or not all(isinstance(c, list) and len(c) == 3 and
                                                      all(isinstance(i, int) for i in c) for c in cells):
        raise EffectsError(f"{path}: dead_cells; expected a list of [layer, ix, iy] integer triples")
    data["dead_cells"] = tuple(tuple(c) for c in cells)
    for key in ("noise_mev", "threshold_mev", "dead_fraction"):
        if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
            data[key] = float(data[key])
    return check_effects(DetectorEffects(**data), str(path))


# ---- the effects ------------------------------------------------------------------------------------------
def full_shape(detector) -> tuple[int, int, int]:
    """The largest readout window of the detector (angled when it has one): the frame of the dead-cell map."""
    return max(detector.shape(False), detector.shape(True), key=lambda s: s[0] * s[1] * s[2])


def dead_cell_map(fx: DetectorEffects, detector) -> np.ndarray:
    """Dead cells (k, 3) as (layer, ix, iy) in the largest window: the explicit map, else drawn from the seed."""
    shape = full_shape(detector)
    if fx.dead_cells:
        cells = np.asarray(fx.dead_cells, np.int64).reshape(-1, 3)
        if np.any(cells < 0) or np.any(cells >= np.asarray(shape)):
            bad = cells[np.any((cells < 0) | (cells >= np.asarray(shape)), axis=1)][0]
            raise EffectsError(f"dead_cells: cell {bad.tolist()} lies outside the window {shape}")
        return np.unique(cells, axis=0)
    if fx.dead_fraction <= 0:
        return np.zeros((0, 3), np.int64)
    u = np.random.default_rng([fx.seed, 0xDEAD]).random(shape)
    return np.argwhere(u < fx.dead_fraction).astype(np.int64)


def dead_mask(cells: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Flat boolean mask (n_cells,) of the dead cells that fall in the window ``shape``."""
    mask = np.zeros(shape, bool)
    inside = np.all(cells < np.asarray(shape), axis=1)
    c = cells[inside]
    mask[c[:, 0], c[:, 1], c[:, 2]] = True
    return mask.reshape(-1)


class Digitizer:
    """The effects of one configuration on one detector window, applied row by row with per-row noise streams."""

    def __init__(self, fx: DetectorEffects, detector, shape: tuple[int, int, int]):
        self.fx = check_effects(fx)
        self.shape = tuple(shape)
        n_l, n_x, n_y = self.shape
        self.factors = calibration_factors(fx.calibration, n_l)
        self.dead_cells = dead_cell_map(fx, detector)
        self.dead = dead_mask(self.dead_cells, self.shape)
        self.cell_factor = np.repeat(self.factors, n_x * n_y).astype(np.float32)

    def apply(self, showers: np.ndarray, first_row: int) -> np.ndarray:
        """Digitized copy of ``showers`` (n, n_cells), MeV; rows are numbered from ``first_row`` for the noise."""
        x = np.asarray(showers, np.float32) * self.cell_factor
        if self.fx.noise_mev > 0:
            for i in range(len(x)):
                rng = np.random.default_rng([self.fx.seed, first_row + i])
                x[i] += rng.standard_normal(x.shape[1], dtype=np.float32) * np.float32(self.fx.noise_mev)
        x[x <= np.float32(self.fx.threshold_mev)] = 0.0  # also the negative noise of empty cells
        x[:, self.dead] = 0.0
        return x

    def attrs(self) -> dict[str, str]:
        return {"detector_effects": json.dumps({**self.fx.to_dict(), "calibration_factors": self.factors.tolist()}),
                "dead_cells": json.dumps(self.dead_cells.tolist())}


def digitize_file(src: str | Path, dst: str | Path, fx: DetectorEffects, batch_size: int = 500,
                  quiet: bool = True) -> dict[str, Any]:
    """Apply ``fx`` to every shower of ``src`` and write ``dst`` (same format, effects in the attributes)."""
    from caloforge.dataset import DatasetError, ShowerFile, ShowerWriter
    from caloforge.progress import progress

    with ShowerFile(src) as f:
        if f.detector is None:
            raise DatasetError(f"{src}: no detector description (attribute 'detector_json'); expected a caloforge "
                               f"shower file")
        if "detector_effects" in f.attrs:
            raise DatasetError(f"{src}: attribute 'detector_effects' present: the file is already digitized; "
                               f"expected true energies (a Geant4 or model file)")
        dig = Digitizer(fx, f.detector, f.shape)
        skip = {"complete", "n_showers", "layout", "compression", "n_cells"}
        attrs = {k: v for k, v in f.attrs.items() if k not in skip}
        attrs.update(dig.attrs())
        attrs["digitized_from"] = str(src)
        with ShowerWriter(dst, f.detector, f.n_cells, attrs) as w, \
                progress(len(f), "digitize", "shower", quiet) as bar:
            for start in range(0, len(f), batch_size):
                b = f.read(start, start + batch_size)
                w.append(b.conditions, dig.apply(b.showers, start))
                bar.update(len(b))
        return {"showers": len(f), "dead_cells_in_window": int(dig.dead.sum()),
                "calibration_factors": dig.factors.tolist()}


def effects_of_file(path: str | Path) -> DetectorEffects | None:
    """The effects recorded in a digitized file (None for a file of true energies)."""
    from caloforge.dataset import DatasetError, ShowerFile

    with ShowerFile(path) as f:
        text = f.attrs.get("detector_effects")
    if text is None:
        return None
    try:
        d = json.loads(text)
        d.pop("calibration_factors", None)
        cal = d.get("calibration", "")
        return DetectorEffects(**{**d, "calibration": tuple(cal) if isinstance(cal, list) else cal,
                                  "dead_cells": tuple(tuple(c) for c in d.get("dead_cells", ()))})
    except (json.JSONDecodeError, TypeError) as err:
        raise DatasetError(f"{path}: attribute 'detector_effects' is invalid ({err})") from None


# ---- the command ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="shower file of true energies (Geant4 or a model)")
    p.add_argument("-o", "--output", required=True, help="output shower file (.h5)")
    p.add_argument("--config", metavar="EFFECTS.toml", help="the effects as TOML (keys: noise_mev, threshold_mev, "
                   "dead_fraction, calibration, dead_cells, seed); the options below override it")
    p.add_argument("--noise-mev", type=float, help=f"Gaussian noise sigma per cell, MeV (default {0.1 * MIP_MEV:g} = "
                   f"0.1 MIP)")
    p.add_argument("--threshold-mev", type=float, help=f"readout threshold, MeV; cells at or below read 0 (default "
                   f"{0.5 * MIP_MEV:g} = 0.5 MIP)")
    p.add_argument("--dead-fraction", type=float, help="fraction of dead cells drawn from the seed (default 0)")
    p.add_argument("--calibration", help="per-layer factors: '0-9=1.10,20-29=0.95' or one factor for all")
    p.add_argument("--seed", type=int, help="seed of the dead-cell map and the noise (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from caloforge.validate import check_output_file, check_seed, same_file

    fx = load_effects(args.config) if args.config else DetectorEffects()
    over = {k: getattr(args, k) for k in ("noise_mev", "threshold_mev", "dead_fraction", "calibration", "seed")
            if getattr(args, k) is not None}
    check_seed(args.seed)
    fx = check_effects(replace(fx, **over), "command line")
    if same_file(args.input, args.output):
        raise ValueError(f"-o {args.output}: is the input file; expected another path")
    check_output_file(args.output, overwrite=args.overwrite)
    info = digitize_file(args.input, args.output, fx, quiet=args.quiet)
    print(f"{args.output}: {info['showers']} showers digitized (noise {fx.noise_mev:g} MeV, threshold "
          f"{fx.threshold_mev:g} MeV, {info['dead_cells_in_window']} dead cells in the window, calibration "
          f"{fx.calibration or 'none'}, seed {fx.seed})")
    return 0
