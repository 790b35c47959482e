"""Training: smoke runs per family, exact resume after an interruption, rollback on divergence, CLI, configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from caloforge.cli import main
from caloforge.models import families, load_model
from caloforge.train import CHECKPOINT, TrainConfig, Trainer, TrainingError, resolve_config
from conftest_models import TINY_CONFIGS, toy_detector, write_toy_file

FAMILIES = families()


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy-train.h5"
    write_toy_file(path, toy_detector(), 80, seed=5)
    return path


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=16, max_steps=6, checkpoint_every=2, val_every=3, val_fraction=0.2, val_max_showers=16,
                log_every=1, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_smoke(family, toy_file, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer.create(str(toy_file), family, out, _cfg(), TINY_CONFIGS[family])
    state = trainer.fit()
    assert state["step"] == 6 and state["best_step"] in (3, 6)
    for name in ("run.json", CHECKPOINT, "history.jsonl", "model.json", "model.safetensors", "last/model.json"):
        assert (out / name).is_file(), name
    kinds = [json.loads(line)["kind"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert kinds.count("val") == 2 and kinds.count("train") == 6
    model = load_model(out, expected_detector=toy_detector())
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["data"]["n_train"] == 64 and meta["training"]["data"]["n_val"] == 16
    assert meta["particle"] == "gamma" and "score" in meta["validation"]
    assert (model.sample([20e3, 50e3], 0.0, seed=0) >= 0).all()


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_gives_the_same_weights(family, toy_file, tmp_path):
    Trainer.create(str(toy_file), family, tmp_path / "a", _cfg(), TINY_CONFIGS[family]).fit()

    def kill_at_5(trainer):
        if trainer.state["step"] == 5:  # after the checkpoint at step 4; step 5 is lost and redone
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer.create(str(toy_file), family, tmp_path / "b", _cfg(), TINY_CONFIGS[family]).fit(kill_at_5)
    assert not (tmp_path / "b" / "last").exists()
    resumed = Trainer.resume(tmp_path / "b")
    assert resumed.state["step"] == 4
    resumed.fit()
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = load_file(str(tmp_path / "a" / CHECKPOINT)), load_file(str(tmp_path / "b" / CHECKPOINT))
    for k in ca:  # optimiser states and RNG too
        assert torch.equal(ca[k], cb[k]), k


def test_divergence_rolls_back_with_lower_lr(toy_file, tmp_path, capsys):
    trainer = Trainer.create(str(toy_file), "layerflow", tmp_path / "r", _cfg(max_rollbacks=2),
                             TINY_CONFIGS["layerflow"])
    real_step = trainer.model.training_step
    calls = {"n": 0}

    def flaky(batch, opts, step, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            return {"loss": float("nan")}
        return real_step(batch, opts, step, *a, **kw)

    trainer.model.training_step = flaky
    state = trainer.fit()
    assert state["step"] == 6 and state["rollbacks"] == 1 and state["lr_scale"] == 0.5
    assert "rolled back to the checkpoint at step 2" in capsys.readouterr().err

    trainer = Trainer.create(str(toy_file), "layerflow", tmp_path / "r2", _cfg(max_rollbacks=1),
                             TINY_CONFIGS["layerflow"])
    trainer.model.training_step = lambda *a, **kw: {"loss": float("inf")}
    with pytest.raises(TrainingError, match="training diverged at step 0"):
        trainer.fit()


def test_a_rollback_retries_with_fresh_noise(toy_file, tmp_path):
    """A NaN caused by one draw of the training noise must not recur when the step is retried: the checkpoint
    restores the random streams, so the retry reseeds them."""
    trainer = Trainer.create(str(toy_file), "layerflow", tmp_path / "r", _cfg(max_rollbacks=1),
                             TINY_CONFIGS["layerflow"])
    real_step = trainer.model.training_step
    seen: dict[int, float] = {}

    def noise_sensitive(batch, opts, step, *a, **kw):
        u = float(torch.rand(()))  # the step's first noise draw
        if step == 3 and seen.setdefault(step, u) == u:  # fails for this draw only
            return {"loss": float("nan")}
        return real_step(batch, opts, step, *a, **kw)

    trainer.model.training_step = noise_sensitive
    state = trainer.fit()
    assert state["step"] == 6 and state["rollbacks"] == 1


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('family = "layerflow"\n[train]\nlr = 2e-4\nbatch_size = 64\n[model]\nflow_blocks = 4\n')
    train, model = resolve_config("layerflow", str(cfg), ["train.lr=5e-4", "flow_hidden=32"])
    assert train.lr == 5e-4 and train.batch_size == 64
    assert model == {"flow_blocks": 4, "flow_hidden": 32}
    with pytest.raises(TrainingError, match="unknown key 'bogus'"):
        resolve_config("layerflow", None, ["bogus=1"])
    with pytest.raises(TrainingError, match="field 'family' is 'layerflow' but --model is 'wgan'"):
        resolve_config("wgan", str(cfg), [])


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml"))
    assert configs
    for path in configs:
        import tomllib

        doc = tomllib.loads(path.read_text())
        if "family" not in doc:  # not a training config (e.g. detector effects for digitize)
            assert "train" not in doc and "model" not in doc, f"{path}: a training config needs 'family'"
            continue
        resolve_config(doc["family"], str(path), [])


def test_cli_train_and_resume(toy_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", str(toy_file), "--model", "layerflow", "-o", str(out), "--max-steps", "3", "--quiet",
            "--set", "model.flow_blocks=2", "--set", "model.flow_hidden=8", "--set", "train.batch_size=16",
            "--set", "train.val_every=0"]
    assert main(args) == 0
    assert (out / "model.json").is_file()
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", "-o", str(out), "--resume", "--max-steps", "5", "--quiet"]) == 0
    assert json.loads((out / "last" / "model.json").read_text())["training"]["step"] == 5


def test_select_last_ships_the_final_weights(toy_file, tmp_path):
    """With ``select = "last"`` runs/NAME holds the final weights; validation is still run and logged."""
    out = tmp_path / "run"
    state = Trainer.create(str(toy_file), "layerflow", out, _cfg(select="last"), TINY_CONFIGS["layerflow"]).fit()
    assert state["best_step"] in (3, 6)
    final, top = load_file(out / "last" / "model.safetensors"), load_file(out / "model.safetensors")
    assert final.keys() == top.keys() and all(torch.equal(final[k], top[k]) for k in final)
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["step"] == 6 and "score" in meta["validation"]
    with pytest.raises(TrainingError, match="select is 'newest'"):
        TrainConfig.from_dict({"select": "newest"})


def test_training_is_deterministic_by_default(toy_file, tmp_path):
    """Deterministic kernels are on unless a config turns them off (scatter-adds otherwise reorder sums)."""
    assert TrainConfig().deterministic
    Trainer.create(str(toy_file), "layerflow", tmp_path / "d", _cfg(), TINY_CONFIGS["layerflow"])
    assert torch.are_deterministic_algorithms_enabled()


def test_mirror_x_is_the_detector_mirror_image(toy_file, tmp_path):
    """A shower mirrored in the shower-axis frame, placed back in the window, is the window's mirror image."""
    import numpy as np

    from caloforge.conditions import Conditions

    trainer = Trainer.create(str(toy_file), "layerflow", tmp_path / "m", _cfg(mirror_x=True),
                             TINY_CONFIGS["layerflow"])
    model = trainer.model
    det = model.detector
    rng = np.random.default_rng(0)
    n = 12
    n_l, nx, ny = det.shape(False)
    window = rng.random((n, n_l, nx, ny)).astype(np.float32)
    # keep a one-cell border empty: the local grid moves by a cell with the impact point (and one more when mirrored)
    window[:, :, [0, -1], :] = 0.0
    window[:, :, :, [0, -1]] = 0.0
    c = det.cell_size_mm
    x = rng.uniform(-c, c, n)
    x[[0, 2, 4]] = 0.0, c, -c  # impacts on cell boundaries (corner photons): the axis cell stays
    cond = Conditions(np.full(n, 3e4), 0.0, x, rng.uniform(-c, c, n), 22)
    local = torch.as_tensor(model.to_local(window.reshape(n, -1), cond.as_array()))
    raw = torch.as_tensor(cond.as_array(), dtype=torch.float32)
    mask = torch.as_tensor(np.arange(n) % 2 == 0)
    m_cond, m_local = trainer._mirror_x(raw, local, mask)
    back = model.to_window(m_local, m_cond, False).numpy().reshape(n, n_l, nx, ny)
    assert np.allclose(back[~mask.numpy()], window[~mask.numpy()])  # untouched rows
    assert np.allclose(back[mask.numpy()], window[mask.numpy()][:, :, ::-1, :])  # x -> -x
    assert np.allclose(m_cond[mask, 2].numpy(), -raw[mask, 2].numpy())
    # a training step runs with mirroring on
    trainer.fit()


