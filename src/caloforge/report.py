"""The evaluation report: ``metrics.json`` (every number) and a self-contained ``report.html``.

The HTML embeds every figure as a base64 PNG (matplotlib, Agg backend, mplhep CMS style with smaller fonts):
conditions, a histogram with ratio panel for every global observable, per-layer observables at six
representative layers and as mean-versus-layer profiles, longitudinal/radial/cell-energy profiles, mean images
of four layers, the energy response (mu90, sigma90/mu90 versus E) when the files hold discrete energies, and a
summary table in which flagged metrics (see caloforge.metrics) are highlighted. For cartesian detector windows:
the grid-point tables and figures and the label checks of caloforge.gridpoints (``grid_html``, ``grid_figures``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from pathlib import Path

import numpy as np

from caloforge.flags import rule_sentence
from caloforge.gridpoints import GRID_QUANTITIES
from caloforge.metrics import common_edges
from caloforge.observables import GLOBAL_OBSERVABLES, PER_LAYER_FAMILIES, SampleSummary, layer_name, spectrum_edges

COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
LABELS = {
    "e_vis": "visible energy [MeV]", "e_vis_weighted": "sampling-weighted visible energy [MeV]",
    "e_ratio": "E_vis / E_inc", "e_ratio_weighted": "weighted E_vis / E_inc", "n_hits": "number of hits",
    "hit_e_mean": "mean hit energy [MeV]", "cog_x": "centre of gravity x [mm]", "cog_y": "centre of gravity y [mm]",
    "cog_z": "centre of gravity z [mm]", "r_mean": "mean distance to shower axis [mm]",
    "shower_depth": "shower depth s_d [layers]", "shower_depth_width": "shower depth width sigma_sd [layers]",
    "deepest_layer": "deepest layer with energy", "axis_angle_y": "reconstructed angle in y-z [deg]",
    "e_layer": "layer energy [MeV]", "frac": "layer energy fraction", "eratio": "E_ratio (two hottest cells)",
    "width_x": "lateral width x [mm]", "width_y": "lateral width y [mm]",
}


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_metrics_json(results: dict, path: str | Path) -> Path:
    """Write every number (NaN as null) to ``path``."""
    path = Path(path)
    text = json.dumps(results, indent=1, default=_json_default, allow_nan=True)
    path.write_text(text.replace("NaN", "null").replace("-Infinity", "null").replace("Infinity", "null"))
    return path


# ---- plotting helpers -------------------------------------------------------------------------------------
def _style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    style = dict(mplhep.style.CMS)
    style.update({"font.size": 11, "axes.labelsize": 11, "axes.titlesize": 11, "legend.fontsize": 9,
                  "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.figsize": (6, 5), "lines.linewidth": 1.4})
    return plt, style


def _png(fig, tight: bool = True) -> str:
    """The figure as base64 PNG (``tight=False`` skips the extra layout pass, for large grids)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_edges(ref: np.ndarray) -> np.ndarray:
    """Finite bin edges for plotting, from the same reference binning as the separation power."""
    edges = common_edges(ref)[1:-1]
    return edges if len(edges) >= 2 else np.array([-0.5, 0.5])


def _hist_with_ratio(plt, samples: list[tuple[str, np.ndarray]], edges: np.ndarray, xlabel: str,
                     logx: bool = False, density: bool = True, vline: float | None = None):
    """Step histograms (first = reference, filled) with Poisson error bars and a candidate/reference panel."""
    fig, (ax, rax) = plt.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
    centres = 0.5 * (edges[1:] + edges[:-1])
    ref_h = ref_e = None
    for k, (label, values) in enumerate(samples):
        counts = np.histogram(values[np.isfinite(values)], edges)[0].astype(float)
        norm = counts.sum() * np.diff(edges) if density else np.ones(len(counts))
        norm = np.where(norm > 0, norm, 1.0)
        h, e = counts / norm, np.sqrt(counts) / norm
        colour = COLOURS[k % len(COLOURS)] if k else "0.5"
        if k == 0:
            ax.stairs(h, edges, fill=True, alpha=0.35, color=colour, label=label)
            ref_h, ref_e = h, e
        else:
            ax.stairs(h, edges, color=colour, label=label)
            ax.errorbar(centres, h, e, fmt="none", ecolor=colour, lw=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ref_h > 0, h / ref_h, np.nan)
                rerr = ratio * np.sqrt((e / np.where(h > 0, h, np.nan)) ** 2 + (ref_e / ref_h) ** 2)
            rax.errorbar(centres, ratio, rerr, fmt="o", ms=2.5, color=colour, lw=1)
    rax.axhline(1.0, color="0.4", lw=0.8)
    rax.set_ylim(0.5, 1.5)
    rax.set_ylabel("cand. / ref.")
    rax.set_xlabel(xlabel)
    ax.set_ylabel("normalised" if density else "entries")
    if vline is not None:
        ax.axvline(vline, color="k", ls="--", lw=0.8)
    if logx:
        ax.set_xscale("log")
    ax.legend()
    return fig


