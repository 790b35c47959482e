"""Figures of the refiner demonstration (scripts/refiner_demo.py): held-out data against raw and refined simulation.

Each figure has a ratio panel to data with statistical uncertainties (mplhep CMS style, as the evaluation report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caloforge.observables import layer_energies
from caloforge.report import _hist_with_ratio, _style

ORDER = (("data (held out)", "data-holdout"), ("raw simulation", "sim-holdout"),
         ("refined simulation", "refined-sim-holdout"))


def _layer_figure(plt, samples, shape):
    fig, (ax, rax) = plt.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
    layers = np.arange(shape[0])
    ref = None
    for k, (label, key) in enumerate(ORDER):
        e = layer_energies(samples[key].showers, shape) / samples[key].energies[:, None] * 1e3  # MeV per GeV
        m, err = e.mean(0), e.std(0) / np.sqrt(len(e))
        ax.errorbar(layers, m, err, fmt="o-" if k else "s", ms=3, lw=1, label=label)
        if k == 0:
            ref = (m, err)
        else:
            r = m / ref[0]
            rax.errorbar(layers, r, r * np.hypot(err / m, ref[1] / ref[0]), fmt="o", ms=3, lw=1, color=f"C{k}")
    rax.axhline(1.0, color="0.4", lw=0.8)
    rax.set_ylim(0.8, 1.2)
    rax.set_ylabel("sim. / data")
    rax.set_xlabel("layer")
    ax.set_ylabel("mean layer energy / E_inc [MeV/GeV]")
    ax.legend()
    return fig


def plot_all(samples: dict, shape: tuple[int, ...], out: Path) -> list[Path]:
    """Write layer-energies.png, hit-count.png, cell-spectrum.png into ``out``; return their paths."""
    plt, style = _style()
    paths = []
    with plt.style.context(style):
        figs = {"layer-energies": _layer_figure(plt, samples, shape)}
        hits = [(label, (samples[key].showers > 0).sum(1).astype(float)) for label, key in ORDER]
        edges = np.linspace(min(h.min() for _, h in hits), max(h.max() for _, h in hits), 41)
        figs["hit-count"] = _hist_with_ratio(plt, hits, edges, "cells with energy > 0 per shower")
        cells = [(label, samples[key].showers[samples[key].showers > 0]) for label, key in ORDER]
        figs["cell-spectrum"] = _hist_with_ratio(plt, cells, np.logspace(-3, 2, 61), "cell energy [MeV]",
                                                 logx=True, density=False, vline=0.075)
        for name, fig in figs.items():
            p = Path(out) / f"{name}.png"
            fig.savefig(p, dpi=100, bbox_inches="tight")
            plt.close(fig)
            paths.append(p)
    return paths
