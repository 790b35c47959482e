"""Event-level generation of ttH / ttbb high-level variables: produce, split, train, generate, evaluate, bench.

    caloforge events produce --process tth,ttbb -n 100000 --seed 1 -o data/ttx.h5 --workers 2
    caloforge events split data/ttx.h5 --fractions 0.75,0.25 -o data/ttx-train.h5 -o data/ttx-test.h5
    caloforge events train --data data/ttx-train.h5 -o runs/eventwgan
    caloforge events generate --model runs/eventwgan -n 20000 -o gen.h5
    caloforge events evaluate --reference data/ttx-test.h5 --candidate gen.h5 -o report-events/
    caloforge events bench --model runs/eventwgan --reference data/ttx.h5

These are a separate command group because the shower commands are built around a detector, showers and
incident-particle conditions; an event file has none of them (see docs/events.md).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="events_command", required=True, metavar="STEP")

    p = sub.add_parser("produce", help="Pythia 8 + FastJet + response -> event file (parallel, resumable)")
    p.add_argument("--process", default="tth,ttbb", help="comma-separated: tth, ttbb (default both)")
    p.add_argument("-n", type=int, default=100000, help="selected events per process (default 100000)")
    p.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    p.add_argument("-o", "--output", required=True, help="output event file (.h5); chunks in OUT.chunks/")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--min-btags", type=int, default=2, help="b-tagged jets the selection needs (default 2)")
    p.add_argument("--snapshot", metavar="FILE", help="write what the finished chunks of -o hold now into FILE "
                                                      "(a running or interrupted production), then stop")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("split", help="split an event file into parts by a seeded permutation")
    p.add_argument("input", help="event file")
    p.add_argument("--fractions", default="0.75,0.25", help="comma-separated fractions (default 0.75,0.25)")
    p.add_argument("-o", "--output", action="append", required=True, help="output file, one per fraction")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="drop the events that are also in FILE (e.g. an earlier test file) before splitting")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = sub.add_parser("train", help="train the event WGAN (--model eventwgan) on an event file")
    p.add_argument("--data", required=True, help="training event file")
    p.add_argument("--model", default="eventwgan", choices=["eventwgan"], help="model family (eventwgan)")
    p.add_argument("-o", "--output", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=20000, help="generator steps (default 20000)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a WGANConfig option, e.g. --set lr=5e-4 --set ema=0.999 (docs/events.md); with --resume "
                        "only lr_decay_steps, lr_final")
    p.add_argument("--val-data", help="held-out events (a split of the training file, not the test file): scored at "
                                      "each checkpoint, the best generator kept in RUN/best")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="generate events with a trained event WGAN")
    p.add_argument("--model", required=True, help="run directory of caloforge events train")
    p.add_argument("-n", type=int, default=None, help="events per process (default: as --conditions-from)")
    p.add_argument("--conditions-from", help="event file whose process labels to reproduce row by row")
    p.add_argument("--process", default="tth,ttbb", help="processes to generate with -n (default both)")
    p.add_argument("-o", "--output", required=True, help="output event file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")

    p = sub.add_parser("evaluate", help="the talk's quality measures: Wasserstein critic, Fisher-z, classifier")
    p.add_argument("--reference", required=True, help="reference (Pythia) event file, held out from training")
    p.add_argument("--candidate", action="append", required=True, help="candidate event file (repeatable)")
    p.add_argument("--label", action="append", default=[], help="label per candidate")
    p.add_argument("--train-reference", help="Pythia events for the classifier trained on Pythia (default: half of "
                                             "--reference)")
    p.add_argument("-o", "--output", default="report-events", help="output directory")
    p.add_argument("--critic-steps", type=int, default=3000, help="critic steps per Wasserstein estimate (3000)")
    p.add_argument("--critic-lr", type=float, default=1e-4, help="critic learning rate (default 1e-4)")
    p.add_argument("--critic-batch", type=int, default=512, help="critic batch size (default 512)")
    p.add_argument("--floor-repeats", type=int, default=3,
                   help="Wasserstein floor estimates (other Pythia samples, other critic seeds); candidates are "
                        "compared with their root mean square (default 3)")
    p.add_argument("--max-events", type=int, default=None, help="use at most N events per file")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")

    p = sub.add_parser("bench", help="time the event WGAN against Pythia + FastJet + response, same run")
    p.add_argument("--model", required=True, help="run directory of caloforge events train")
    p.add_argument("--pythia-tries", type=int, default=400, help="Pythia tries per process to time (default 400)")
    p.add_argument("--events", type=int, default=100000, help="events the WGAN generates (default 100000)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--seed", type=int, default=0)


def parse_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: number}; the keys and bounds are checked by WGANConfig.from_dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. lr=5e-4")
        try:
            num = float(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: expected a number after '='") from None
        out[key.strip()] = int(num) if num.is_integer() and "." not in value and "e" not in value.lower() else num
    return out


def run(args: argparse.Namespace) -> int:
    from caloforge.validate import check_output_file, same_file

    step = args.events_command
    if step == "produce":
        from caloforge.events.produce import produce

        counts = produce([p.strip() for p in args.process.split(",") if p.strip()], args.n, args.output,
                         seed=args.seed, workers=args.workers, min_btags=args.min_btags, snapshot=args.snapshot,
                         quiet=args.quiet)
        print(f"{args.output}: " + ", ".join(f"{p} {c}" for p, c in counts.items()))
        return 0
    if step == "split":
        from caloforge.events.eventfile import parse_fractions, split_file

        for out in args.output:
            check_output_file(out, overwrite=args.overwrite)
        sizes = split_file(args.input, parse_fractions(args.fractions), args.output, args.seed, args.exclude)
        print(", ".join(f"{o}: {n}" for o, n in zip(args.output, sizes)))
        return 0
    if step == "train":
        from caloforge.events.wgan import train

        train(args.data, args.output, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
              threads=args.threads, resume=args.resume, quiet=args.quiet, device=args.device,
              checkpoint_every=args.checkpoint_every, options=parse_options(args.overrides),
              val_data=args.val_data)
        return 0
    if step == "generate":
        from caloforge.events.wgan import generate_file

        check_output_file(args.output, overwrite=args.overwrite)
        if args.conditions_from and same_file(args.conditions_from, args.output):
            raise ValueError(f"-o {args.output}: is the --conditions-from file; expected another path")
        n = generate_file(args.model, args.output, n=args.n, conditions_from=args.conditions_from,
                          processes=[p.strip() for p in args.process.split(",")], seed=args.seed, threads=args.threads)
        print(f"{args.output}: {n} events")
        return 0
    if step == "evaluate":
        from caloforge.events.quality import evaluate_files

        result = evaluate_files(args.reference, args.candidate, args.label, args.output,
                                train_reference=args.train_reference, critic_steps=args.critic_steps,
                                max_events=args.max_events, seed=args.seed, threads=args.threads, quiet=args.quiet,
                                critic_lr=args.critic_lr, critic_batch=args.critic_batch,
                                floor_repeats=args.floor_repeats)
        for line in result["summary"]:
            print(line)
        return 0
    if step == "bench":
        from caloforge.events.bench import bench

        if args.json:
            check_output_file(args.json, "--json")
        res = bench(args.model, pythia_tries=args.pythia_tries, n_events=args.events, threads=args.threads,
                    seed=args.seed)
        for line in res["summary"]:
            print(line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    raise ValueError(f"events: unknown step {step!r}")
