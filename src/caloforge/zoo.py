"""List the models shipped inside the package (``caloforge models``): name, family, detector, particles, conditions,
and the figures of its evaluation against held-out Geant4 (the ``zoo`` entry of its ``model.json``, written by
``scripts/ship_model.py`` with the commands that produced them).

A shipped model is used by name wherever a model directory is expected: ``caloforge generate --model multi``.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path


def shipped_models() -> dict[str, Path]:
    """Name -> directory of every model shipped inside the package (``default`` first)."""
    from caloforge.models.base import META_FILE, shipped_model_path

    root = Path(str(resources.files("caloforge").joinpath("pretrained")))
    names = ["default"] + sorted(p.name for p in root.iterdir() if (p / META_FILE).is_file())
    return {n: p for n in names if (p := shipped_model_path(n)) is not None}


def describe_model(path: Path, indent: int = 11) -> str:
    from caloforge.models import read_meta

    meta = read_meta(path)
    cond = meta.get("conditions", {})
    e = cond.get("energy_mev", [float("nan")] * 2)
    a = cond.get("angle_deg", [0.0, 0.0])
    particles = ",".join(meta.get("particles") or [str(meta.get("particle", "?"))])
    takes = ", ".join(meta.get("condition_names", ["energy", "angle"]))
    size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.")) / 1e6
    energies = f"{e[0] / 1e3:.3g}-{e[1] / 1e3:.3g} GeV"
    line = (f"{meta['family']:<10} detector {meta['detector']['name']}, {particles}, {energies}, "
            f"{a[0]:.2g}-{a[1]:.3g} deg; conditions: {takes}; {size:.1f} MB")
    zoo = meta.get("zoo")
    if zoo:
        pad = " " * indent
        line += (f"\n{pad}against held-out Geant4 ({zoo['test_set']}): classifier AUC {_f(zoo.get('auc_low'))} "
                 f"(low level) / {_f(zoo.get('auc_high'))} (high level), FPD {_f(zoo.get('fpd'))} "
                 f"(floor {_f(zoo.get('fpd_floor'))}), {zoo.get('flags')} flagged metrics")
        if zoo.get("note"):
            line += f"\n{pad}{zoo['note']}"
    return line


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="names only")


def run(args: argparse.Namespace) -> int:
    models = shipped_models()
    width = max(map(len, models), default=0) + 1
    for name, path in models.items():
        print(name if args.quiet else f"{name:<{width}}{describe_model(path, width)}")
    return 0
