"""Print a summary of one or more shower files (conditions, provenance, visible energy, occupancy)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="shower HDF5 file(s)")


def run(args: argparse.Namespace) -> int:
    from caloforge.dataset import describe

    for i, path in enumerate(args.files):
        if i:
            print()
        print(describe(path))
    return 0