@pytest.mark.parametrize("family", ["layerflow", "cfm"])
def test_init_from_starts_from_the_trained_weights(family, toy_file, tmp_path):
    """``--init-from`` (fine-tuning): the new run's model starts as the source's weights and preprocessing, records
    the source, resumes from its own checkpoint; a source with other options is refused, naming what differs."""
    src = tmp_path / "src"
    Trainer.create(str(toy_file), family, src, _cfg(select="last"), TINY_CONFIGS[family]).fit()
    trainer = Trainer.create(str(toy_file), family, tmp_path / "ft", _cfg(max_steps=2), TINY_CONFIGS[family],
                             init_from=str(src))
    ours, theirs = trainer.model.state_dict(), load_model(src).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    trainer.fit()
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["training"]["init_from"] == str(src)
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["init_from"] == str(src)
    other = dict(TINY_CONFIGS[family])
    other[{"layerflow": "flow_hidden", "cfm": "sample_steps"}[family]] += 1
    with pytest.raises(TrainingError, match="init_from .*model options"):
        Trainer.create(str(toy_file), family, tmp_path / "bad", _cfg(), other, init_from=str(src))
    with pytest.raises(TrainingError, match="init_from 'no-such-model'"):
        Trainer.create(str(toy_file), family, tmp_path / "bad2", _cfg(), TINY_CONFIGS[family],
                       init_from="no-such-model")


def test_freeze_keeps_the_named_parameters(toy_file, tmp_path):
    """``train.freeze``: the flows of a layerflow fine-tune stay as they were while the cell laws train; a name that
    matches no parameter is refused, naming the model's parameters."""
    src = tmp_path / "src"
    Trainer.create(str(toy_file), "layerflow", src, _cfg(select="last"), TINY_CONFIGS["layerflow"]).fit()
    trainer = Trainer.create(str(toy_file), "layerflow", tmp_path / "ft", _cfg(max_steps=3, freeze="blocks",
                                                                               select="last"),
                             TINY_CONFIGS["layerflow"], init_from=str(src))
    trainer.fit()
    before, after = load_model(src).state_dict(), load_model(tmp_path / "ft").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks."))
    assert not torch.equal(before["cell_hit"], after["cell_hit"])
    with pytest.raises(TrainingError, match="train.freeze 'flows' matches no parameter"):
        Trainer.create(str(toy_file), "layerflow", tmp_path / "bad", _cfg(freeze="flows"), TINY_CONFIGS["layerflow"])
