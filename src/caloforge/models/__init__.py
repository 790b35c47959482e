"""Generative shower models: one interface (:class:`ShowerModel`), a registry of families, load/save.

>>> from caloforge.models import families, get_family, load_model
>>> families()
['bibae', 'calogan', 'cfm', 'densewgan', 'gan3d', 'layerflow', 'wgan']
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path

from caloforge.models.base import (
    ConditionsWarning,
    ModelConfig,
    ModelError,
    ShowerModel,
    TrainBatch,
    load_model,
    read_meta,
    save_model,
)

__all__ = [
    "ConditionsWarning", "ModelConfig", "ModelError", "ShowerModel", "TrainBatch", "DEFAULT_MODELS",
    "default_model_path", "families", "get_family", "load_default_model", "load_model", "read_meta", "save_model",
]

#: The shipped defaults, most specialised first: a command run without ``--model`` uses the first that covers every
#: row it is asked for (see :meth:`ShowerModel.covers`). ``default`` is the photon model at normal incidence on a
#: cell corner (slightly closer to Geant4 there, and faster); ``multi`` covers the whole condition space (photons
#: and electrons, 10-100 GeV, 0-60 degrees, any impact point in a cell).
DEFAULT_MODELS = ("default", "multi")

# family name -> module defining it (imported lazily; each module defines exactly one ShowerModel subclass).
_FAMILIES: dict[str, str] = {
    "bibae": "caloforge.models.bibae",
    "calogan": "caloforge.models.calogan",
    "cfm": "caloforge.models.cfm",
    "densewgan": "caloforge.models.densewgan",
    "gan3d": "caloforge.models.gan3d",
    "layerflow": "caloforge.models.layerflow",
    "wgan": "caloforge.models.wgan",
}


def families() -> list[str]:
    """Names of the registered model families."""
    return sorted(_FAMILIES)


def get_family(name: str) -> type[ShowerModel]:
    """The model class of a family, or a ModelError listing the known families."""
    if name not in _FAMILIES:
        raise ModelError(f"unknown model family {name!r}; known families: {families()}")
    module = importlib.import_module(_FAMILIES[name])
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, ShowerModel) and getattr(obj, "family", "") == name:
            return obj
    raise ModelError(f"module {_FAMILIES[name]} defines no ShowerModel with family {name!r}")  # pragma: no cover


def default_model_path() -> Path:
    """The shipped default model (``caloforge/pretrained``), or a ModelError if none is shipped."""
    path = Path(str(resources.files("caloforge").joinpath("pretrained")))
    if not (path / "model.json").is_file():
        raise ModelError(f"{path}: no shipped default model yet; pass --model runs/NAME (a model trained with "
                         f"`caloforge train`)")
    return path


def load_default_model(conditions=None, device="cpu", first: ShowerModel | None = None,
                       angled: bool = False) -> ShowerModel:
    """The shipped default model for a request: the first of :data:`DEFAULT_MODELS` that covers every row of
    ``conditions`` (a :class:`~caloforge.conditions.Conditions`; with ``angled``, in the angled readout window);
    without conditions, the last one, which covers the whole condition space. ``first``: the first default, if the
    caller has it loaded already. The model's ``meta["name"]`` says which one it is."""
    names = DEFAULT_MODELS if conditions is not None else DEFAULT_MODELS[-1:]
    for name in names:
        model = first if first is not None and name == DEFAULT_MODELS[0] else load_model(name, device=device)
        if name == names[-1] or model.covers(conditions, angled):
            model.meta["name"] = name
            return model
    raise AssertionError("unreachable")  # pragma: no cover
