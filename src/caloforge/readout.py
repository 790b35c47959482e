"""The cells of one readout layer, as data: a rectangular grid, a list of hexagons, or (r, phi) bins.

Every kind answers the same questions, so that the observables, the Geant4 scoring and the tests need no special
cases: how many cells, each cell's centre (x, y) and area (mm, mm^2), which cell holds a point (:meth:`locate`,
-1 outside), the bounding box, and its description as a plain dict (TOML/JSON). Cells are numbered

- ``grid``: x slow, y fast (C order of an (n_x, n_y) image), like the house detector's (layer, x, y) windows;
- ``hex``: in the order of the ``centres`` list;
- ``polar``: angle slow, radius fast (the CaloChallenge order), angular bins of equal width from ``phi0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SQRT3 = math.sqrt(3.0)
MAX_CELLS_PER_LAYER = 1_000_000


class ReadoutError(ValueError):
    """A readout description is invalid."""


def _num(d: dict, key: str, where: str, kind=float):
    if key not in d:
        raise ReadoutError(f"{where}: missing field {key!r}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ReadoutError(f"{where}: field {key!r} is {v!r:.60}; expected a number")
    if kind is int:
        if float(v) != int(v):
            raise ReadoutError(f"{where}: field {key!r} is {v!r}; expected an integer")
        return int(v)
    v = float(v)
    if not math.isfinite(v) or abs(v) > 1e7:
        raise ReadoutError(f"{where}: field {key!r} is {v}; expected a finite length in mm")
    return v


@dataclass(frozen=True)
class GridCells:
    """Rectangular cells of ``cell_x_mm`` x ``cell_y_mm``: x in [x_min, x_min + n_x * cell_x), y likewise."""

    cell_x_mm: float
    cell_y_mm: float
    x_min_mm: float
    n_x: int
    y_min_mm: float
    n_y: int
    kind: str = "grid"

    def __post_init__(self) -> None:
        if self.cell_x_mm <= 0 or self.cell_y_mm <= 0:
            raise ReadoutError(f"grid cells: cell_x_mm={self.cell_x_mm}, cell_y_mm={self.cell_y_mm}; expected > 0")
        if not (1 <= self.n_x <= 10_000 and 1 <= self.n_y <= 10_000) or self.n_x * self.n_y > MAX_CELLS_PER_LAYER:
            raise ReadoutError(f"grid cells: n_x={self.n_x}, n_y={self.n_y}; expected 1 to 10000 each and at most "
                               f"{MAX_CELLS_PER_LAYER} cells")

    @property
    def n_cells(self) -> int:
        return self.n_x * self.n_y

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        x = self.x_min_mm + (np.arange(self.n_x) + 0.5) * self.cell_x_mm
        y = self.y_min_mm + (np.arange(self.n_y) + 0.5) * self.cell_y_mm
        cx, cy = np.meshgrid(x, y, indexing="ij")
        return cx.ravel(), cy.ravel()

    def areas(self) -> np.ndarray:
        return np.full(self.n_cells, self.cell_x_mm * self.cell_y_mm)

    def locate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ix = np.floor((np.asarray(x, float) - self.x_min_mm) / self.cell_x_mm).astype(np.int64)
        iy = np.floor((np.asarray(y, float) - self.y_min_mm) / self.cell_y_mm).astype(np.int64)
        inside = (ix >= 0) & (ix < self.n_x) & (iy >= 0) & (iy < self.n_y)
        return np.where(inside, ix * self.n_y + iy, -1)

    def bounds(self) -> tuple[float, float, float, float]:
        """(x_lo, x_hi, y_lo, y_hi) mm of the area the cells cover."""
        return (self.x_min_mm, self.x_min_mm + self.n_x * self.cell_x_mm,
                self.y_min_mm, self.y_min_mm + self.n_y * self.cell_y_mm)

    def to_dict(self) -> dict:
        return {"kind": "grid", "cell_x_mm": self.cell_x_mm, "cell_y_mm": self.cell_y_mm, "x_min_mm": self.x_min_mm,
                "n_x": self.n_x, "y_min_mm": self.y_min_mm, "n_y": self.n_y}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> GridCells:
        return cls(_num(d, "cell_x_mm", where), _num(d, "cell_y_mm", where), _num(d, "x_min_mm", where),
                   _num(d, "n_x", where, int), _num(d, "y_min_mm", where), _num(d, "n_y", where, int))


@dataclass(frozen=True)
class HexCells:
    """Regular hexagons of flat-to-flat width ``pitch_mm`` centred on points of the hexagonal lattice through the
    origin. ``orientation`` ``pointy``: corners at +-y, flat sides at +-x, lattice rows along x; ``flat``: the
    same turned by 90 degrees. ``centres`` lists the cells (any patch of the lattice, e.g. a sensor's 128 cells).
    """

    pitch_mm: float
    centres_mm: tuple[tuple[float, float], ...]
    orientation: str = "pointy"
    kind: str = "hex"

    def __post_init__(self) -> None:
        if not self.pitch_mm > 0:
            raise ReadoutError(f"hex cells: pitch_mm is {self.pitch_mm}; expected > 0")
        if self.orientation not in ("pointy", "flat"):
            raise ReadoutError(f"hex cells: orientation is {self.orientation!r}; expected 'pointy' or 'flat'")
        if not 1 <= len(self.centres_mm) <= MAX_CELLS_PER_LAYER:
            raise ReadoutError(f"hex cells: {len(self.centres_mm)} centres; expected 1 to {MAX_CELLS_PER_LAYER}")
        c = np.asarray(self.centres_mm, float).reshape(-1, 2)
        q, r = self._lattice(c[:, 0], c[:, 1])
        qi, ri = np.rint(q), np.rint(r)
        bad = np.flatnonzero((np.abs(q - qi) > 1e-3) | (np.abs(r - ri) > 1e-3))
        if len(bad):
            x, y = self.centres_mm[bad[0]]
            raise ReadoutError(f"hex cells: centre {bad[0]} ({x}, {y}) mm is not on the hexagonal lattice of pitch "
                               f"{self.pitch_mm} mm through the origin ({self.orientation} orientation; "
                               f"tolerance 0.1 % of the pitch)")
        keys = qi.astype(np.int64) * 1_000_003 + ri.astype(np.int64)
        if len(np.unique(keys)) != len(keys):
            raise ReadoutError("hex cells: two centres are the same cell (hexagons would overlap)")
        order = np.argsort(keys)
        object.__setattr__(self, "_keys", (keys[order], order))
        sx, sy = self.pitch_mm * (qi + ri / 2), self.pitch_mm * SQRT3 / 2 * ri  # the exact lattice points
        object.__setattr__(self, "_exact", (sx, sy) if self.orientation == "pointy" else (sy, sx))

    @property
    def n_cells(self) -> int:
        return len(self.centres_mm)

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """The centres on the exact lattice (the listed ones may be rounded)."""
        return self._exact[0].copy(), self._exact[1].copy()

    def areas(self) -> np.ndarray:
        return np.full(self.n_cells, SQRT3 / 2 * self.pitch_mm**2)

    @property
    def circumradius_mm(self) -> float:
        return self.pitch_mm / SQRT3

    def _lattice(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional axial lattice coordinates (q, r): centre = q * a1 + r * a2."""
        if self.orientation == "flat":
            x, y = y, x
        r = np.asarray(y, float) / (self.pitch_mm * SQRT3 / 2)
        q = np.asarray(x, float) / self.pitch_mm - r / 2
        return q, r

    def locate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        q, r = self._lattice(np.asarray(x, float), np.asarray(y, float))
        s = -q - r
        rq, rr, rs = np.rint(q), np.rint(r), np.rint(s)  # cube rounding: the nearest lattice point
        dq, dr, ds = np.abs(rq - q), np.abs(rr - r), np.abs(rs - s)
        fix_q = (dq > dr) & (dq > ds)
        fix_r = ~fix_q & (dr > ds)
        rq = np.where(fix_q, -rr - rs, rq)
        rr = np.where(fix_r, -rq - rs, rr)
        keys = rq.astype(np.int64) * 1_000_003 + rr.astype(np.int64)
        sorted_keys, order = self._keys
        pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
        return np.where(sorted_keys[pos] == keys, order[pos], -1)

    def bounds(self) -> tuple[float, float, float, float]:
        x, y = self.centres()
        rx, ry = (self.pitch_mm / 2, self.circumradius_mm)[:: 1 if self.orientation == "pointy" else -1]
        return float(x.min() - rx), float(x.max() + rx), float(y.min() - ry), float(y.max() + ry)

    def to_dict(self) -> dict:
        return {"kind": "hex", "pitch_mm": self.pitch_mm, "orientation": self.orientation,
                "centres_mm": [list(c) for c in self.centres_mm]}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> HexCells:
        pitch = _num(d, "pitch_mm", where)
        if "centres_mm" in d:
            try:
                centres = tuple((float(x), float(y)) for x, y in d["centres_mm"])
            except (TypeError, ValueError):
                raise ReadoutError(f"{where}: field 'centres_mm' must be a list of [x, y] pairs in mm") from None
        elif "rings" in d:
            centres = hex_rings(_num(d, "rings", where, int), pitch, str(d.get("orientation", "pointy")))
        else:
            raise ReadoutError(f"{where}: hex cells need 'centres_mm' (a list of [x, y]) or 'rings'")
        return cls(pitch, centres, str(d.get("orientation", "pointy")))


def hex_rings(rings: int, pitch_mm: float, orientation: str = "pointy") -> tuple[tuple[float, float], ...]:
    """Centres of a hexagonal patch: the central cell and ``rings`` rings around it (1 + 3 n (n + 1) cells),
    ordered by ring."""
    if not 0 <= rings <= 500:
        raise ReadoutError(f"hex cells: rings is {rings}; expected 0 to 500")
    out = [(0, 0)]
    dirs = [(1, 0), (1, -1), (0, -1), (-1, 0), (-1, 1), (0, 1)]  # axial steps around a ring
    for k in range(1, rings + 1):
        q, r = k * dirs[4][0], k * dirs[4][1]
        for side in range(6):
            for _ in range(k):
                out.append((q, r))
                q, r = q + dirs[side][0], r + dirs[side][1]
    res = []
    for q, r in out:
        x, y = pitch_mm * (q + r / 2), pitch_mm * SQRT3 / 2 * r
        res.append((x, y) if orientation == "pointy" else (y, x))
    return tuple((round(x, 9) + 0.0, round(y, 9) + 0.0) for x, y in res)


@dataclass(frozen=True)
class PolarCells:
    """(r, phi) bins about the beam axis (x = y = 0): radial ``r_edges_mm`` (increasing, from >= 0) times
    ``n_phi`` equal angular bins starting at ``phi0_deg`` (default -180, the CaloChallenge convention).
    A cell's centre is (r_mid cos phi_mid, r_mid sin phi_mid) with the bin midpoints (0, 0 for a full ring)."""

    r_edges_mm: tuple[float, ...]
    n_phi: int
    phi0_deg: float = -180.0
    kind: str = "polar"

    def __post_init__(self) -> None:
        e = np.asarray(self.r_edges_mm, float)
        if len(e) < 2 or e[0] < 0 or np.any(np.diff(e) <= 0) or not np.all(np.isfinite(e)):
            raise ReadoutError(f"polar cells: r_edges_mm {list(self.r_edges_mm)[:12]}; expected at least two "
                               f"increasing radii >= 0 (mm)")
        if not 1 <= self.n_phi <= 4096 or self.n_phi * (len(e) - 1) > MAX_CELLS_PER_LAYER:
            raise ReadoutError(f"polar cells: n_phi is {self.n_phi}; expected 1 to 4096")

    @property
    def n_r(self) -> int:
        return len(self.r_edges_mm) - 1

    @property
    def n_cells(self) -> int:
        return self.n_r * self.n_phi

    def _phi_mid(self) -> np.ndarray:
        return np.radians(self.phi0_deg) + (np.arange(self.n_phi) + 0.5) * 2 * np.pi / self.n_phi

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        e = np.asarray(self.r_edges_mm, float)
        aa, rr = np.meshgrid(self._phi_mid(), 0.5 * (e[:-1] + e[1:]), indexing="ij")
        if self.n_phi == 1:
            return np.zeros(self.n_cells), np.zeros(self.n_cells)
        return (rr * np.cos(aa)).ravel(), (rr * np.sin(aa)).ravel()

    def areas(self) -> np.ndarray:
        e = np.asarray(self.r_edges_mm, float)
        ring = np.pi * (e[1:] ** 2 - e[:-1] ** 2) / self.n_phi
        return np.tile(ring, self.n_phi)

    def locate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.asarray(x, float), np.asarray(y, float)
        r = np.hypot(x, y)
        ir = np.searchsorted(np.asarray(self.r_edges_mm, float), r, side="right") - 1
        phi = np.mod(np.arctan2(y, x) - np.radians(self.phi0_deg), 2 * np.pi)
        ip = np.minimum((phi / (2 * np.pi / self.n_phi)).astype(np.int64), self.n_phi - 1)
        inside = (ir >= 0) & (ir < self.n_r)
        return np.where(inside, ip * self.n_r + ir, -1)

    def bounds(self) -> tuple[float, float, float, float]:
        r = float(self.r_edges_mm[-1])
        return -r, r, -r, r

    def to_dict(self) -> dict:
        return {"kind": "polar", "r_edges_mm": list(self.r_edges_mm), "n_phi": self.n_phi, "phi0_deg": self.phi0_deg}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> PolarCells:
        try:
            edges = tuple(float(v) for v in d["r_edges_mm"])
        except KeyError:
            raise ReadoutError(f"{where}: missing field 'r_edges_mm'") from None
        except (TypeError, ValueError):
            raise ReadoutError(f"{where}: field 'r_edges_mm' must be a list of radii in mm") from None
        phi0 = _num(d, "phi0_deg", where) if "phi0_deg" in d else -180.0
        return cls(edges, _num(d, "n_phi", where, int), phi0)


Cells = GridCells | HexCells | PolarCells
KINDS = {"grid": GridCells, "hex": HexCells, "polar": PolarCells}
FIELDS = {"grid": {"kind", "cell_x_mm", "cell_y_mm", "x_min_mm", "n_x", "y_min_mm", "n_y"},
          "hex": {"kind", "pitch_mm", "orientation", "centres_mm", "rings"},
          "polar": {"kind", "r_edges_mm", "n_phi", "phi0_deg"}}


def cells_from_dict(d: dict, where: str) -> Cells:
    """A readout from its description; ``where`` names it in errors."""
    if not isinstance(d, dict):
        raise ReadoutError(f"{where}: 'cells' is {d!r:.60}; expected a table with a 'kind'")
    kind = d.get("kind")
    if kind not in KINDS:
        raise ReadoutError(f"{where}: cells 'kind' is {kind!r}; expected one of {', '.join(KINDS)}")
    unknown = sorted(map(str, set(d) - FIELDS[kind]))
    if unknown:  # a typo'd field would otherwise be ignored and its default used
        raise ReadoutError(f"{where}: unknown field {unknown[0]!r} of {kind} cells; expected some of "
                           f"{', '.join(sorted(FIELDS[kind]))}")
    return KINDS[kind].from_dict(d, where)
