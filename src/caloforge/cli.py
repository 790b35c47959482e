"""The ``caloforge`` command: one subcommand per job.

Each subcommand lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules keep heavy imports (torch, geant4) inside ``run`` so that ``caloforge --help`` is instant.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
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
    "models": ("caloforge.zoo", "list the models shipped inside the package"),
    "detectors": ("caloforge.detector_cli", "list the detectors, describe one, export a CaloChallenge binning XML"),
    "tune": ("caloforge.tune", "scan a model family's hyper-parameters with Optuna (resumable study)"),
    "events": ("caloforge.events.cli",
               "event-level ttH/ttbb variables: produce, split, train, generate, evaluate, bench"),
    "digitize": ("caloforge.digitize", "apply detector effects (noise, threshold, dead cells, calibration)"),
    "refine": ("caloforge.refiner", "train and apply a refiner that makes simulated showers look like data"),
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


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations up to 32 MB from the heap and to keep up to 1 GB of freed memory, instead of
    fresh mmaps that the kernel page-faults in and zeroes again for every batch (per-chunk temporaries of 4-37 MB
    while sampling; on a virtual machine those faults cost a tenth to a fifth of a generate job). Applied to
    caloforge's own processes only, not on import; ``CALOFORGE_MALLOC=0`` leaves the allocator alone. Returns whether
    it was applied."""
    if os.environ.get("CALOFORGE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as err:
        # Our own errors (DatasetError, DetectorError, ModelError, ...) are ValueErrors with clear messages.
        print(f"caloforge {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # file not found, permission denied, a directory where a file was expected, disk full
        if err.filename and err.strerror:
            msg = f"{err.filename}: {err.strerror}"
        else:
            msg = _one_line(err)
        print(f"caloforge {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else is a bug: one line for the user, the traceback in a file
        log = _write_traceback(args.command)
        print(f"caloforge {args.command}: internal error (a bug): {type(err).__name__}: {_one_line(err)}; "
              f"full traceback in {log}", file=sys.stderr)
        return 3


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _write_traceback(command: str) -> str:
    """Write the current exception's traceback to a file under the system temp dir; return its path."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix=f"caloforge-{command}-", suffix=".log")
        with open(fd, "w") as f:
            f.write(f"caloforge {__version__} {command}: {' '.join(map(str, sys.argv))}\n")
            traceback.print_exc(file=f)
        return path
    except OSError:
        traceback.print_exc()
        return "(could not be written: printed above)"


if __name__ == "__main__":
    raise SystemExit(main())
