"""The talk's quality measures for event-level samples, each beside its floor (the same measure on two Pythia halves).

1. **Wasserstein estimate**: a fresh critic (6 x 288 ReLU, gradient penalty) trained on half of each sample
   (reference vs candidate, in the reference's Gaussianised space, with the process label as an input); the
   estimate is E_ref C - E_cand C on the other halves. Floor: reference half A vs reference half B.
2. **Fisher-z**: chi2/ndf of z = (artanh r_A - artanh r_B) / sqrt(1/(N_A-3) + 1/(N_B-3)) over the 325 pairs of the
   26 variables, per process (ndf 325 each) and both together; ~1 when the correlations agree. Floor: half A vs B.
3. **Classification benchmark**: a ttH-vs-ttbb classifier (gradient-boosted trees) trained on the candidate's events
   and one trained on the same number of Pythia events, both tested on the held-out Pythia reference: ROC AUC side
   by side.
4. **Destroyed correlations**: independent Gaussians mapped through each process's marginal inverse CDFs (right
   marginals, no correlations), evaluated like a candidate, to show what the measures catch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from caloforge.events import PROCESSES
from caloforge.events.eventfile import EventFileError, Events, read_events, write_events
from caloforge.events.gauss import Gaussianiser
from caloforge.metrics import fisher_z_test

#: Fewest events (both processes together, at least half of them each) a file or --max-events may give evaluate.
MIN_EVENTS = 40
#: Variables and pairs of variables that the Fisher-z results list as where the chi2 sits.
FISHER_TOP = 5


# ---- Fisher-z ---------------------------------------------------------------------------------------------
def fisher_z(a: Events, b: Events, top: int = FISHER_TOP) -> dict:
    """chi2/ndf of the Fisher-z test per process and summed over both; per process also where it sits: each
    variable's mean z^2 over the pairs it is in (``variables``, about 1 for a perfect model; the ``top`` largest) and
    the ``top`` pairs of largest |z| (``pairs``: [name, name, z]; z > 0 where ``a`` correlates the pair more
    positively than ``b``)."""
    out, chi2, ndf = {}, 0.0, 0
    for name, lab in PROCESSES.items():
        ra, rb = a.high_level[a.process == lab], b.high_level[b.process == lab]
        if len(ra) < 4 or len(rb) < 4:
            continue
        r = fisher_z_test(ra, rb)
        z = r["z"]
        share = (z ** 2).sum(1) / max(z.shape[0] - 1, 1)
        iu = np.triu_indices(z.shape[0], k=1)
        worst = np.argsort(-np.abs(z[iu]))[:top]
        out[name] = {"chi2_ndf": r["chi2_ndf"], "ndf": r["ndf"], "max_abs_z": r["max_abs_z"],
                     "variables": {a.names[i]: float(share[i]) for i in np.argsort(-share)[:top]},
                     "pairs": [[a.names[iu[0][k]], a.names[iu[1][k]], float(z[iu][k])] for k in worst]}
        chi2 += r["chi2"]
        ndf += r["ndf"]
    out["all"] = {"chi2_ndf": chi2 / ndf if ndf else float("nan"), "ndf": ndf}
    return out


# ---- destroyed correlations -------------------------------------------------------------------------------
def destroyed(reference: Events, process: np.ndarray, seed: int = 0) -> Events:
    """Right marginals per process, no correlations: independent N(0, 1) through each variable's inverse CDF."""
    rng = np.random.default_rng(seed)
    hl = np.zeros((len(process), reference.high_level.shape[1]))
    for lab in PROCESSES.values():
        rows = process == lab
        if rows.any():
            g = Gaussianiser.fit(reference.high_level[reference.process == lab])
            hl[rows] = g.inverse(rng.standard_normal((int(rows.sum()), g.dim)))
    return Events(hl, process.astype(np.int8), reference.names, attrs={"source": "destroyed-correlations"})


# ---- Wasserstein critic -----------------------------------------------------------------------------------
def critic_estimate(a: np.ndarray, la: np.ndarray, b: np.ndarray, lb: np.ndarray, steps: int = 3000,
                    seed: int = 0, batch_size: int = 512, gp_lambda: float = 10.0, hidden: int = 288,
                    layers: int = 6, lr: float = 1e-4) -> float:
    """Train a WGAN-GP critic on half of each sample; E_a C - E_b C on the other halves."""
    import torch

    from caloforge.events.wgan import gradient_penalty, mlp

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pa, pb = rng.permutation(len(a)), rng.permutation(len(b))
    ha, hb = len(a) // 2, len(b) // 2

    def t(x, lab, idx):
        return torch.from_numpy(x[idx].astype(np.float32)), torch.from_numpy(2.0 * lab[idx, None] - 1.0).float()

    (xa, ya), (xb, yb) = t(a, la, pa[:ha]), t(b, lb, pb[:hb])
    (ta, tya), (tb, tyb) = t(a, la, pa[ha:]), t(b, lb, pb[hb:])
    critic = mlp(a.shape[1] + 1, 1, hidden, layers)
    opt = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.9))
    for _ in range(steps):
        ia, ib = torch.randint(len(xa), (batch_size,)), torch.randint(len(xb), (batch_size,))
        ca = critic(torch.cat([xa[ia], ya[ia]], 1)).mean()
        cb = critic(torch.cat([xb[ib], yb[ib]], 1)).mean()
        # the penalty's interpolates take the label of the reference row they start from
        gp = gradient_penalty(critic, xa[ia], xb[ib], ya[ia])
        loss = cb - ca + gp_lambda * gp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(critic(torch.cat([ta, tya], 1)).mean() - critic(torch.cat([tb, tyb], 1)).mean())