# ---- figures ----------------------------------------------------------------------------------------------
def _conditions_figure(plt, summaries: dict[str, SampleSummary]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, (label, s) in enumerate(summaries.items()):
        colour = COLOURS[k % len(COLOURS)] if k else "0.5"
        for ax, values, xl in ((axes[0], s.energies / 1e3, "incident energy [GeV]"),
                               (axes[1], s.angles, "incidence angle [deg]")):
            lo, hi = values.min(), values.max()
            edges = np.linspace(lo - 0.5, hi + 0.5, 41) if hi > lo else np.array([lo - 0.5, lo + 0.5])
            ax.hist(values, edges, histtype="step", color=colour, label=label, density=True)
            ax.set_xlabel(xl)
    axes[0].legend()
    return fig


def _representative_layers(ref: SampleSummary, n: int = 6) -> list[int]:
    """``n`` layers spread over the depth that holds most of the reference energy."""
    prof = ref.profiles["longitudinal"].sum(axis=0)
    cum = np.cumsum(prof) / max(prof.sum(), 1e-300)
    lo, hi = int(np.searchsorted(cum, 0.02)), int(np.searchsorted(cum, 0.98))
    return sorted(set(np.linspace(lo, min(hi, len(prof) - 1), n).round().astype(int).tolist()))


def _layer_family_figure(plt, family: str, summaries: dict[str, SampleSummary], layers: list[int]):
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    ref = next(iter(summaries.values()))
    for ax, layer in zip(axes.ravel(), layers):
        name = layer_name(family, layer)
        edges = _plot_edges(ref.observables[name])
        for k, (label, s) in enumerate(summaries.items()):
            v = s.observables[name]
            if not np.isfinite(v).any():
                continue
            ax.hist(v[np.isfinite(v)], edges, histtype="step", density=True, label=label,
                    color=COLOURS[k % len(COLOURS)] if k else "0.4", lw=1.2)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel(LABELS.get(family, family))
    axes.ravel()[0].legend()
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.95, bottom=0.1, hspace=0.45, wspace=0.3)
    return fig


def _layer_mean_figure(plt, family: str, summaries: dict[str, SampleSummary]):
    fig, ax = plt.subplots(figsize=(6, 4))
    ref = next(iter(summaries.values()))
    n_layers = ref.geometry.n_layers
    for k, (label, s) in enumerate(summaries.items()):
        vals = np.column_stack([s.observables[layer_name(family, i)] for i in range(n_layers)])
        cnt = np.isfinite(vals).sum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # layers without any defined value
            mean = np.nanmean(vals, axis=0)
            err = np.nanstd(vals, axis=0) / np.sqrt(np.maximum(cnt, 1))
        ax.errorbar(np.arange(n_layers) + 0.1 * k, mean, err, fmt="o-", ms=3, lw=1, label=label,
                    color=COLOURS[k % len(COLOURS)] if k else "0.4")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean {LABELS.get(family, family)}")
    ax.legend()
    return fig


