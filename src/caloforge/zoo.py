"""List the models shipped inside the package (``caloforge models``): name, family, detector, particles, conditions.

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


def describe_model(path: Path) -> str:
    from caloforge.models import read_meta

    meta = read_meta(path)
    cond = meta.get("conditions", {})
    e = cond.get("energy_mev", [float("nan")] * 2)
    a = cond.get("angle_deg", [0.0, 0.0])
    particles = ",".join(meta.get("particles") or [str(meta.get("particle", "?"))])
    takes = ", ".join(meta.get("condition_names", ["energy", "angle"]))
    size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.")) / 1e6
    energies = f"{e[0] / 1e3:g}-{e[1] / 1e3:g} GeV"
    return (f"{meta['family']:<10} detector {meta['detector']['name']}, {particles}, {energies}, "
            f"{a[0]:g}-{a[1]:g} deg; conditions: {takes}; {size:.1f} MB")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="names only")


def run(args: argparse.Namespace) -> int:
    for name, path in shipped_models().items():
        print(name if args.quiet else f"{name:<10} {describe_model(path)}")
    return 0