# ---- classification benchmark -----------------------------------------------------------------------------
def classifier_auc(train: Events, test: Events, seed: int = 0, threads: int = 1) -> float:
    """ROC AUC on ``test`` of a ttH-vs-ttbb gradient-boosted classifier trained on ``train``."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, early_stopping=True,
                                         validation_fraction=0.2, n_iter_no_change=20, random_state=seed)
    with threadpool_limits(threads):  # OpenMP threads spin on a shared machine: keep them to what we were given
        clf.fit(train.high_level, train.process)
        return float(roc_auc_score(test.process, clf.predict_proba(test.high_level)[:, 1]))


def balanced_subset(ev: Events, n_per_process: int, seed: int) -> Events:
    """n_per_process random rows of each process."""
    rng = np.random.default_rng(seed)
    rows = []
    for lab in PROCESSES.values():
        idx = np.flatnonzero(ev.process == lab)
        rows.append(rng.choice(idx, min(n_per_process, len(idx)), replace=False))
    return ev.select(np.sort(np.concatenate(rows)))


# ---- the whole evaluation ---------------------------------------------------------------------------------
def evaluate_files(reference: str, candidates: list[str], labels: list[str], output: str,
                   train_reference: str | None = None, critic_steps: int = 3000, max_events: int | None = None,
                   seed: int = 0, threads: int = 1, quiet: bool = False, critic_lr: float = 1e-4,
                   critic_batch: int = 512, floor_repeats: int = 3) -> dict:
    """Every measure for each candidate and the destroyed-correlation baseline; writes metrics.json and plots.

    The Wasserstein floor is estimated ``floor_repeats`` times (other Pythia samples or halves, other critic seeds):
    its expectation is about zero, so a candidate's estimate is compared with the floor estimates' root mean square
    (their scatter and bias together), not with one of them (``wasserstein_over_floor``).
    """

    from caloforge.validate import check_float, check_int, check_output_dir, check_seed

    check_int(critic_steps, "--critic-steps", 1, 10**6)
    check_int(critic_batch, "--critic-batch", 1, 65536)
    check_float(critic_lr, "--critic-lr", 0.0, 1.0, lo_open=True)
    check_int(max_events, "--max-events", MIN_EVENTS)
    check_seed(seed)
    check_int(threads, "--threads", 1, 256)
    check_int(floor_repeats, "--floor-repeats", 1, 100)
    if len(labels) > len(candidates) or len(set(labels)) != len(labels):
        raise ValueError(f"--label {labels}: expected at most one unique label per --candidate")
    out = check_output_dir(output)
    labels = list(labels) + [Path(c).stem for c in candidates[len(labels):]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"candidate labels {labels}: expected distinct labels (give --label)")
    ref = read_events(reference)
    files = [read_events(c) for c in candidates] + ([read_events(train_reference)] if train_reference else [])
    for path, ev in zip([*candidates, train_reference], files):
        if ev.names != ref.names:
            raise EventFileError(f"{path}: variables {ev.names[:4]}... ({len(ev.names)}) differ from the reference "
                                 f"{reference} ({ref.names[:4]}..., {len(ref.names)}); expected the same variables")
    for path, ev in zip([reference, *candidates, train_reference], [ref, *files]):
        counts = [int((ev.process == v).sum()) for v in PROCESSES.values()]
        if min(counts) < MIN_EVENTS // 2:
            raise EventFileError(f"{path}: {dict(zip(PROCESSES, counts))} events per process; expected at least "
                                 f"{MIN_EVENTS // 2} of each to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if max_events and len(ref) > max_events:
        ref = ref.select(np.sort(rng.choice(len(ref), max_events, replace=False)))
    perm = rng.permutation(len(ref))
    if train_reference:  # floor: the held-out reference against as many Pythia training events (independent)
        pythia_train = files[-1]
        base, test = ref, ref
        other = pythia_train.select(np.sort(rng.permutation(len(pythia_train))[: len(ref)]))
    else:  # floor: half A against half B; the classifier trained on Pythia uses A, every classifier is tested on B
        base = ref.select(np.sort(perm[: len(ref) // 2]))
        other = ref.select(np.sort(perm[len(ref) // 2:]))
        pythia_train, test = base, other
    gauss = Gaussianiser.fit(ref.high_level)

    def w_est(a: Events, b: Events, s: int) -> float:
        return critic_estimate(gauss.forward(a.high_level), a.process, gauss.forward(b.high_level), b.process,
                               steps=critic_steps, seed=s, lr=critic_lr, batch_size=critic_batch)

    cands = list(zip(labels, files[:len(candidates)]))
    cands.append(("destroyed correlations", destroyed(pythia_train, pythia_train.process, seed=seed + 7)))
    n_clf = min(int(min((pythia_train.process == v).sum() for v in PROCESSES.values())),
                *(int(min((c.process == v).sum() for v in PROCESSES.values())) for _, c in cands))
    result = {"reference": reference, "n_reference": len(ref), "seed": seed, "critic_steps": critic_steps,
              "critic_lr": critic_lr, "critic_batch": critic_batch,
              "classifier_events_per_process": n_clf}
    result["floor"] = {"fisher_z": fisher_z(base, other), "wasserstein": w_est(base, other, seed),
                       "n": [len(base), len(other)]}
    floor_w = [result["floor"]["wasserstein"]]
    for k in range(1, floor_repeats):  # the estimate's own scatter: other Pythia samples, other critic seeds
        krng = np.random.default_rng([seed, 2, k])
        if train_reference:
            b_k, o_k = ref, pythia_train.select(np.sort(krng.permutation(len(pythia_train))[: len(ref)]))
        else:
            p_k = krng.permutation(len(ref))
            b_k, o_k = ref.select(np.sort(p_k[: len(ref) // 2])), ref.select(np.sort(p_k[len(ref) // 2:]))
        floor_w.append(w_est(b_k, o_k, seed + k))
    result["floor"]["wasserstein_repeats"] = floor_w
    result["floor"]["wasserstein_rms"] = float(np.sqrt(np.mean(np.square(floor_w))))
    result["classifier_pythia_auc"] = classifier_auc(balanced_subset(pythia_train, n_clf, seed), test, seed, threads)
    result["candidates"] = {}
    for lab, c in cands:
        crng = np.random.default_rng([seed, 1])  # each candidate's own stream: figures independent of the order
        if max_events and len(c) > max_events:
            c = c.select(np.sort(crng.choice(len(c), max_events, replace=False)))
        c_sub = c.select(np.sort(crng.permutation(len(c))[: len(other)]))  # as many events as the floor compares
        r = {"n": len(c), "n_compared": len(c_sub), "fisher_z": fisher_z(base, c_sub),
             "wasserstein": w_est(base, c_sub, seed),
             "classifier_auc": classifier_auc(balanced_subset(c, n_clf, seed), test, seed, threads)}
        r["fisher_z_over_floor"] = r["fisher_z"]["all"]["chi2_ndf"] / result["floor"]["fisher_z"]["all"]["chi2_ndf"]
        r["wasserstein_over_floor"] = r["wasserstein"] / result["floor"]["wasserstein_rms"]
        r["classifier_auc_minus_pythia"] = r["classifier_auc"] - result["classifier_pythia_auc"]
        result["candidates"][lab] = r
    from caloforge.events.plots import plot_distributions

    result["plots"] = plot_distributions(ref, [(lab, c) for lab, c in cands], out)
    if not quiet:
        write_events(out / "destroyed.h5", cands[-1][1])
    result["summary"] = summary_lines(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def summary_lines(r: dict) -> list[str]:
    """The printed summary of :func:`evaluate_files`' result: the floors, then one line per candidate (and its
    largest Fisher-z pull per process)."""
    fl = r["floor"]
    lines = [f"reference {r['reference']}: {r['n_reference']} events; floors (two independent Pythia samples): "
             f"Fisher-z chi2/ndf {fl['fisher_z']['all']['chi2_ndf']:.3f} (ndf {fl['fisher_z']['all']['ndf']}), "
             f"Wasserstein {fl['wasserstein']:.4f} (rms of {len(fl['wasserstein_repeats'])} estimates "
             f"{fl['wasserstein_rms']:.4f}); classifier trained on Pythia: AUC "
             f"{r['classifier_pythia_auc']:.4f}"]
    for lab, c in r["candidates"].items():
        lines.append(f"{lab}: Fisher-z chi2/ndf {c['fisher_z']['all']['chi2_ndf']:.3f} "
                     f"({c['fisher_z_over_floor']:.2f}x floor), Wasserstein {c['wasserstein']:.4f} "
                     f"({c['wasserstein_over_floor']:.2f}x the floor's rms), classifier trained on it: AUC "
                     f"{c['classifier_auc']:.4f} ({c['classifier_auc_minus_pythia']:+.4f} vs Pythia)")
        worst = [f"{proc} {p[0]} x {p[1]} (z {p[2]:+.1f})" for proc, f in c["fisher_z"].items()
                 if proc != "all" for p in f["pairs"][:1]]
        if worst:
            lines.append(f"  largest Fisher-z pulls: {'; '.join(worst)}")
    return lines