def _profile_figure(plt, name: str, summaries: dict[str, SampleSummary]):
    ref = next(iter(summaries.values()))
    n_bins = ref.profiles[name].shape[1]
    if name == "longitudinal":
        edges, xl, logx = np.arange(n_bins + 1) - 0.5, "layer", False
    elif name == "radial":
        from caloforge.observables import radial_edges

        edges = radial_edges(ref.geometry)
        edges = np.append(edges[:-1], 2 * edges[-2] - edges[-3])
        xl, logx = "distance to shower axis [mm] (last bin: overflow)", False
    else:
        edges, xl, logx = spectrum_edges(ref.threshold_mev), "cell energy [MeV]", True
    fig, (ax, rax) = plt.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
    ref_mean, ref_err = None, None
    for k, (label, s) in enumerate(summaries.items()):
        p = s.profiles[name]
        mean, err = p.mean(axis=0), p.std(axis=0) / np.sqrt(len(p))
        colour = COLOURS[k % len(COLOURS)] if k else "0.5"
        ax.stairs(mean, edges, color=colour, label=label, fill=k == 0, alpha=0.35 if k == 0 else 1)
        centres = 0.5 * (edges[1:] + edges[:-1]) if not logx else np.sqrt(edges[1:] * edges[:-1])
        if k == 0:
            ref_mean, ref_err = mean, err
        else:
            ax.errorbar(centres, mean, err, fmt="none", ecolor=colour, lw=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ref_mean > 0, mean / ref_mean, np.nan)
                rerr = ratio * np.hypot(err / np.where(mean > 0, mean, np.nan), ref_err / ref_mean)
            rax.errorbar(centres, ratio, rerr, fmt="o", ms=2.5, color=colour, lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("energy per shower [MeV]" if name != "spectrum" else "cells per shower")
    if name == "spectrum":
        ax.axvline(ref.threshold_mev, color="k", ls="--", lw=0.8, label="threshold")
        ax.set_xscale("log")
    rax.axhline(1.0, color="0.4", lw=0.8)
    rax.set_ylim(0.5, 1.5)
    rax.set_ylabel("cand. / ref.")
    rax.set_xlabel(xl)
    ax.legend()
    return fig


def _layer_image(ax, geom, image: np.ndarray, layer: int, vmin: float, vmax: float):
    from matplotlib.colors import LogNorm

    sl = geom.layer_slices[layer]
    x, y, v = geom.cell_x[sl], geom.cell_y[sl], image[sl]
    ux, uy = np.unique(x), np.unique(y)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    if len(ux) * len(uy) == len(v):
        grid = v.reshape(len(ux), len(uy)) if np.all(x[:: len(uy)] == ux) else v.reshape(len(uy), len(ux)).T
        dx, dy = (ux[1] - ux[0] if len(ux) > 1 else 1.0), (uy[1] - uy[0] if len(uy) > 1 else 1.0)
        extent = (uy[0] - dy / 2, uy[-1] + dy / 2, ux[-1] + dx / 2, ux[0] - dx / 2)
        return ax.imshow(np.where(grid > 0, grid, np.nan), norm=norm, extent=extent, aspect="auto")
    return ax.scatter(y, x, c=np.where(v > 0, v, np.nan), norm=norm, s=12, marker="s")


def _images_figure(plt, summaries: dict[str, SampleSummary], layers: list[int]):
    ref = next(iter(summaries.values()))
    images = {label: s.mean_image() for label, s in summaries.items()}
    positive = np.concatenate([im[im > 0] for im in images.values()])
    vmin, vmax = (np.percentile(positive, 1), positive.max()) if len(positive) else (1e-6, 1.0)
    fig, axes = plt.subplots(len(layers), len(images), figsize=(3.2 * len(images), 2.9 * len(layers)),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for c, (label, im) in enumerate(images.items()):
            art = _layer_image(axes[r, c], ref.geometry, im, layer, vmin, vmax)
            axes[r, c].set_title(f"{label}, layer {layer}", fontsize=9)
            axes[r, c].set_xlabel("y [mm]")
            axes[r, c].set_ylabel("x [mm]")
    fig.subplots_adjust(hspace=0.45, wspace=0.35)
    fig.colorbar(art, ax=axes, label="mean cell energy [MeV]", shrink=0.6)
    return fig


def _response_figure(plt, response: dict[str, dict], key: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, (label, rows) in enumerate(response.items()):
        e = np.array([r["energy"] for r in rows]) / 1e3
        colour = COLOURS[k % len(COLOURS)] if k else "0.4"
        for ax, q in ((axes[0], "mu90"), (axes[1], "resolution")):
            ax.errorbar(e * (1 + 0.01 * k), [r[q] for r in rows], [r[f"{q}_err"] for r in rows], fmt="o-",
                        ms=3, lw=1, color=colour, label=label)
            ax.set_xscale("log")
            ax.set_xlabel("incident energy [GeV]")
    axes[0].set_ylabel(f"mu90 of {key}")
    axes[1].set_ylabel(f"sigma90 / mu90 of {key}")
    axes[0].legend()
    fig.tight_layout()
    return fig


# ---- grid points and label checks (caloforge.gridpoints) ---------------------------------------------------
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
GRID_STAT_LABELS = {(q, stat): label for q, stat, label in GRID_QUANTITIES}  # (quantity, statistic) -> label


def _sample_colour(k: int) -> str:
    return COLOURS[k % len(COLOURS)] if k else "0.3"


def _grid_curve(points: list[dict], label: str, quantity: str, stat: str, scale=None) -> tuple[np.ndarray, ...]:
    """(values, errors) of one statistic over ``points`` for sample ``label``, optionally divided by ``scale``."""
    v = np.array([p["stats"][label][quantity][stat] for p in points], float)
    e = np.array([p["stats"][label][quantity][f"{stat}_err"] for p in points], float)
    s = np.ones(len(points)) if scale is None else np.asarray(scale, float)
    return v / s, e / s


def _angular_response_figure(plt, grid: dict):
    """Per particle: mean (reco - true) angle and the angular resolution sigma90 versus the true angle."""
    points = grid["points"]
    labels = list(points[0]["stats"])
    particles = sorted({p["particle"] for p in points})
    energies = sorted({p["energy"] for p in points})
    fig, axes = plt.subplots(2, len(particles), figsize=(4.5 * len(particles) + 1, 7), squeeze=False)
    for col, particle in enumerate(particles):
        for k, label in enumerate(labels):
            for m, energy in enumerate(energies):
                sel = [p for p in points if p["particle"] == particle and p["energy"] == energy]
                if not sel:
                    continue
                a = np.array([p["angle"] for p in sel]) + 0.4 * (k - (len(labels) - 1) / 2)
                mean, mean_err = _grid_curve(sel, label, "angle", "mean")
                width, width_err = _grid_curve(sel, label, "angle", "sigma90")
                kw = dict(fmt=MARKERS[m % len(MARKERS)], ms=4, lw=1, color=_sample_colour(k),
                          label=f"{label}, {energy / 1e3:g} GeV")
                axes[0, col].errorbar(a, mean - np.array([p["angle"] for p in sel]), mean_err, **kw)
                axes[1, col].errorbar(a, width, width_err, **kw)
        axes[0, col].axhline(0.0, color="0.5", lw=0.8)
        axes[0, col].set_title(particle)
        axes[0, col].set_ylabel("mean reco. - true angle [deg]")
        axes[1, col].set_ylabel("angular resolution sigma90 [deg]")
        axes[1, col].set_xlabel("true incidence angle [deg]")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _grid_energy_figure(plt, grid: dict, quantity: str):
    """Per angle: mu90 (over E_true) and sigma90/mu90 of ``quantity`` versus the incident energy, per particle."""
    points = grid["points"]
    labels = list(points[0]["stats"])
    angles = sorted({p["angle"] for p in points})
    particles = sorted({p["particle"] for p in points})
    fig, axes = plt.subplots(2, len(angles), figsize=(4.2 * len(angles) + 1, 7), squeeze=False)
    for col, angle in enumerate(angles):
        for k, label in enumerate(labels):
            for m, particle in enumerate(particles):
                sel = sorted((p for p in points if p["angle"] == angle and p["particle"] == particle),
                             key=lambda p: p["energy"])
                if not sel:
                    continue
                e = np.array([p["energy"] for p in sel])
                scale = e if quantity == "e_vis" else None
                mu, mu_err = _grid_curve(sel, label, quantity, "mu90", scale)
                res, res_err = _grid_curve(sel, label, quantity, "resolution")
                kw = dict(fmt=MARKERS[m % len(MARKERS)] + "-", ms=4, lw=1, color=_sample_colour(k),
                          label=f"{label}, {particle}")
                x = e / 1e3 * (1 + 0.01 * k)
                axes[0, col].errorbar(x, mu, mu_err, **kw)
                axes[1, col].errorbar(x, res, res_err, **kw)
        axes[0, col].set_title(f"{angle:g} deg")
        axes[0, col].set_ylabel("mu90 / E_true" if quantity == "e_vis" else "mu90 of E_cal / E_true")
        axes[1, col].set_ylabel("sigma90 / mu90")
        axes[1, col].set_xlabel("incident energy [GeV]")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _grid_pull_figure(plt, results: dict):
    """Pull (candidate - reference) / error of every compared statistic at every point, one panel per statistic;
    flagged pulls ringed in black."""
    names = [p["name"] for p in results["grid"]["points"]]
    keys = list(GRID_STAT_LABELS)
    fig, axes = plt.subplots(2, 5, figsize=(16, 6.5), sharex=True)
    for ax, key in zip(axes.ravel(), keys):
        for k, (label, res) in enumerate(results["candidates"].items(), start=1):
            rows = [r for r in res.get("grid", {}).get("rows", []) if (r["quantity"], r["statistic"]) == key]
            x = np.array([r["point"] for r in rows]) + 0.1 * (k - 1)
            pulls = np.array([np.nan if r["pull"] is None else r["pull"] for r in rows], float)
            ax.plot(x, pulls, "o", ms=4, color=_sample_colour(k), label=label)
            flagged = np.array([r["flagged"] for r in rows], bool)
            ax.plot(x[flagged], pulls[flagged], "o", ms=8, mfc="none", mec="k", mew=1.2)
        ax.axhspan(-3, 3, color="0.92", zorder=0)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_title(GRID_STAT_LABELS[key], fontsize=9)
    for ax in axes[1]:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    axes[0, 0].set_ylabel("pull")
    axes[1, 0].set_ylabel("pull")
    axes[0, 0].legend(fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.95, bottom=0.28, hspace=0.25, wspace=0.3)
    return fig


def _labels_figure(plt, labels: dict):
    """Per label: profile of reco versus true with the fitted line (top), mean reco - true per truth bin (bottom)."""
    fits = labels["fits"]
    names = list(next(iter(fits.values())))
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.4]})
    for col, name in enumerate(names):
        unit = labels["units"].get(name, "")
        for k, (label, sample) in enumerate(fits.items()):
            f = sample[name]
            prof = f["profile"]
            t, r, e = (np.array(prof[key], float) for key in ("true_mean", "reco_mean", "reco_err"))
            if not len(t):
                continue
            text = f"{label}: slope {_fmt(f['slope'])} +- {_fmt(f['slope_err'])}" if f["truth_varies"] else \
                f"{label}: bias {_fmt(f['bias'])}"
            axes[0, col].errorbar(t, r, e, fmt=MARKERS[k % len(MARKERS)], ms=4, color=_sample_colour(k), label=text)
            if f["truth_varies"] and np.isfinite(f["slope"]):
                grid = np.linspace(t.min(), t.max(), 2)
                axes[0, col].plot(grid, f["intercept"] + f["slope"] * grid, color=_sample_colour(k), lw=1)
            axes[1, col].errorbar(t, r - t, e, fmt=MARKERS[k % len(MARKERS)], ms=3, color=_sample_colour(k))
        lo, hi = axes[0, col].get_xlim()
        axes[0, col].plot([lo, hi], [lo, hi], ls="--", color="0.6", lw=0.8)
        axes[0, col].set_ylabel(f"reconstructed {name} [{unit}]")
        axes[0, col].legend(fontsize=7)
        axes[1, col].axhline(0.0, color="0.5", lw=0.8)
        axes[1, col].set_ylabel(f"reco - true [{unit}]")
        axes[1, col].set_xlabel(f"true {name} [{unit}]")
    fig.tight_layout()
    return fig


