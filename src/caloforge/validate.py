"""Input validation shared by the commands: option values, command-line numbers and output paths.

Every check raises a ``ValueError`` (or the caller's subclass of it) with one line naming the file or argument,
the field and what was expected; ``caloforge`` prints it and exits with status 2.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

#: Fallback bounds of integer options whose class declares none (widths, counts: keeps allocations sane).
INT_LIMIT = 4096
#: Seeds: what numpy's SeedSequence and torch's generators both take.
SEED_MAX = 2**63 - 1


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce_option(name: str, value: Any, default: Any, source: str, bounds: tuple | None = None,
                  error: type[ValueError] = ValueError) -> Any:
    """``value`` of the option ``name`` checked against the type of its ``default``: booleans must be real booleans,
    numbers real numbers (not booleans, strings, null or tables; integers integral), within ``bounds`` (lo, hi)
    inclusive when given (integers without bounds: [0, INT_LIMIT]; floats: finite); strings strings, within
    ``bounds`` (a tuple of choices) when given."""
    where = f"{source} {name} is {_describe(value)}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise error(f"{where}; expected true or false (a boolean)")
        return value
    if isinstance(default, numbers.Integral):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise error(f"{where}; expected an integer")
        if not isinstance(value, numbers.Integral):
            if not math.isfinite(float(value)) or not float(value).is_integer():
                raise error(f"{where}; expected an integer")
            value = int(value)
        lo, hi = bounds if bounds is not None else (0, INT_LIMIT)
        if not lo <= value <= hi:
            raise error(f"{where}; expected an integer in [{lo}, {hi}]")
        return int(value)
    if isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise error(f"{where}; expected a number")
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise error(f"{where}; expected a finite number")
        if bounds is not None and not bounds[0] <= v <= bounds[1]:
            raise error(f"{where}; expected a number in [{bounds[0]:g}, {bounds[1]:g}]")
        return v
    if isinstance(default, str):
        if not isinstance(value, str):
            raise error(f"{where}; expected a string")
        if bounds is not None and value not in bounds:
            raise error(f"{where}; expected one of {', '.join(map(repr, bounds))}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise error(f"{where}; expected a list")
        return tuple(value)
    return value


# ---- command-line numbers -----------------------------------------------------------------------------------
def check_int(value: int | None, flag: str, lo: int, hi: int | None = None) -> int | None:
    """An integer argument within [lo, hi] (None passes: an optional argument left out)."""
    if value is None:
        return None
    if value < lo or (hi is not None and value > hi):
        want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{flag} {value}: expected an integer {want}")
    return value


def check_float(value: float | None, flag: str, lo: float = -math.inf, hi: float = math.inf,
                hi_open: bool = False, lo_open: bool = False) -> float | None:
    """A finite float argument within its bounds (None passes)."""
    if value is None:
        return None
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{flag} {value}: expected a finite number in {left}{lo:g}, {hi:g}{right}")
    return value


def check_seed(seed: int | None, flag: str = "--seed") -> int | None:
    return check_int(seed, flag, 0, SEED_MAX)


# ---- output paths --------------------------------------------------------------------------------------------
def _check_parents(p: Path, flag: str, path: Any) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory; expected a writable path")
            return


def check_output_file(path: str | Path, flag: str = "-o", overwrite: bool | None = None) -> Path:
    """Refuse an output file path that is a directory, lies under a regular file, or exists (``overwrite=False``)."""
    p = Path(path)
    if str(path).strip() == "":
        raise ValueError(f"{flag}: empty path; expected an output file")
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; expected an output file path")
    _check_parents(p, flag, path)
    if overwrite is False and p.exists():
        raise ValueError(f"{path}: exists; use --overwrite to replace it")
    return p


def check_output_dir(path: str | Path, flag: str = "-o") -> Path:
    """Refuse an output directory path that is an existing file or lies under a regular file."""
    p = Path(path)
    if str(path).strip() == "":
        raise ValueError(f"{flag}: empty path; expected an output directory")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file; expected an output directory")
    _check_parents(p, flag, path)
    return p


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (the second need not exist)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return pa.samefile(pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()
