"""List the detectors, describe one layer by layer, or export its CaloChallenge binning XML.

    caloforge detectors                       # the built-in detectors, one line each
    caloforge detectors cc-ds2                # layers: materials, samplings, X0, MIP sampling fraction, cells
    caloforge detectors cc-ds2 --binning-xml binning_dataset_2.xml
    caloforge detectors my-calo.toml --json   # the description as stored in shower files
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("detector", nargs="?", help="a built-in detector name or a detector file (.toml/.yaml/.json)")
    p.add_argument("--binning-xml", metavar="PATH", help="write the CaloChallenge binning XML ((r, phi) readouts)")
    p.add_argument("--particle", default="electron", help="particle name in the binning XML (default electron)")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --binning-xml file")


def describe(name: str) -> str:
    from caloforge.detector import X0_MM, load_detector

    d = load_detector(name)
    lines = [f"{d.name}: {d.description}", f"  {d.readout_summary()}",
             f"  {d.n_layers} readout layers, {d.depth_mm:g} mm deep, {d.size_x_mm:g} x {d.size_y_mm:g} mm"]
    if d.dead_cells:
        lines.append(f"  dead cells (read zero): {d.dead_cells_summary()}")
    x0 = 0.0
    for i, ly in enumerate(d.layers):
        try:
            x0 += ly.passive_x0() + ly.samplings * ly.active_mm / X0_MM.get(ly.active, float("inf"))
            sf = f"MIP sampling fraction {ly.mip_sampling_fraction():.4f}"
            depth = f"back at {x0:.2f} X0"
        except ValueError:
            sf, depth = "", ""
        stack = " + ".join([f"{t:g} mm {m}" for m, t in ly.passive] + [f"{ly.absorber_mm:g} mm {ly.absorber}",
                                                                          f"{ly.active_mm:g} mm {ly.active}"])
        rep = f"{ly.samplings} x " if ly.samplings > 1 else ""
        lines.append(f"  layer {i:2d}: {rep}[{stack}]  {depth}  {sf}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from caloforge.detector import builtin_detectors, load_detector
    from caloforge.validate import check_output_file

    if args.detector is None:
        if args.binning_xml or args.json:
            raise ValueError("--binning-xml and --json need a detector")
        for name in builtin_detectors():
            d = load_detector(name)
            print(f"{name:16s} {d.readout_summary()}")
        return 0
    d = load_detector(args.detector)
    if args.binning_xml:
        from caloforge.calochallenge import binning_xml

        check_output_file(args.binning_xml, "--binning-xml", overwrite=args.overwrite)
        text = binning_xml(d, args.particle)
        Path(args.binning_xml).write_text(text)
        print(f"wrote {args.binning_xml} ({d.n_layers} layers, {d.n_cells()} voxels)")
        return 0
    print(d.to_json() if args.json else describe(args.detector))
    return 0
