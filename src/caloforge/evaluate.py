"""Compare candidate showers with reference showers: metrics with statistical floors and an HTML report.

    caloforge evaluate --reference REF.h5 --candidate GEN.h5 [--candidate GEN2.h5 --label A --label B] -o report/

Writes ``report/metrics.json`` (every number, floors, sample sizes, seeds) and ``report/report.html``.
Showers are streamed in batches; only per-shower observables and small histograms are kept, plus the
low-level classifier's subsample (at most ``--classifier-max`` showers per sample). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="reference shower file (e.g. Geant4)")
    parser.add_argument("--candidate", action="append", required=True, help="candidate shower file (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="label of each candidate, in order")
    parser.add_argument("--reference-label", default="reference", help="label of the reference sample")
    parser.add_argument("-o", "--output", default="report", help="output directory (default: report/)")
    parser.add_argument("--threshold-mev", type=float, default=0.075, help="cell threshold in MeV (default 0.075 "
                                                                            "= 0.5 MIP in 0.5 mm Si)")
    parser.add_argument("--max-showers", type=int, help="use at most N random showers of each file")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--splits", type=int, default=10, help="random half-splits for the floors (default 10)")
    parser.add_argument("--no-classifier", action="store_true", help="skip the classifier two-sample tests")
    parser.add_argument("--classifier-size", choices=["small", "challenge"], default="small",
                        help="small: 2x256 MLP, <= 12 epochs; challenge: 2x2048, 50 epochs, lr 2e-4")
    parser.add_argument("--classifier-max", type=int, default=10000,
                        help="showers per sample for the low-level classifier (default 10000)")
    parser.add_argument("--match-conditions", action="store_true",
                        help="compare only subsets with the same incident energy/angle histogram")
    parser.add_argument("--binning", help="CaloChallenge binning XML describing the cells (CaloChallenge files)")
    parser.add_argument("--particle", help="particle in the binning XML (default: the first)")
    parser.add_argument("--batch-size", type=int, default=500, help="showers read per batch (default 500)")
    parser.add_argument("--grid-min-showers", type=int, default=50,
                        help="reference showers a grid point needs to be evaluated (default 50)")
    parser.add_argument("--fail-on-flag", action="store_true", help="exit with status 1 if any metric is flagged")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def geometry_for(f, binning: str | None = None, particle: str | None = None):
    """The readout geometry of a ShowerFile: a binning XML, else the file's detector, else its embedded XML."""
    from caloforge.calochallenge import parse_binning, read_binning
    from caloforge.observables import as_geometry

    if binning:
        return as_geometry(read_binning(binning, particle))
    if f.detector is not None:
        return as_geometry(f.detector, f.shape)
    if "binning_xml" in f.attrs:
        return as_geometry(parse_binning(str(f.attrs["binning_xml"]), particle or f.attrs.get("particle") or None,
                                         source=f"{f.path}: attribute 'binning_xml'"))
    raise ValueError(f"{f.path}: no detector description in the file; give --binning XML for CaloChallenge files")


def choose_rows(n: int, max_showers: int | None, rng: np.random.Generator) -> np.ndarray:
    """All rows, or ``max_showers`` random rows (sorted, for fast HDF5 reads)."""
    if max_showers is None or max_showers >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, max_showers, replace=False))


def summarise_file(f, geometry, threshold_mev: float, rows: np.ndarray, batch_size: int = 500, on_batch=None):
    """Stream the rows of a ShowerFile into a SampleSummary (``on_batch(batch)``, if given, sees every batch)."""
    from caloforge.observables import summarise

    def batches():
        contiguous = len(rows) == len(f)
        for i in range(0, len(rows), batch_size):
            b = f.read(i, i + batch_size) if contiguous else f.read(index=rows[i:i + batch_size])
            if on_batch is not None:
                on_batch(b)
            yield b

    return summarise(batches(), geometry, threshold_mev=threshold_mev)


def reconstruction_collector(f, binning: str | None, threshold_mev: float):
    """A :class:`~caloforge.gridpoints.SampleCollector` for files with a cartesian detector window, else None
    (CaloChallenge binnings have no straight cells to fit an axis through)."""
    from caloforge.gridpoints import SampleCollector
    from caloforge.reconstruction import Window

    if binning or f.detector is None:
        return None
    try:
        return SampleCollector(Window.from_detector(f.detector, f.n_cells), threshold_mev)
    except ValueError:
        return None


