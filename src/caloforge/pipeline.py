"""The whole chain on one detector: a Geant4 sample, the same showers from a model, and the evaluation report.

``caloforge run -o quickstart`` uses the house detector, photons and electrons at 20, 50 and 80 GeV, 0, 30 and 50
degrees, impact points over a cell, and the shipped model that covers that whole space (``multi``), so it works
right after installation with no data and no training. Each step is skipped
when its output already exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="quickstart", help="output directory (default: quickstart)")
    p.add_argument("--detector", default="ild-ecal", help="detector of the Geant4 sample (must match the model)")
    p.add_argument("--particle", default=None, help="particles of the Geant4 sample (default: the model's, e.g. "
                                                     "'gamma,e-')")
    p.add_argument("--energy", default="20,50,80", help="GeV spec of the Geant4 sample (default 20,50,80)")
    p.add_argument("--angle", default=None, help="angle spec of the Geant4 sample in degrees (default: 0,30,50 "
                                                  "when the model takes angles, else 0)")
    p.add_argument("--position", default=None, help="impact point spec in mm (default: 'cell' when the model "
                                                     "takes positions, else 0,0)")
    p.add_argument("-n", type=int, default=300, help="Geant4 showers (default 300)")
    p.add_argument("--model", help="trained model directory or shipped name (default: the shipped model that covers "
                                    "the whole condition space, multi)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="Geant4 worker processes (default: all cores)")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier two-sample tests")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from caloforge.dataset import ShowerFile
    from caloforge.evaluate import evaluate, summary_lines
    from caloforge.generate import generate_file
    from caloforge.models import load_default_model, load_model
    from caloforge.simulate import simulate
    from caloforge.validate import check_int, check_output_dir, check_seed

    out = check_output_dir(args.output)
    check_int(args.n, "-n", 1)
    check_int(args.workers, "--workers", 1, 4096)
    check_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if args.quiet else print
    t0 = time.perf_counter()

    model = (load_model(args.model, expected_detector=args.detector) if args.model
             else load_default_model())  # the shipped model that covers the whole condition space
    if not args.model and model.detector.name != args.detector:
        raise ValueError(f"--detector {args.detector}: the shipped default model is for {model.detector.name}; "
                         f"pass --model for another detector")
    takes_angle = float(model.meta.get("conditions", {}).get("angle_deg", [0, 0])[1]) > 0
    particle = args.particle or ",".join(model.meta.get("particles") or [model.meta.get("particle", "gamma")])
    angle = args.angle or ("0,30,50" if takes_angle else "0")
    position = args.position or ("cell" if "position" in model.condition_names else "0,0")
    say(f"[1/3] Geant4: {args.n} {particle} showers, E = {args.energy} GeV, angle {angle} deg, impact {position}")
    g4_path = simulate(args.detector, particle, args.energy, angle, args.n, args.seed,
                       out / "geant4.h5", workers=args.workers, quiet=args.quiet, position=position)
    t1 = time.perf_counter()

    gen_path = out / f"{model.family}.h5"
    say(f"[2/3] {model.family}: the same conditions, row by row")
    with ShowerFile(g4_path) as ref:
        conditions = ref.conditions
        angled = ref.n_cells != model.detector.n_cells(False)
    if gen_path.exists():
        gen_path.unlink()  # cheap to redo, and must match this Geant4 sample
    generate_file(model, gen_path, len(conditions), conditions=conditions, seed=args.seed, quiet=args.quiet,
                  angled=angled)
    t2 = time.perf_counter()

    say("[3/3] evaluation report")
    results = evaluate(str(g4_path), [(model.family, str(gen_path))], out / "report", reference_label="Geant4",
                       seed=args.seed, classifier=not args.no_classifier, log=say)
    say("")
    for line in summary_lines(results):
        say(line)
    say(f"\nGeant4 {t1 - t0:.1f} s, {model.family} {t2 - t1:.2f} s for {len(conditions)} showers, "
        f"evaluation {time.perf_counter() - t2:.1f} s")
    say(f"report: {out / 'report' / 'report.html'}")
    return 0
