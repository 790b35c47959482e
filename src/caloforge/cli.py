"""The ``caloforge`` command: one subcommand per job.

Each subcommand lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules keep heavy imports (torch, geant4) inside ``run`` so that ``caloforge --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from caloforge import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("caloforge.simulate", "simulate reference showers with Geant4"),
    "info": ("caloforge.info", "print a summary of a shower file"),
    "train": ("caloforge.train", "train a generative model on a shower file"),
    "generate": ("caloforge.generate", "generate showers with a trained model"),
    "evaluate": ("caloforge.evaluate", "compare candidate showers with reference showers: metrics and report"),
    "bench": ("caloforge.bench", "time a model against Geant4 on this machine"),
    "export": ("caloforge.export", "export a trained model to ONNX"),
    "convert": ("caloforge.calochallenge", "convert between caloforge and CaloChallenge files"),
    "run": ("caloforge.pipeline", "the whole chain: Geant4 sample, generation, evaluation report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caloforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"caloforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:  # not written yet
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        # Our own errors (DatasetError, DetectorError, ModelError, ...) are ValueErrors with clear messages.
        print(f"caloforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
