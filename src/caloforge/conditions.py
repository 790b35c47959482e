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

__all__ = ["ConditionSpec", "parse_energy_spec", "parse_angle_spec"]


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

    def sample(self, n: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
        """``n`` values (float64). ``offset`` is the global index of the first row (cycling of points)."""
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
            return pts[(np.arange(n) + offset) % len(pts)]
        raise ValueError(f"unknown condition spec kind {self.kind!r}")  # pragma: no cover


def _number(token: str, text: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"invalid {what} spec {text!r}: {token!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"invalid {what} spec {text!r}: {token!r} is not finite")
    return value


def _parse(text: str, what: str, scale: float, unit: str, allow_log: bool) -> ConditionSpec:
    if not isinstance(text, str) or not text.strip():
        examples = "'50', '10:100', 'log:10:100', '20,50,80'" if allow_log else "'0', '0:30', '0,15,30'"
        raise ValueError(f"empty {what} spec; expected e.g. {examples}")
    s = text.strip().replace(" ", "")
    kind: str
    if s.lower().startswith("log:"):
        if not allow_log:
            raise ValueError(f"invalid {what} spec {text!r}: 'log:' ranges are only for energies")
        parts = s[4:].split(":")
        if len(parts) != 2:
            raise ValueError(f"invalid {what} spec {text!r}: expected 'log:LO:HI'")
        kind, raw = "log-uniform", [_number(p, text, what) for p in parts]
    elif ":" in s:
        parts = s.split(":")
        if len(parts) != 2:
            raise ValueError(f"invalid {what} spec {text!r}: expected 'LO:HI'")
        kind, raw = "uniform", [_number(p, text, what) for p in parts]
    elif "," in s:
        parts = [p for p in s.split(",") if p]
        if not parts:
            raise ValueError(f"invalid {what} spec {text!r}: no points")
        kind, raw = "points", [_number(p, text, what) for p in parts]
    else:
        kind, raw = "fixed", [_number(s, text, what)]
    if kind in ("uniform", "log-uniform"):
        lo, hi = raw
        if hi < lo:
            raise ValueError(f"invalid {what} spec {text!r}: range {lo}:{hi} has LO > HI")
        if hi == lo:
            kind, raw = "fixed", [lo]
    return ConditionSpec(text=text, kind=kind, values=tuple(v * scale for v in raw), unit=unit)


def parse_energy_spec(text: str) -> ConditionSpec:
    """Parse an energy spec written in GeV; the spec samples energies in MeV. Energies must be > 0."""
    spec = _parse(text, "energy", 1000.0, "MeV", allow_log=True)
    if min(spec.values) <= 0:
        raise ValueError(f"invalid energy spec {text!r}: energies must be > 0 GeV")
    return spec


def parse_angle_spec(text: str) -> ConditionSpec:
    """Parse an incidence-angle spec in degrees; angles must lie in [0, 90)."""
    spec = _parse(text, "angle", 1.0, "deg", allow_log=False)
    if min(spec.values) < 0 or max(spec.values) >= 90:
        raise ValueError(f"invalid angle spec {text!r}: angles must lie in [0, 90) degrees")
    return spec