def grid_figures(plt, results: dict) -> dict[str, list[tuple[str, str]]]:
    """Report sections with the grid-point and label-check figures (empty when the evaluation has none)."""
    out: dict[str, list[tuple[str, str]]] = {}
    grid = results.get("grid")
    if grid and grid.get("points"):
        out["Grid points (after reconstruction)"] = [
            ("angular response and resolution versus true angle", _png(_angular_response_figure(plt, grid))),
            ("visible energy: mu90/E and sigma90/mu90 versus energy, per angle",
             _png(_grid_energy_figure(plt, grid, "e_vis"))),
            ("calibrated energy (reference calibration): response and resolution versus energy, per angle",
             _png(_grid_energy_figure(plt, grid, "e_cal_response"))),
        ]
        if results["candidates"]:
            pulls = _png(_grid_pull_figure(plt, results), tight=False)
            out["Grid points (after reconstruction)"].append(("pulls per point (band: |pull| < 3; ringed: flagged)",
                                                              pulls))
    if results.get("labels"):
        out["Label checks"] = [("reconstructed versus true impact x, y, angle and energy",
                                _png(_labels_figure(plt, results["labels"])))]
    return out


def _pm(row: dict, key: str) -> str:
    return f"{_fmt(row[key])} &plusmn; {_fmt(row[f'{key}_err'])}"


