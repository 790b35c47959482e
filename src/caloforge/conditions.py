"""Condition specs shared by ``simulate``, ``generate`` and ``bench``: one parser, one meaning.

Energy specs are written in GeV and sampled in MeV; angle specs are written and sampled in degrees:

* ``"50"``            fixed value
* ``"10:100"``        uniform in [10, 100]
* ``"log:10:100"``    log-uniform in [10, 100] (energies only)
* ``"20,50,80"``      discrete points cycling over rows: row ``i`` gets ``points[i % k]``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONDITION_COLUMNS", "Conditions", "ConditionsError", "ConditionSampler", "ConditionSpec", "PositionSpec",
    "HADRON_PDG", "canonical_particle", "hadron_names", "parse_angle_spec", "parse_energy_spec", "parse_particles",
    "parse_position_spec",
]

#: Particles a shower model or the Geant4 application takes, with their PDG codes (stored in datasets). The
#: hadrons (:data:`HADRON_PDG`) need hadronic physics: ``simulate --hadronic bertini``, a placeholder.
PARTICLE_PDG: dict[str, int] = {"gamma": 22, "e-": 11, "e+": -11, "pi+": 211, "pi-": -211, "proton": 2212}
PDG_PARTICLE: dict[int, str] = {v: k for k, v in PARTICLE_PDG.items()}
#: PDG codes of the hadrons among :data:`PARTICLE_PDG`.
HADRON_PDG: frozenset[int] = frozenset({211, -211, 2212})
_UNSUPPORTED = {"pi0", "pion", "111", "neutron", "n", "2112", "k+", "k-", "kaon", "321", "-321", "k0l", "130",
                "antiproton", "anti_proton", "-2212"}
_ALIASES = {"photon": "gamma", "electron": "e-", "positron": "e+", "22": "gamma", "11": "e-", "-11": "e+",
            "piplus": "pi+", "piminus": "pi-", "211": "pi+", "-211": "pi-", "p": "proton", "2212": "proton"}
#: Columns of the raw condition tensor that models take (``Conditions.as_array``); a new condition is a new column.
CONDITION_COLUMNS: tuple[str, ...] = ("energy_mev", "angle_deg", "x_mm", "y_mm", "pdg")
#: The largest incident energy any command takes: 10 TeV (beyond any calorimeter shower caloforge models).
MAX_ENERGY_GEV = 10_000.0
MAX_ENERGY_MEV = MAX_ENERGY_GEV * 1e3


class ConditionsError(ValueError):
    """Conditions (energy, angle, impact position, particle) that are malformed or impossible."""


@dataclass(frozen=True)
class ConditionSpec:
    """A parsed condition spec; ``sample`` returns values in output units (MeV or degrees)."""

    text: str
    kind: str  # "fixed" | "uniform" | "log-uniform" | "points"
    values: tuple[float, ...]  # output units: fixed -> (v,), ranges -> (lo, hi), points -> the points
    unit: str  # "MeV" or "deg"

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) of the values this spec can produce, in output units."""
        return (min(self.values), max(self.values))

    @property
    def n_points(self) -> int:
        return len(self.values) if self.kind == "points" else 1

    def sample(self, n: int, rng: np.random.Generator, offset: int = 0, stride: int = 1) -> np.ndarray:
        """``n`` values (float64). ``offset`` is the global index of the first row; points cycle every ``stride``
        rows (so that several point specs form a grid)."""
        if n < 0:
            raise ValueError(f"number of rows must be >= 0, got {n}")
        if self.kind == "fixed":
            return np.full(n, self.values[0], dtype=np.float64)
        if self.kind == "uniform":
            lo, hi = self.values
            return rng.uniform(lo, hi, size=n)
        if self.kind == "log-uniform":
            lo, hi = self.values
            return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
        if self.kind == "points":
            pts = np.asarray(self.values, dtype=np.float64)
            return pts[((np.arange(n) + offset) // stride) % len(pts)]
        raise ValueError(f"unknown condition spec kind {self.kind!r}")  # pragma: no cover


def _number(token: str, text: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ConditionsError(f"invalid {what} spec {text!r}: {token!r} is not a number") from None
    if not math.isfinite(value):
        raise ConditionsError(f"invalid {what} spec {text!r}: {token!r} is not finite")
    return value


def _parse(text: str, what: str, scale: float, unit: str, allow_log: bool) -> ConditionSpec:
    if not isinstance(text, str) or not text.strip():
        examples = "'50', '10:100', 'log:10:100', '20,50,80'" if allow_log else "'0', '0:30', '0,15,30'"
        raise ConditionsError(f"empty {what} spec; expected e.g. {examples}")
    s = text.strip().replace(" ", "")
    kind: str
    if s.lower().startswith("log:"):
        if not allow_log:
            raise ConditionsError(f"invalid {what} spec {text!r}: 'log:' ranges are only for energies")
        parts = s[4:].split(":")
        if len(parts) != 2:
            raise ConditionsError(f"invalid {what} spec {text!r}: expected 'log:LO:HI'")
        kind, raw = "log-uniform", [_number(p, text, what) for p in parts]
    elif ":" in s:
        parts = s.split(":")
        if len(parts) != 2:
            raise ConditionsError(f"invalid {what} spec {text!r}: expected 'LO:HI'")
        kind, raw = "uniform", [_number(p, text, what) for p in parts]
    elif "," in s:
        parts = [p for p in s.split(",") if p]
        if not parts:
            raise ConditionsError(f"invalid {what} spec {text!r}: no points")
        kind, raw = "points", [_number(p, text, what) for p in parts]
    else:
        kind, raw = "fixed", [_number(s, text, what)]
    if kind in ("uniform", "log-uniform"):
        lo, hi = raw
        if hi < lo:
            raise ConditionsError(f"invalid {what} spec {text!r}: range {lo}:{hi} has LO > HI")
        if hi == lo:
            kind, raw = "fixed", [lo]
    return ConditionSpec(text=text, kind=kind, values=tuple(v * scale for v in raw), unit=unit)


def parse_energy_spec(text: str) -> ConditionSpec:
    """Parse an energy spec written in GeV; the spec samples energies in MeV. Energies must be > 0."""
    spec = _parse(text, "energy", 1000.0, "MeV", allow_log=True)
    if min(spec.values) <= 0:
        raise ConditionsError(f"invalid energy spec {text!r}: energies must be > 0 GeV")
    if max(spec.values) > MAX_ENERGY_MEV:
        raise ConditionsError(f"invalid energy spec {text!r}: energies must be <= {MAX_ENERGY_GEV:g} GeV (10 TeV)")
    return spec


def parse_angle_spec(text: str) -> ConditionSpec:
    """Parse an incidence-angle spec in degrees; angles must lie in [0, 90)."""
    spec = _parse(text, "angle", 1.0, "deg", allow_log=False)
    if min(spec.values) < 0 or max(spec.values) >= 90:
        raise ConditionsError(f"invalid angle spec {text!r}: angles must lie in [0, 90) degrees")
    return spec


# ---- particles ---------------------------------------------------------------------------------------------
def canonical_particle(name: str) -> str:
    """A name of :data:`PARTICLE_PDG` for any accepted spelling (photon, electron, positron, piplus, p, PDG code)."""
    key = str(name).strip()
    key = _ALIASES.get(key.lower(), key)
    if key.lower() in _UNSUPPORTED:
        raise ConditionsError(f"particle {name!r} is not supported: of the hadrons, only pi+, pi- and proton can be "
                              f"simulated (with the Bertini placeholder, docs/detectors.md 'Hadrons'); expected one "
                              f"of {', '.join(PARTICLE_PDG)}")
    if key not in PARTICLE_PDG:
        raise ConditionsError(f"particle {name!r} is not supported; expected one of {', '.join(PARTICLE_PDG)}")
    return key


def hadron_names(particles) -> list[str]:
    """The hadrons (pi+, pi-, proton) among particle names or PDG codes: those need hadronic physics."""
    out = []
    for p in particles:
        code = PARTICLE_PDG[canonical_particle(p)] if isinstance(p, str) else int(p)
        if code in HADRON_PDG and PDG_PARTICLE[code] not in out:
            out.append(PDG_PARTICLE[code])
    return out


def parse_particles(text: str) -> tuple[str, ...]:
    """A particle list 'gamma' or 'gamma,e-' (rows cycle over the list)."""
    names = [p for p in str(text).replace(" ", "").split(",") if p]
    if not names:
        raise ConditionsError(f"empty particle spec {text!r}; expected e.g. 'gamma' or 'gamma,e-'")
    out = tuple(canonical_particle(p) for p in names)
    if len(set(out)) != len(out):
        raise ConditionsError(f"particle spec {text!r} names a particle twice")
    return out


# ---- impact positions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PositionSpec:
    """Impact points (x, y) in mm on the calorimeter face.

    * ``"0,0"``              fixed point
    * ``"cell"``             uniform over the cell with its lower corner at the origin, [0, c) x [0, c)
    * ``"-5:5,0:10"``        uniform over a rectangle
    * ``"0,0;2.5,2.5"``      points cycling over rows
    """

    text: str
    kind: str  # "fixed" | "uniform" | "points"
    values: tuple[tuple[float, float], ...]  # fixed: ((x, y),); uniform: ((x0, x1), (y0, y1)); points: the points

    @property
    def n_points(self) -> int:
        return len(self.values) if self.kind == "points" else 1

    @property
    def bounds(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_lo, x_hi), (y_lo, y_hi)) of the points this spec can produce."""
        if self.kind == "uniform":
            return self.values[0], self.values[1]
        xs, ys = [p[0] for p in self.values], [p[1] for p in self.values]
        return (min(xs), max(xs)), (min(ys), max(ys))

    def sample(self, n: int, rng: np.random.Generator, offset: int = 0, stride: int = 1) -> np.ndarray:
        """(n, 2) impact points in mm."""
        if self.kind == "uniform":
            (x0, x1), (y0, y1) = self.values
            return np.stack([rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)], axis=1)
        pts = np.asarray(self.values, dtype=np.float64)
        if self.kind == "fixed":
            return np.repeat(pts, n, axis=0)
        return pts[((np.arange(n) + offset) // stride) % len(pts)]


def parse_position_spec(text: str, cell_size_mm: float = 5.0) -> PositionSpec:
    """Parse an impact-position spec (mm); ``cell`` means uniform over one cell of ``cell_size_mm``."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionsError("empty position spec; expected e.g. '0,0', 'cell', '0:5,0:5' or '0,0;2.5,2.5'")
    s = text.strip().replace(" ", "")
    if s.lower() == "cell":
        c = float(cell_size_mm)
        return PositionSpec(text, "uniform", ((0.0, c), (0.0, c)))

    def pair(part: str) -> list[str]:
        xy = part.split(",")
        if len(xy) != 2:
            raise ConditionsError(f"invalid position spec {text!r}: {part!r} is not 'X,Y' (mm)")
        return xy

    if ";" in s:
        pts = [tuple(_number(v, text, "position") for v in pair(p)) for p in s.split(";") if p]
        if not pts:
            raise ConditionsError(f"invalid position spec {text!r}: no points")
        return PositionSpec(text, "points", tuple(pts))  # type: ignore[arg-type]
    xs, ys = pair(s)
    if ":" in xs or ":" in ys:
        ranges = []
        for part in (xs, ys):
            lo_hi = part.split(":") if ":" in part else [part, part]
            if len(lo_hi) != 2:
                raise ConditionsError(f"invalid position spec {text!r}: expected 'X0:X1,Y0:Y1'")
            lo, hi = (_number(v, text, "position") for v in lo_hi)
            if hi < lo:
                raise ConditionsError(f"invalid position spec {text!r}: range {lo}:{hi} has LO > HI")
            ranges.append((lo, hi))
        return PositionSpec(text, "uniform", tuple(ranges))  # type: ignore[arg-type]
    return PositionSpec(text, "fixed", ((_number(xs, text, "position"), _number(ys, text, "position")),))


# ---- the conditions of a set of showers --------------------------------------------------------------------
@dataclass
class Conditions:
    """What a shower is conditioned on, one row per shower: the structure every part of caloforge passes around.

    ``energy`` (n,) MeV, ``angle`` (n,) degrees (0 = along the layer normal, tilting towards +y), ``x`` and ``y``
    (n,) mm: the impact point on the calorimeter face, ``pdg`` (n,) PDG codes (22 gamma, 11 e-, -11 e+, 211 pi+,
    -211 pi-, 2212 proton).
    """

    energy: np.ndarray
    angle: np.ndarray
    x: np.ndarray
    y: np.ndarray
    pdg: np.ndarray

    def __post_init__(self) -> None:
        n = np.asarray(self.energy).reshape(-1).shape[0]
        self.energy = np.asarray(self.energy, dtype=np.float64).reshape(-1)
        for name in ("angle", "x", "y"):
            v = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            setattr(self, name, np.broadcast_to(v, (n,)).copy() if v.size == 1 else v)
        p = np.asarray(self.pdg).reshape(-1)
        if p.dtype.kind in "US":
            p = np.array([PARTICLE_PDG[canonical_particle(s)] for s in p.astype(str)], dtype=np.int32)
        p = p.astype(np.int32)
        self.pdg = np.broadcast_to(p, (n,)).copy() if p.size == 1 else p
        for name in ("angle", "x", "y", "pdg"):
            if getattr(self, name).shape != (n,):
                raise ConditionsError(f"conditions: {name} has {getattr(self, name).shape[0]} rows, energy has {n}")

    @classmethod
    def make(cls, energy, angle=0.0, position=(0.0, 0.0), particle="gamma") -> Conditions:
        """Conditions from arrays or scalars (broadcast to the number of energies); ``particle`` names or codes."""
        pos = np.asarray(position, dtype=np.float64)
        pos = pos.reshape(-1, 2) if pos.size else pos.reshape(0, 2)
        if isinstance(particle, str):
            particle = PARTICLE_PDG[canonical_particle(particle)]
        return cls(energy, angle, pos[:, 0], pos[:, 1], particle)

    @classmethod
    def from_array(cls, a) -> Conditions:
        """From the raw (n, len(CONDITION_COLUMNS)) array (or tensor) that models take."""
        a = np.asarray(a, dtype=np.float64)
        return cls(a[:, 0], a[:, 1], a[:, 2], a[:, 3], np.rint(a[:, 4]).astype(np.int32))

    @classmethod
    def concat(cls, parts: list[Conditions]) -> Conditions:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("energy", "angle", "x", "y", "pdg")))

    def as_array(self) -> np.ndarray:
        """(n, 5) float64 columns :data:`CONDITION_COLUMNS` (what ``ShowerModel.decode`` takes as a tensor)."""
        return np.stack([self.energy, self.angle, self.x, self.y, self.pdg.astype(np.float64)], axis=1)

    @property
    def position(self) -> np.ndarray:
        return np.stack([self.x, self.y], axis=1)

    @property
    def particles(self) -> list[str]:
        return [PDG_PARTICLE.get(int(p), str(int(p))) for p in self.pdg]

    def __len__(self) -> int:
        return int(self.energy.shape[0])

    def __getitem__(self, index) -> Conditions:
        return Conditions(self.energy[index], self.angle[index], self.x[index], self.y[index], self.pdg[index])

    def validate(self, source: str = "conditions") -> Conditions:
        """Raise :class:`ConditionsError` (naming ``source`` and the field) for values no shower can have."""
        for name in ("energy", "angle", "x", "y"):
            v = getattr(self, name)
            if not np.all(np.isfinite(v)):
                row = int(np.flatnonzero(~np.isfinite(v))[0])
                raise ConditionsError(f"{source}: {name} is NaN or inf (first at row {row}); expected finite values")
        if np.any(self.energy <= 0):
            row = int(np.flatnonzero(self.energy <= 0)[0])
            raise ConditionsError(f"{source}: energy {self.energy[row]:g} MeV at row {row}; expected > 0 MeV")
        if np.any(self.energy > MAX_ENERGY_MEV):
            row = int(np.flatnonzero(self.energy > MAX_ENERGY_MEV)[0])
            raise ConditionsError(f"{source}: energy {self.energy[row]:g} MeV at row {row}; expected <= "
                                  f"{MAX_ENERGY_MEV:g} MeV (10 TeV)")
        if np.any((self.angle < 0) | (self.angle >= 90)):
            row = int(np.flatnonzero((self.angle < 0) | (self.angle >= 90))[0])
            raise ConditionsError(f"{source}: angle {self.angle[row]:g} deg at row {row}; expected [0, 90) degrees")
        bad = ~np.isin(self.pdg, list(PDG_PARTICLE))
        if np.any(bad):
            row = int(np.flatnonzero(bad)[0])
            raise ConditionsError(f"{source}: particle code {int(self.pdg[row])} at row {row}; expected PDG codes "
                                  f"{sorted(PDG_PARTICLE)} ({', '.join(PARTICLE_PDG)})")
        return self


