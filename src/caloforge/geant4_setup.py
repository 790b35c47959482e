"""Importing Geant4 (geant4-pybind) without its data sets, and never attempting a download.

geant4-pybind asks to download the Geant4 data sets on import unless every data variable is set. When the
user has real data sets (``GEANT4_DATA_DIR`` or ``G4LEDATA`` pointing at them) we use them and Geant4's
standard EM physics; otherwise every variable points at an empty directory and caloforge uses its
data-free EM physics list (see :mod:`caloforge.physics`).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

DATA_VARIABLES = (
    "G4LEDATA", "G4LEVELGAMMADATA", "G4RADIOACTIVEDATA", "G4PARTICLEXSDATA", "G4PIIDATA", "G4REALSURFACEDATA",
    "G4SAIDXSDATA", "G4ABLADATA", "G4INCLDATA", "G4ENSDFSTATEDATA", "G4CHANNELINGDATA", "G4NEUTRONHPDATA",
)


def real_em_data() -> str | None:
    """Path of a real G4EMLOW data set if the user configured one, else None."""
    le = os.environ.get("G4LEDATA")
    if le and Path(le, "brem_SB").is_dir():
        return le
    root = os.environ.get("GEANT4_DATA_DIR")
    if root:
        for cand in sorted(glob.glob(os.path.join(root, "G4EMLOW*"))):
            if Path(cand, "brem_SB").is_dir():
                return cand
    return None


def _empty_data_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caloforge" / "geant4-no-data"
    for var in DATA_VARIABLES:
        (base / var).mkdir(parents=True, exist_ok=True)
    # G4NuclideTable aborts without this file, even an empty one is fine.
    (base / "G4ENSDFSTATEDATA" / "ENSDFSTATE.dat").touch()
    return base


def prepare_environment() -> bool:
    """Set the Geant4 data variables before import; True when real EM data sets are available."""
    if real_em_data() is not None:
        if "GEANT4_DATA_DIR" not in os.environ:  # only G4LEDATA given: fill the others, or the import prompts
            base = _empty_data_dir()
            for var in DATA_VARIABLES:
                os.environ.setdefault(var, str(base / var))
        return True
    base = _empty_data_dir()
    os.environ.pop("GEANT4_DATA_DIR", None)
    for var in DATA_VARIABLES:
        os.environ[var] = str(base / var)
    return False


def import_geant4():
    """Import and return the ``geant4_pybind`` module with the data environment prepared.

    geant4-pybind's import-time data check treats ``CI=true`` as permission to download and then lists
    ``~/.geant4_pybind``, which fails when that folder does not exist (as on a fresh CI machine). The data
    variables are all set by now, so nothing is to be downloaded: hide ``CI`` for the duration of the import.
    """
    prepare_environment()
    ci = os.environ.pop("CI", None)
    try:
        import geant4_pybind
    finally:
        if ci is not None:
            os.environ["CI"] = ci
    return geant4_pybind