def grid_summary_rows(res: dict) -> list[str]:
    """Rows of a candidate's summary table for its grid-point and label comparisons."""
    rows = []
    for key, what in (("grid", "grid points: visible/calibrated energy, hits, CoG z, radius, angle (pulls)"),
                      ("labels", "labels: reco vs true x, y, angle, energy (slope, RMS, bias pulls)")):
        c = res.get(key)
        if c:
            pulls = [abs(r["pull"]) for r in c["rows"] if r["pull"] is not None]
            rows.append(f"<tr><td>{what}</td><td>{c['n_flagged']} of {c['n_tests']} tests</td>"
                        f"<td>max |pull| {_fmt(max(pulls, default=None))}</td>"
                        f"<td>{'FLAG' if c['n_flagged'] else 'ok'}</td></tr>")
    return rows


def _comparison_table(rows: list[dict], first: tuple[str, ...]) -> str:
    head = "".join(f"<th>{h}</th>" for h in (*first, "reference", "candidate", "rel. diff", "pull"))
    body = []
    for r in rows:
        cls = ' class="flag"' if r["flagged"] else ""
        lead = "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in first)
        body.append(f"<tr>{lead}<td>{_pm(r, 'reference')}</td><td>{_pm(r, 'candidate')}</td>"
                    f"<td>{_fmt(r['rel_diff'])}</td><td{cls}>{_fmt(r['pull'])}</td></tr>")
    return f"<table class='summary'><tr>{head}</tr>{''.join(body)}</table>"