def run_classifiers(ref_file, cand_file, ref_sum, cand_sum, ref_rows, cand_rows, size: str, n_max: int,
                    seed: int) -> dict:
    """Low-level and high-level classifier two-sample tests of one candidate."""
    from caloforge.classifier import config_for, high_level_inputs, low_level_inputs, two_sample_test
    from caloforge.observables import feature_matrices

    config = config_for(size, max_per_sample=n_max)
    out = {}
    if ref_file.n_cells == cand_file.n_cells:
        x, y = low_level_inputs(ref_file, cand_file, n_max, seed, ref_rows=ref_rows, cand_rows=cand_rows)
        out["low_level"] = two_sample_test(x, y, config, seed, inputs="cells / E_inc, log10 E_inc").to_dict()
        del x
    names = list(ref_sum.observables)
    xr, xc, used = feature_matrices(ref_sum.observables, cand_sum.observables, names)
    x, y = high_level_inputs(xr, xc, ref_sum.energies, cand_sum.energies, n_max, seed)
    out["high_level"] = {**two_sample_test(x, y, config, seed, inputs=f"{len(used)} observables, log10 E_inc")
                         .to_dict(), "n_features": len(used)}
    return out


def evaluate(reference: str, candidates: list[tuple[str, str]], output: str | Path, *,
             reference_label: str = "reference", threshold_mev: float = 0.075, max_showers: int | None = None,
             seed: int = 0, n_splits: int = 10,
             classifier: bool = True, classifier_size: str = "small", classifier_max: int = 10000,
             match_conditions: bool = False, binning: str | None = None, particle: str | None = None,
             batch_size: int = 500, grid_min_showers: int = 50, log=print) -> dict:
    """Run every metric for each (label, path) candidate against ``reference``; write metrics.json and report.html.

    Returns the results dictionary written to metrics.json.
    """
    from caloforge import __version__
    from caloforge.dataset import ShowerFile
    from caloforge.flags import apply_rule
    from caloforge.metrics import compare_conditions, compare_summaries, matched_indices
    from caloforge.report import render_html, write_metrics_json

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    ref_file = ShowerFile(reference)
    geom = geometry_for(ref_file, binning, particle)
    ref_rows = choose_rows(len(ref_file), max_showers, rng)
    log(f"reference {reference}: summarising {len(ref_rows)} of {len(ref_file)} showers")
    ref_collector = reconstruction_collector(ref_file, binning, threshold_mev)
    ref_sum = summarise_file(ref_file, geom, threshold_mev, ref_rows, batch_size, on_batch=ref_collector)
    results: dict = {
        "caloforge_version": __version__, "threshold_mev": threshold_mev, "seed": seed, "warnings": [],
        "reference": {"label": reference_label, "path": str(reference), "n_total": len(ref_file),
                      "n_used": len(ref_rows), "geometry": geom.name},
        "options": {"max_showers": max_showers, "n_splits": n_splits, "classifier": classifier,
                    "classifier_size": classifier_size, "classifier_max": classifier_max,
                    "match_conditions": match_conditions, "binning": binning, "particle": particle,
                    "grid_min_showers": grid_min_showers},
        "candidates": {},
    }
    summaries = {reference_label: ref_sum}
    seed_samples = {}  # label -> gridpoints.SampleData, for the grid-point and label checks
    for label, path in candidates:
        cand_file = ShowerFile(path)
        if cand_file.n_cells != geom.n_cells:
            raise ValueError(f"{path}: {cand_file.n_cells} cells per shower; the reference has {geom.n_cells}")
        if None not in (ref_file.detector, cand_file.detector) and \
                cand_file.detector.to_dict() != ref_file.detector.to_dict():
            raise ValueError(f"{path}: attribute 'detector_json' describes detector {cand_file.detector.name!r}; the "
                             f"reference {reference} has {ref_file.detector.name!r} (expected the same detector)")
        cand_rows = choose_rows(len(cand_file), max_showers, rng)
        log(f"candidate {label} ({path}): summarising {len(cand_rows)} of {len(cand_file)} showers")
        cand_collector = reconstruction_collector(cand_file, binning, threshold_mev) if ref_collector else None
        cand_sum = summarise_file(cand_file, geom, threshold_mev, cand_rows, batch_size, on_batch=cand_collector)
        if cand_collector is not None:
            seed_samples[label] = cand_collector.sample_data(cand_sum)
        cond = compare_conditions(ref_sum.energies, cand_sum.energies, ref_sum.angles, cand_sum.angles)
        r_sum, c_sum, r_rows, c_rows = ref_sum, cand_sum, ref_rows, cand_rows
        if cond["differ"]:
            msg = (f"{label}: incident energy/angle distributions differ from the reference (KS p = "
                   f"{cond['energy']['p_value']:.2g} energy, {cond['angle']['p_value']:.2g} angle)")
            msg += "; comparing matched subsets" if match_conditions else "; consider --match-conditions"
            results["warnings"].append(msg)
            log("WARNING: " + msg)
        if match_conditions:
            ir, ic = matched_indices(ref_sum.energies, ref_sum.angles, cand_sum.energies, cand_sum.angles, seed=seed)
            r_sum, c_sum, r_rows, c_rows = ref_sum.subset(ir), cand_sum.subset(ic), ref_rows[ir], cand_rows[ic]
            log(f"  matched conditions: {len(ir)} reference and {len(ic)} candidate showers")
        log(f"  metrics ({n_splits} half-splits)")
        res = compare_summaries(r_sum, c_sum, n_splits=n_splits, seed=seed)
        res.update({"path": str(path), "n_total": len(cand_file), "conditions_before_matching": cond,
                    "matched": match_conditions})
        if classifier:
            log(f"  classifiers ({classifier_size})")
            res["classifier"] = run_classifiers(ref_file, cand_file, r_sum, c_sum, r_rows, c_rows, classifier_size,
                                                classifier_max, seed)
        apply_rule(res)  # the classifiers join the family of tests (and the grid checks below, when made)
        results["candidates"][label] = res
        summaries[label] = c_sum
        cand_file.close()
    ref_file.close()
    if ref_collector is not None and len(seed_samples) == len(candidates):
        from caloforge.gridpoints import add_to_results

        log("grid points and label checks (reconstruction)")
        add_to_results(results, ref_collector.sample_data(ref_sum), seed_samples, seed=seed,
                       min_showers=grid_min_showers)
        for res in results["candidates"].values():
            apply_rule(res)  # one family per candidate: every metric, classifier, grid point and label check
    results["runtime_s"] = round(time.time() - t0, 2)
    write_metrics_json(results, out / "metrics.json")
    log("  report")
    render_html(results, summaries, out / "report.html")
    results["runtime_s"] = round(time.time() - t0, 2)
    write_metrics_json(results, out / "metrics.json")
    return results


