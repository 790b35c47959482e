"""caloforge: fast calorimeter shower simulation with generative models, validated against Geant4."""

__version__ = "0.1.0"