def grid_html(results: dict) -> str:
    """The grid-point and label-check tables (empty string when the evaluation has none)."""
    if not results.get("labels"):
        return ""
    cal = results.get("reconstruction", {}).get("calibration", {})
    from caloforge.conditions import PDG_PARTICLE
    from caloforge.reconstruction import MIN_LAYER_FRACTION

    consts = ", ".join(f"{PDG_PARTICLE.get(int(k), k)} {_fmt(v)}" for k, v in cal.get("per_pdg", {}).items())
    parts = ["<h2>Grid points and label checks</h2>",
             f"<p>Reconstruction (docs/evaluation.md): calibrated energy = c x sampling-weighted visible energy, "
             f"with c fitted on the reference ({html.escape(consts)}); axis = straight-line fit of the layer "
             f"centroids (layers above {MIN_LAYER_FRACTION:.0%} of the shower), angle = atan(dy/dz), impact point = "
             f"the axis at z = 0.</p>"]
    grid = results.get("grid")
    if grid:
        rule = grid["rule"]
        skipped = ", ".join(f"{p['name']} ({p['n']} showers)" for p in grid["skipped"])
        parts.append(f"<p>{len(grid['points'])} grid points (distinct energy, angle, particle with at least "
                     f"{rule['min_showers']} reference showers; at most {rule['max_points']} combinations)"
                     + (f"; skipped: {html.escape(skipped)}" if skipped else "") + ".</p>")
    else:
        parts.append("<p>The reference is not a grid of conditions: no per-point section.</p>")
    for label, res in results["candidates"].items():
        if res.get("grid"):
            rows = [{**r, "statistic": GRID_STAT_LABELS.get((r["quantity"], r["statistic"]), r["statistic"])}
                    for r in res["grid"]["rows"]]
            parts.append(f"<details><summary>{html.escape(label)}: grid points, {res['grid']['n_flagged']} of "
                         f"{res['grid']['n_tests']} flagged</summary>{_comparison_table(rows, ('name', 'statistic'))}"
                         "</details>")
        if res.get("labels"):
            parts.append(f"<details open><summary>{html.escape(label)}: labels, {res['labels']['n_flagged']} of "
                         f"{res['labels']['n_tests']} flagged (fit reco = a + b true over the whole sample)</summary>"
                         f"{_comparison_table(res['labels']['rows'], ('label', 'statistic'))}</details>")
    return "\n".join(parts)