def headline_figures(results: dict, label: str) -> dict:
    """The headline figures of one candidate of an evaluation (metrics.json): classifier AUCs (low, high level), FPD
    with its error and floor, the number of flagged metrics (a figure not computed is None)."""
    c = results["candidates"][label]
    classifier = c.get("classifier") or {}
    fpd = c.get("fpd") or {}
    return {"auc_low": classifier.get("low_level", {}).get("auc"),
            "auc_high": classifier.get("high_level", {}).get("auc"),
            "fpd": fpd.get("value"), "fpd_error": fpd.get("error"), "fpd_floor": fpd.get("floor"),
            "flags": len(c.get("flags", []))}


def summary_lines(results: dict) -> list[str]:
    """A short plain-text summary per candidate."""
    lines = []
    for label, res in results["candidates"].items():
        line = f"{label}: {res['n_flags']} flagged"
        names = sorted({f["name"] for f in res["flags"]})
        if names:
            line += " (" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + ")"
        for key, c in res.get("classifier", {}).items():
            line += f"; {key} AUC {c['auc']:.3f} (null sd {c['auc_null_std']:.3f})"
        if "fpd" in res:
            f = res["fpd"]
            line += (f"; FPD {f['value']:.3g} +- {f['error']:.2g} (floor {f['floor']:.3g} +- {f['floor_error']:.2g}"
                     f"{', flagged' if f['flagged'] else ''})")
        lines.append(line)
    return lines


def run(args: argparse.Namespace) -> int:
    from caloforge.events.eventfile import is_event_file
    from caloforge.validate import check_float, check_int, check_output_dir, check_seed

    check_output_dir(args.output)
    check_int(args.max_showers, "--max-showers", 1)
    check_seed(args.seed)
    if is_event_file(args.reference):  # event-level files (kind = "events"): the RWTH talk's measures
        from caloforge.events.quality import evaluate_files

        result = evaluate_files(args.reference, args.candidate, args.label, args.output, seed=args.seed,
                                max_events=args.max_showers, quiet=args.quiet)
        for line in result["summary"]:
            print(line)
        return 0
    labels = list(args.label)
    if len(labels) > len(args.candidate):
        raise ValueError(f"{len(labels)} --label given for {len(args.candidate)} --candidate files")
    labels += [Path(p).stem for p in args.candidate[len(labels):]]
    if len(set(labels)) != len(labels) or args.reference_label in labels:
        raise ValueError(f"labels must be unique and differ from the reference label: {labels}")
    check_float(args.threshold_mev, "--threshold-mev", 0.0, 1e9)
    check_int(args.splits, "--splits", 1, 10_000)
    check_int(args.classifier_max, "--classifier-max", 2)
    check_int(args.batch_size, "--batch-size", 1, 1_000_000)
    check_int(getattr(args, "grid_min_showers", None), "--grid-min-showers", 1)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    results = evaluate(
        args.reference, list(zip(labels, args.candidate)), args.output, reference_label=args.reference_label,
        threshold_mev=args.threshold_mev, max_showers=args.max_showers, seed=args.seed, n_splits=args.splits,
        classifier=not args.no_classifier, classifier_size=args.classifier_size, classifier_max=args.classifier_max,
        match_conditions=args.match_conditions, binning=args.binning, particle=args.particle,
        batch_size=args.batch_size, grid_min_showers=args.grid_min_showers, log=log,
    )
    if not args.quiet:
        print("\n".join(summary_lines(results)))
        print(f"wrote {Path(args.output) / 'metrics.json'} and {Path(args.output) / 'report.html'}")
    flagged = any(res["n_flags"] for res in results["candidates"].values())
    return 1 if (args.fail_on_flag and flagged) else 0
