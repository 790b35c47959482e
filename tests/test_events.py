"""Event-level generation: Gaussianisation, Fisher-z, the event WGAN, quality measures, a tiny Pythia run."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from caloforge.events import PROCESSES
from caloforge.events.eventfile import EventFileError, Events, read_events, split_file, write_events
from caloforge.events.gauss import Gaussianiser
from caloforge.events.quality import classifier_auc, critic_estimate, destroyed, evaluate_files, fisher_z
from caloforge.events.variables import AUX, HIGH_LEVEL, LOW_LEVEL


def correlated_events(n: int, seed: int, dim: int = 26) -> Events:
    """Two processes with different, strongly correlated, non-Gaussian variables."""
    rng = np.random.default_rng(seed)
    proc = (np.arange(n) % 2).astype(np.int8)
    a = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)
    z = rng.standard_normal((n, dim)) @ (np.eye(dim) + 0.8 * a)
    x = np.exp(0.5 * z) + proc[:, None] * 0.7
    x[:, 3] = np.round(x[:, 3])  # a discrete column (spikes)
    return Events(x, proc, [f"v{i}" for i in range(dim)])


def test_gaussianisation_round_trips_and_is_normal():
    ev = correlated_events(4000, 0)
    g = Gaussianiser.fit(ev.high_level)
    z = g.forward(ev.high_level)
    cont = [i for i in range(26) if i != 3]
    assert np.abs(z[:, cont].mean(axis=0)).max() < 0.02
    assert np.abs(z[:, cont].std(axis=0) - 1).max() < 0.03
    back = g.inverse(z)
    np.testing.assert_allclose(back, ev.high_level, rtol=1e-9, atol=1e-9)  # spikes included
    fresh = correlated_events(1000, 1).high_level
    inside = (fresh >= g.quantiles[:, 0]) & (fresh <= g.quantiles[:, -1])
    np.testing.assert_allclose(g.inverse(g.forward(fresh))[inside], fresh[inside], rtol=1e-9, atol=1e-9)
    out = g.inverse(np.random.default_rng(2).standard_normal((5000, 26)) * 3)
    assert (out >= g.quantiles[:, :1].T).all() and (out <= g.quantiles[:, -1:].T).all()
    with pytest.raises(ValueError, match=r"expected \(N, 26\)"):
        g.forward(np.zeros((3, 5)))


def test_fisher_z_is_one_on_halves_and_large_when_correlations_are_destroyed():
    ev = correlated_events(8000, 3)
    # two halves of one sample: chi2/ndf ~ 1 (325 pairs per process; 650 in all)
    a, b = ev.select(np.arange(4000)), ev.select(np.arange(4000, 8000))
    fz = fisher_z(a, b)
    assert fz["tth"]["ndf"] == 325 and fz["all"]["ndf"] == 650
    assert 0.7 < fz["all"]["chi2_ndf"] < 1.4
    d = destroyed(a, b.process, seed=1)
    for lab in PROCESSES.values():  # marginals kept
        med_d = np.median(d.high_level[d.process == lab], axis=0)
        med_a = np.median(a.high_level[a.process == lab], axis=0)
        assert np.allclose(med_d, med_a, rtol=0.1, atol=0.05)
    assert fisher_z(a, d)["all"]["chi2_ndf"] > 10


def test_fisher_z_says_which_pairs_and_variables_carry_the_excess():
    """One pair's correlation broken in the candidate: that pair leads the list of pulls, with the sign of the
    difference, and its two variables lead the per-variable shares; on halves of one sample no variable stands out."""
    from caloforge.events.quality import FISHER_TOP

    ev = correlated_events(8000, 3)
    a, b = ev.select(np.arange(4000)), ev.select(np.arange(4000, 8000))
    hl = b.high_level.copy()
    hl[:, 5] = np.random.default_rng(4).permutation(hl[:, 5])  # v5 loses its correlations with every variable
    hl[:, 7] = hl[:, 7] + 3 * (hl[:, 8] - hl[:, 8].mean())  # v7 gains a strong positive correlation with v8
    broken = Events(hl, b.process, b.names)
    for proc in ("ttbb", "tth"):
        r = fisher_z(broken, a)[proc]
        assert len(r["variables"]) == FISHER_TOP and len(r["pairs"]) == FISHER_TOP
        assert {r["pairs"][0][0], r["pairs"][0][1]} == {"v7", "v8"} and r["pairs"][0][2] > 0
        assert abs(r["pairs"][0][2]) == pytest.approx(r["max_abs_z"])
        assert [abs(p[2]) for p in r["pairs"]] == sorted((abs(p[2]) for p in r["pairs"]), reverse=True)
        assert list(r["variables"])[:3] == ["v7", "v8", "v5"] and r["variables"]["v5"] > 5
        same = fisher_z(a, b)[proc]["variables"]  # the largest of 26 shares of two halves: about 1, below 3
        assert 1 < max(same.values()) < 3


def test_quality_measures_separate_good_from_destroyed():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    ref = correlated_events(2000, 4)
    good = correlated_events(2000, 5)
    bad = destroyed(ref, good.process, seed=2)
    g = Gaussianiser.fit(ref.high_level)
    w_good = critic_estimate(g.forward(ref.high_level), ref.process, g.forward(good.high_level), good.process,
                             steps=200, seed=0, batch_size=128, hidden=64, layers=3, lr=1e-3)
    w_bad = critic_estimate(g.forward(ref.high_level), ref.process, g.forward(bad.high_level), bad.process,
                            steps=200, seed=0, batch_size=128, hidden=64, layers=3, lr=1e-3)
    assert w_bad > w_good + 0.05
    auc = classifier_auc(good, ref)
    assert 0.8 < auc <= 1.0  # the two synthetic processes differ by a shift


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from caloforge.events.wgan import WGANConfig, train

    tmp = tmp_path_factory.mktemp("ewgan")
    ev = correlated_events(600, 6)
    write_events(tmp / "train.h5", ev, {"source": "test"})
    cfg = WGANConfig(steps=8, batch_size=64, checkpoint_every=4, log_every=4, hidden=32, layers=6)
    train(str(tmp / "train.h5"), str(tmp / "run"), quiet=True, cfg=cfg)
    return tmp, cfg


def test_event_wgan_trains_saves_loads_generates_and_resumes(trained_run):
    from safetensors.torch import load_file

    from caloforge.events.wgan import EventWGAN, WGANConfig, generate_file, train

    tmp, cfg = trained_run
    model = EventWGAN.load(tmp / "run")
    assert len(model.generator) == 2 * 6 + 1 and model.gauss.dim == 26
    tensors = load_file(str(tmp / "run" / "model.safetensors"))
    assert "gauss.quantiles" in tensors and tensors["gauss.quantiles"].shape[0] == 26
    n = generate_file(str(tmp / "run"), str(tmp / "gen.h5"), n=50, seed=3)
    gen = read_events(tmp / "gen.h5")
    assert n == 100 and gen.high_level.shape == (100, 26) and np.isfinite(gen.high_level).all()
    assert gen.attrs["source"] == "model:eventwgan" and (gen.process == 1).sum() == 50
    generate_file(str(tmp / "run"), str(tmp / "gen2.h5"), n=50, seed=3)
    np.testing.assert_array_equal(read_events(tmp / "gen2.h5").high_level, gen.high_level)  # seeded
    # 4 steps, then resume to 8: the same weights as 8 steps in one go
    half = WGANConfig(**{**cfg.__dict__, "steps": 4})
    train(str(tmp / "train.h5"), str(tmp / "run2"), quiet=True, cfg=half)
    train(str(tmp / "train.h5"), str(tmp / "run2"), steps=8, resume=True, quiet=True)
    a, b = load_file(str(tmp / "run" / "model.safetensors")), load_file(str(tmp / "run2" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


def test_evaluate_files_writes_every_measure(trained_run, tmp_path):
    from caloforge.events.wgan import generate_file

    tmp, _ = trained_run
    ref = correlated_events(800, 7)
    write_events(tmp_path / "ref.h5", ref, {"source": "test"})
    generate_file(str(tmp / "run"), str(tmp_path / "gen.h5"), conditions_from=str(tmp_path / "ref.h5"))
    res = evaluate_files(str(tmp_path / "ref.h5"), [str(tmp_path / "gen.h5")], ["wgan"], str(tmp_path / "rep"),
                         critic_steps=10, quiet=True)
    assert set(res["candidates"]) == {"wgan", "destroyed correlations"}
    for c in res["candidates"].values():
        assert {"fisher_z", "wasserstein", "classifier_auc", "fisher_z_over_floor"} <= set(c)
    assert res["candidates"]["destroyed correlations"]["fisher_z_over_floor"] > 2
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["floor"]["fisher_z"]["all"]["ndf"] == 650
    # the Wasserstein floor: three estimates (the first is the one of a single-estimate run), candidates over their rms
    fw = saved["floor"]["wasserstein_repeats"]
    assert len(fw) == 3 and fw[0] == saved["floor"]["wasserstein"] and len(set(fw)) == 3
    assert saved["floor"]["wasserstein_rms"] == pytest.approx(np.sqrt(np.mean(np.square(fw))))
    w = res["candidates"]["wgan"]
    assert w["wasserstein_over_floor"] == pytest.approx(w["wasserstein"] / saved["floor"]["wasserstein_rms"])
    one = evaluate_files(str(tmp_path / "ref.h5"), [str(tmp_path / "gen.h5")], ["wgan"], str(tmp_path / "rep1"),
                         critic_steps=10, quiet=True, floor_repeats=1)
    assert one["floor"]["wasserstein"] == saved["floor"]["wasserstein"]
    assert one["candidates"]["wgan"]["wasserstein_over_floor"] == pytest.approx(
        w["wasserstein"] / abs(saved["floor"]["wasserstein"]))
    with pytest.raises(ValueError, match="--floor-repeats"):
        evaluate_files(str(tmp_path / "ref.h5"), [str(tmp_path / "gen.h5")], ["wgan"], str(tmp_path / "rep0"),
                       critic_steps=10, quiet=True, floor_repeats=0)
    assert (tmp_path / "rep" / "distributions-tth.png").stat().st_size > 10000
    # a candidate's figures do not depend on the other candidates or their order
    generate_file(str(tmp / "run"), str(tmp_path / "gen2.h5"), conditions_from=str(tmp_path / "ref.h5"), seed=9)
    both = evaluate_files(str(tmp_path / "ref.h5"), [str(tmp_path / "gen2.h5"), str(tmp_path / "gen.h5")],
                          ["other", "wgan"], str(tmp_path / "rep2"), critic_steps=10, quiet=True)
    for key in ("fisher_z", "wasserstein", "classifier_auc"):
        assert both["candidates"]["wgan"][key] == res["candidates"]["wgan"][key], key


def test_event_files_refuse_bad_input(tmp_path):
    with h5py.File(tmp_path / "shower.h5", "w") as h5:
        h5.attrs["kind"] = "showers"
    with pytest.raises(EventFileError, match=r"shower.h5: attribute 'kind': expected 'events'"):
        read_events(tmp_path / "shower.h5")
    ev = correlated_events(20, 0)
    ev.high_level[3, 2] = np.nan
    write_events(tmp_path / "nan.h5", ev)
    with pytest.raises(EventFileError, match=r"nan.h5: field 'high_level': expected finite"):
        read_events(tmp_path / "nan.h5")
    write_events(tmp_path / "ok.h5", correlated_events(20, 0))
    with h5py.File(tmp_path / "ok.h5", "a") as h5:
        del h5["process"]
        h5["process"] = np.full(20, 3)
    with pytest.raises(EventFileError, match=r"field 'process': expected"):
        read_events(tmp_path / "ok.h5")
    write_events(tmp_path / "all.h5", correlated_events(100, 0))
    sizes = split_file(str(tmp_path / "all.h5"), [0.75, 0.25], [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")])
    assert sizes == [75, 25] and len(read_events(tmp_path / "b.h5")) == 25


def test_tiny_pythia_run_produces_the_variables(tmp_path):
    pytest.importorskip("pythia8mc")
    pytest.importorskip("fastjet")
    from caloforge.events.produce import produce

    out = tmp_path / "tth.h5"
    counts = produce(["tth"], 5, out, seed=5, workers=1, quiet=True, chunk_tries={"tth": 30})
    ev = read_events(out)
    assert counts == {"tth": len(ev)} and len(ev) == 5 and (ev.process == 1).all()
    assert ev.names == HIGH_LEVEL and ev.low_level_names == LOW_LEVEL and ev.aux_names == AUX
    assert ev.high_level.shape == (5, 26) and ev.low_level.shape == (5, 32)
    hl = dict(zip(HIGH_LEVEL, ev.high_level.T))
    assert ((hl["aplanarity"] >= 0) & (hl["aplanarity"] <= 0.5)).all()
    assert ((hl["sphericity"] >= 0) & (hl["sphericity"] <= 1)).all()
    assert (hl["jet_sum_pt"] >= 4 * 25).all() and (np.abs(hl["wlep_helicity"]) <= 1).all()
    aux = dict(zip(AUX, ev.aux.T))
    assert (aux["n_jets"] >= 4).all() and (aux["n_btags"] >= 2).all()
    cost = json.loads(ev.attrs["cost"])["tth"]
    assert cost["cpu_s_per_event"] > 0 and cost["selected"] >= 5
    # resuming: the same command makes no new chunk and the same file
    before = sorted(p.name for p in (tmp_path / "tth.h5.chunks").iterdir())
    produce(["tth"], 5, out, seed=5, workers=1, quiet=True, chunk_tries={"tth": 30})
    assert sorted(p.name for p in (tmp_path / "tth.h5.chunks").iterdir()) == before
    np.testing.assert_array_equal(read_events(out).high_level, ev.high_level)
    with pytest.raises(ValueError, match="other settings"):
        produce(["tth"], 5, out, seed=6, workers=1, quiet=True, chunk_tries={"tth": 30})


def test_shower_commands_hand_event_files_to_the_event_code(tmp_path, monkeypatch, capsys):
    import caloforge.events.quality as quality
    import caloforge.events.wgan as wgan
    from caloforge.cli import main

    write_events(tmp_path / "ref.h5", correlated_events(40, 0))
    seen = {}

    def fake_evaluate(reference, candidates, labels, output, **kw):
        seen["evaluate"] = (reference, candidates, kw["seed"])
        return {"summary": ["ok"]}

    def fake_train(data, output, **kw):
        seen["train"] = (data, output, kw["steps"], kw["device"])

    monkeypatch.setattr(quality, "evaluate_files", fake_evaluate)
    monkeypatch.setattr(wgan, "train", fake_train)
    ref = str(tmp_path / "ref.h5")
    assert main(["evaluate", "--reference", ref, "--candidate", ref, "-o", str(tmp_path / "r"), "--seed", "4"]) == 0
    assert seen["evaluate"] == (ref, [ref], 4)
    assert main(["train", "--model", "eventwgan", "--data", ref, "-o", str(tmp_path / "run"), "--max-steps", "7",
                 "--device", "cpu"]) == 0
    assert seen["train"] == (ref, str(tmp_path / "run"), 7, "cpu")
    # a bad model directory is a one-line error naming the directory and what was expected
    assert main(["events", "generate", "--model", str(tmp_path), "-n", "3", "-o", str(tmp_path / "g.h5")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "model.json" in err and len(err.strip().splitlines()) == 1


def test_event_wgan_moving_average_validation_and_best(tmp_path):
    """ema: the saved generator is the average (not the raw weights), resumes exactly; --val-data keeps RUN/best."""
    from safetensors.torch import load_file

    from caloforge.events.cli import parse_options
    from caloforge.events.wgan import EventModelError, EventWGAN, train

    write_events(tmp_path / "train.h5", correlated_events(400, 8), {"source": "test"})
    write_events(tmp_path / "val.h5", correlated_events(200, 9), {"source": "test"})
    opts = {"hidden": 16, "layers": 2, "batch_size": 32, "checkpoint_every": 4, "ema": 0.9}
    kw = {"quiet": True, "options": opts, "val_data": str(tmp_path / "val.h5")}
    train(str(tmp_path / "train.h5"), str(tmp_path / "run"), steps=8, **kw)
    hist = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    vals = [h for h in hist if "val" in h]
    assert [h["step"] for h in vals] == [4, 8] and all(h["val"]["fisher_z"] > 0 for h in vals)
    best_step = min(vals, key=lambda h: h["val"]["fisher_z"])["step"]
    assert vals[-1]["best_step"] == best_step and EventWGAN.load(tmp_path / "run" / "best").cfg.ema == 0.9
    saved, ckpt = (load_file(str(tmp_path / "run" / f)) for f in ("model.safetensors", "checkpoint.safetensors"))
    key = "generator.0.weight"
    np.testing.assert_array_equal(saved[key].numpy(), ckpt["ema.0.weight"].numpy())
    assert not np.allclose(saved[key].numpy(), ckpt[key].numpy())  # the average, not the last weights
    train(str(tmp_path / "train.h5"), str(tmp_path / "run2"), steps=4, **kw)
    train(str(tmp_path / "train.h5"), str(tmp_path / "run2"), steps=8, resume=True, quiet=True,
          val_data=str(tmp_path / "val.h5"))
    again = load_file(str(tmp_path / "run2" / "model.safetensors"))
    for k in saved:
        np.testing.assert_allclose(saved[k].numpy(), again[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    assert parse_options(["lr=5e-4", "n_critic=3"]) == {"lr": 5e-4, "n_critic": 3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["lr"])
    with pytest.raises(EventModelError, match="unknown option 'lrr'"):
        train(str(tmp_path / "train.h5"), str(tmp_path / "run3"), steps=2, quiet=True, options={"lrr": 1.0})
    write_events(tmp_path / "few.h5", correlated_events(30, 9), {"source": "test"})
    with pytest.raises(ValueError, match="few.h5.*at least 20 of each"):
        train(str(tmp_path / "train.h5"), str(tmp_path / "run3"), steps=2, quiet=True,
              val_data=str(tmp_path / "few.h5"))
    with pytest.raises(EventModelError, match="ema"):
        train(str(tmp_path / "train.h5"), str(tmp_path / "run3"), steps=2, quiet=True, options={"ema": 1.5})


def test_event_wgan_lr_decay_logs_resumes_and_can_be_added_on_resume(tmp_path, monkeypatch):
    """lr_decay_steps: a half cosine to lr_final * lr over the last steps, off by default; resumed exactly, and a
    run resumed with the decay newly set equals one trained with it from the start."""
    from safetensors.torch import load_file

    from caloforge.events import wgan
    from caloforge.events.wgan import WGANConfig, lr_at, train

    off = WGANConfig(lr=1e-3, steps=100)
    assert {lr_at(off, s) for s in range(100)} == {1e-3}
    cfg = WGANConfig(lr=1e-3, steps=100, lr_decay_steps=40, lr_final=0.1)
    rates = [lr_at(cfg, s) for s in range(100)]
    assert rates[:60] == [1e-3] * 60 and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates[59:], rates[60:])) and rates[79] == pytest.approx(5.5e-4)
    write_events(tmp_path / "train.h5", correlated_events(400, 8), {"source": "test"})
    data = str(tmp_path / "train.h5")
    base = {"hidden": 16, "layers": 2, "batch_size": 32, "log_every": 1, "lr": 1e-3}
    train(data, str(tmp_path / "one"), steps=8, quiet=True, options={**base, "lr_decay_steps": 4, "lr_final": 0.2})
    hist = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in hist] == pytest.approx([1e-3] * 4 + [lr_at(WGANConfig(
        lr=1e-3, steps=8, lr_decay_steps=4, lr_final=0.2), s) for s in range(4, 8)])
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    # 4 steps without the decay, resumed to 8 with it: the same weights as the run that had it from the start
    train(data, str(tmp_path / "two"), steps=4, quiet=True, options=base)
    train(data, str(tmp_path / "two"), steps=8, resume=True, quiet=True, options={"lr_decay_steps": 4, "lr_final": 0.2})
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in one:
        np.testing.assert_allclose(one[k].numpy(), two[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    meta = json.loads((tmp_path / "two" / "model.json").read_text())["config"]
    assert meta["lr_decay_steps"] == 4 and meta["lr_final"] == 0.2
    # a decaying run interrupted after its step-3 checkpoint and resumed (the schedule read back from model.json)
    # continues it exactly
    opts = {**base, "lr_decay_steps": 6, "lr_final": 0.2, "checkpoint_every": 3}
    train(data, str(tmp_path / "three"), steps=6, quiet=True, options=opts)
    real_save = wgan._save_checkpoint

    def save_then_stop(run_dir, model, opt_g, opt_c, step, *a, **k):
        real_save(run_dir, model, opt_g, opt_c, step, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(wgan, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(data, str(tmp_path / "four"), steps=6, quiet=True, options=opts)
    monkeypatch.setattr(wgan, "_save_checkpoint", real_save)
    assert json.loads((tmp_path / "four" / "checkpoint.json").read_text())["step"] == 3
    train(data, str(tmp_path / "four"), steps=6, resume=True, quiet=True)
    three, four = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("three", "four"))
    for k in three:
        np.testing.assert_allclose(three[k].numpy(), four[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    with pytest.raises(ValueError, match="--set hidden: fixed when a run starts.*lr_decay_steps"):
        train(data, str(tmp_path / "two"), steps=9, resume=True, quiet=True, options={"hidden": 8})
    with pytest.raises(ValueError, match="lr_final"):
        train(data, str(tmp_path / "five"), steps=2, quiet=True, options={"lr_final": 2.0})


def test_event_wgan_divergence_stops_before_a_checkpoint_is_written(tmp_path, monkeypatch):
    """The loop reads the critic's estimate only at logging and checkpoint steps (no host sync inside a step on a
    GPU); a run that diverges in between still stops with a clear error before any checkpoint holds NaN weights."""
    import torch

    import caloforge.events.wgan as wgan

    write_events(tmp_path / "train.h5", correlated_events(200, 8), {"source": "test"})
    opts = {"hidden": 16, "layers": 2, "batch_size": 32, "checkpoint_every": 6, "log_every": 3}
    calls = {"n": 0}
    penalty = wgan.gradient_penalty

    def poisoned(critic, real, fake, lab):  # the critic's loss turns NaN from the second generator step on
        calls["n"] += 1
        gp = penalty(critic, real, fake, lab)
        return gp * torch.nan if calls["n"] > 5 else gp

    monkeypatch.setattr(wgan, "gradient_penalty", poisoned)
    with pytest.raises(ValueError, match=r"run: training diverged by step 3 \(critic loss not finite\)"):
        wgan.train(str(tmp_path / "train.h5"), str(tmp_path / "run"), steps=12, quiet=True, options=opts)
    assert not (tmp_path / "run" / "checkpoint.json").exists()
    assert not (tmp_path / "run" / "history.jsonl").read_text()  # nothing logged from the diverged steps