# ---- HTML -------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _observable_rows(name: str, metrics: dict) -> str:
    cells = []
    flagged = False
    for key in ("separation_power", "wasserstein1", "ks"):
        m = metrics[key]
        flagged |= m["flagged"]
        cls = ' class="flag"' if m["flagged"] else ""
        cells.append(f"<td{cls}>{_fmt(m['value'])}</td><td>{_fmt(m['floor'])} &plusmn; {_fmt(m['floor_std'])}</td>")
    row_cls = ' class="flagrow"' if flagged else ""
    return f"<tr{row_cls}><td>{html.escape(name)}</td>{''.join(cells)}<td>{'FLAG' if flagged else 'ok'}</td></tr>"


def _summary_table(label: str, res: dict) -> str:
    head = ("<tr><th>observable</th><th>sep. power</th><th>floor &plusmn; sd</th><th>W1</th><th>floor &plusmn; sd</th>"
            "<th>KS</th><th>floor &plusmn; sd</th><th>status</th></tr>")
    glob = [n for n in GLOBAL_OBSERVABLES if n in res["observables"]]
    layer = [n for n in res["observables"] if n not in glob]
    n_flag_layer = sum(any(m["flagged"] for m in res["observables"][n].values()) for n in layer)
    parts = [f"<h3>{html.escape(label)}: N_ref = {res['n_reference']}, N_cand = {res['n_candidate']}, "
             f"metrics at matched size {res['n_half']} vs {res['n_half']} over {res['n_splits']} random splits "
             f"(seed {res['seed']})</h3>"]
    multi = ["<table class='summary'><tr><th>test</th><th>value</th><th>floor</th><th>status</th></tr>"]
    for name, r in res["profiles"].items():
        multi.append(f"<tr><td>{name} profile (sep. power)</td><td>{_fmt(r['value'])}</td>"
                     f"<td>{_fmt(r['floor'])} &plusmn; {_fmt(r['floor_std'])}</td>"
                     f"<td>{'FLAG' if r['flagged'] else 'ok'}</td></tr>")
    c = res["correlations"]
    multi.append(f"<tr><td>correlations, Fisher z chi2/ndf ({c['n_features']} features)</td><td>{_fmt(c['value'])}"
                 f"</td><td>{_fmt(c['floor'])} &plusmn; {_fmt(c['floor_std'])}</td>"
                 f"<td>{'FLAG' if c['flagged'] else 'ok'}</td></tr>")
    for key in ("fpd", "kpd"):
        if key in res:
            r = res[key]
            multi.append(f"<tr><td>{key.upper()}</td><td>{_fmt(r['value'])} &plusmn; {_fmt(r['error'])}</td>"
                         f"<td>{_fmt(r['floor'])} &plusmn; {_fmt(r['floor_error'])}</td>"
                         f"<td>{'FLAG' if r['flagged'] else 'ok'}</td></tr>")
    for key, r in res.get("classifier", {}).items():
        if "auc" in r:
            multi.append(f"<tr><td>classifier ({key}): AUC / JSD</td><td>{_fmt(r['auc'])} / {_fmt(r['jsd'])}</td>"
                         f"<td>0.5 &plusmn; {_fmt(r['auc_null_std'])}</td>"
                         f"<td>{'FLAG' if r['flagged'] else 'ok'}</td></tr>")
    for key, r in res.get("response", {}).items():
        bad = [row for row in r["comparison"] if row["flagged"]]
        pulls = [abs(row[f"{q}_pull"]) for row in r["comparison"] for q in ("mu90", "resolution")]
        multi.append(f"<tr><td>energy response {key} (mu90, sigma90/mu90 pulls)</td><td>{len(bad)} of "
                     f"{len(r['comparison'])} energies</td><td>max |pull| {_fmt(max(pulls, default=None))}</td>"
                     f"<td>{'FLAG' if bad else 'ok'}</td></tr>")
    multi.extend(grid_summary_rows(res))
    multi.append("</table>")
    parts += multi
    parts.append(f"<table class='summary'>{head}{''.join(_observable_rows(n, res['observables'][n]) for n in glob)}"
                 "</table>")
    parts.append(f"<details><summary>per-layer observables ({len(layer)}, {n_flag_layer} flagged)</summary>"
                 f"<table class='summary'>{head}{''.join(_observable_rows(n, res['observables'][n]) for n in layer)}"
                 "</table></details>")
    return "\n".join(parts)


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px} table{border-collapse:collapse;margin:0.6em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:right} td:first-child{text-align:left}
.flag{background:#f6b3b3;font-weight:bold} .flagrow td:last-child{color:#b00;font-weight:bold}
.warn{background:#fff3c4;padding:0.5em;border:1px solid #e0c060} figure{display:inline-block;margin:4px}
img{max-width:100%}"""


def _figure_html(title: str, b64: str) -> str:
    return (f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'/>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def render_html(results: dict, summaries: dict[str, SampleSummary], path: str | Path) -> Path:
    """Write the self-contained HTML report; ``summaries`` maps labels to samples, the reference first."""
    plt, style = _style()
    ref = next(iter(summaries.values()))
    figures: dict[str, list[tuple[str, str]]] = {}
    with plt.rc_context(style):
        figures["Conditions"] = [("incident energy and angle", _png(_conditions_figure(plt, summaries)))]
        glob = []
        for name in GLOBAL_OBSERVABLES:
            samples = [(label, s.observables[name]) for label, s in summaries.items()]
            glob.append((name, _png(_hist_with_ratio(plt, samples, _plot_edges(ref.observables[name]),
                                                     LABELS.get(name, name)))))
        figures["Global observables"] = glob
        figures["Profiles"] = [(f"{n} profile", _png(_profile_figure(plt, n, summaries)))
                               for n in ("longitudinal", "radial", "spectrum")]
        layers = _representative_layers(ref)
        per_layer = []
        for fam in PER_LAYER_FAMILIES:
            per_layer.append((f"{fam}: mean per layer", _png(_layer_mean_figure(plt, fam, summaries))))
            per_layer.append((f"{fam}: layers {layers}",
                              _png(_layer_family_figure(plt, fam, summaries, layers), tight=False)))
        figures["Per-layer observables"] = per_layer
        image_layers = [layers[i] for i in np.linspace(0, len(layers) - 1, min(4, len(layers))).round().astype(int)]
        figures["Mean images"] = [("mean cell energy",
                                   _png(_images_figure(plt, summaries, image_layers), tight=False))]
        resp = []
        first = next(iter(results["candidates"].values()), {})
        for key in first.get("response", {}):
            curves = {results["reference"]["label"]: first["response"][key]["reference"]}
            for label, res in results["candidates"].items():
                curves[label] = res["response"][key]["candidate"]
            resp.append((f"energy response {key}", _png(_response_figure(plt, curves, key))))
        if resp:
            figures["Energy response"] = resp
        figures.update(grid_figures(plt, results))
    body = [f"<h1>caloforge evaluation</h1><p>reference: {html.escape(results['reference']['label'])} "
            f"({html.escape(str(results['reference']['path']))}), threshold {results['threshold_mev']} MeV, "
            f"seed {results['seed']}. Floors compare two disjoint halves of the reference. "
            f"<span class='rule'>{html.escape(rule_sentence())}</span> (see docs/evaluation.md).</p>"]
    for w in results.get("warnings", []):
        body.append(f"<p class='warn'>{html.escape(w)}</p>")
    body.append("<h2>Summary</h2>")
    for label, res in results["candidates"].items():
        body.append(_summary_table(label, res))
    body.append(grid_html(results))
    for section, figs in figures.items():
        body.append(f"<h2>{html.escape(section)}</h2>")
        body.extend(_figure_html(t, b) for t, b in figs)
    path = Path(path)
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>caloforge evaluation</title>"
                    f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return path