@dataclass(frozen=True)
class ConditionSampler:
    """Draws the conditions of rows ``offset .. offset + n`` from specs; every quantity has its own random stream.

    Point specs combine as a grid: energy points cycle fastest, then angle points, positions, particles.
    """

    energy: ConditionSpec
    angle: ConditionSpec
    position: PositionSpec
    particles: tuple[str, ...]

    @classmethod
    def parse(cls, energy: str, angle: str = "0", position: str = "0,0", particle: str = "gamma",
              cell_size_mm: float = 5.0) -> ConditionSampler:
        return cls(parse_energy_spec(energy), parse_angle_spec(angle), parse_position_spec(position, cell_size_mm),
                   parse_particles(particle))

    @property
    def grid_size(self) -> int:
        return self.energy.n_points * self.angle.n_points * self.position.n_points * len(self.particles)

    def sample(self, n: int, rngs: tuple[np.random.Generator, ...], offset: int = 0) -> Conditions:
        """``rngs``: generators for energy, angle and position (three independent streams). Row ``i`` depends on
        ``n`` only through the streams' draws: draw a fixed ``n`` and slice for a prefix that does not depend on it."""
        ke, ka, kp = self.energy.n_points, self.angle.n_points, self.position.n_points
        e = self.energy.sample(n, rngs[0], offset)
        a = self.angle.sample(n, rngs[1], offset, stride=ke)
        pos = self.position.sample(n, rngs[2], offset, stride=ke * ka)
        codes = np.array([PARTICLE_PDG[p] for p in self.particles], dtype=np.int32)
        pdg = codes[((np.arange(n) + offset) // (ke * ka * kp)) % len(codes)]
        return Conditions(e, a, pos[:, 0], pos[:, 1], pdg)
