"""Per-variable distributions of event samples against the Pythia reference, with ratio panels (mplhep style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caloforge.events import PROCESSES

N_BINS = 40


def _edges(x: np.ndarray) -> np.ndarray:
    lo, hi = np.quantile(x, [0.005, 0.995])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, N_BINS + 1)


def plot_distributions(reference, candidates: list, output: Path) -> list[str]:
    """One PNG per process: a (main, ratio) panel pair per variable; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep
    from matplotlib.ticker import MaxNLocator

    files = []
    names = reference.names
    ncol = 6
    nrow = int(np.ceil(len(names) / ncol))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    with plt.style.context(mplhep.style.CMS):
        for proc, lab in PROCESSES.items():
            ref = reference.high_level[reference.process == lab]
            if len(ref) == 0:
                continue
            fig = plt.figure(figsize=(4 * ncol, 4 * nrow))
            grid = fig.add_gridspec(2 * nrow, ncol, height_ratios=[3, 1] * nrow, hspace=0.35, wspace=0.3)
            for i, name in enumerate(names):
                r, c = divmod(i, ncol)
                ax, rax = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
                edges = _edges(ref[:, i])
                centres = 0.5 * (edges[1:] + edges[:-1])
                h_ref, _ = np.histogram(ref[:, i], edges)
                norm_ref = max(h_ref.sum(), 1)
                ax.stairs(h_ref / norm_ref, edges, fill=True, alpha=0.3, color="grey", label="Pythia")
                ax.errorbar(centres, h_ref / norm_ref, yerr=np.sqrt(h_ref) / norm_ref, fmt="none", color="grey")
                for k, (clab, cand) in enumerate(candidates):
                    x = cand.high_level[cand.process == lab][:, i]
                    h, _ = np.histogram(x, edges)
                    norm = max(h.sum(), 1)
                    col = colors[k % len(colors)]
                    ax.stairs(h / norm, edges, color=col, label=clab)
                    ok = (h_ref > 0) & (h > 0)
                    ratio = (h[ok] / norm) / (h_ref[ok] / norm_ref)
                    err = ratio * np.sqrt(1 / h[ok] + 1 / h_ref[ok])
                    rax.errorbar(centres[ok], ratio, yerr=err, fmt=".", color=col, ms=3)
                rax.axhline(1.0, color="grey", lw=1)
                rax.set_ylim(0.5, 1.5)
                rax.set_xlabel(name, fontsize=10)
                rax.set_ylabel("ratio", fontsize=9)
                for a in (ax, rax):  # few ticks: 52 axes with the style's minor ticks take a minute to draw
                    a.minorticks_off()
                    a.xaxis.set_major_locator(MaxNLocator(4))
                    a.yaxis.set_major_locator(MaxNLocator(3))
                    a.tick_params(labelsize=8)
                ax.set_xticklabels([])
                if i == 0:
                    ax.legend(fontsize=8)
            fig.suptitle(f"{proc}: per-variable distributions (normalised), candidate / Pythia", fontsize=14, y=0.93)
            path = Path(output) / f"distributions-{proc}.png"
            fig.savefig(path, dpi=60)
            plt.close(fig)
            files.append(path.name)
    return files
