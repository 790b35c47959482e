"""scripts/separation_breakdown.py: the classifier breakdown finds a wrong observable and not a right one."""

from __future__ import annotations

import re

from caloforge.dataset import write_showers
from conftest_models import load_script, toy_detector, toy_showers


def _auc(out: str) -> float:
    return float(re.search(r"test AUC (\S+)", out).group(1))


def test_breakdown_separates_a_wider_first_layer_only(tmp_path, capsys):
    det = toy_detector(n_layers=4, n_xy=8)
    ref, same = toy_showers(det, 600, seed=1), toy_showers(det, 600, seed=2)
    wide = same.showers.reshape(600, 4, 8, 8).copy()
    wide[:, 0, :, [0, -1]] += wide[:, 0, :, 3:5].sum(axis=2, keepdims=True).transpose(2, 0, 1) * 0.3  # far halo, y
    for name, batch_showers in (("ref", ref.showers), ("same", same.showers), ("wide", wide.reshape(600, -1))):
        write_showers(tmp_path / f"{name}.h5", det, (ref if name == "ref" else same).conditions, batch_showers)
    script = load_script("separation_breakdown")
    assert script.main([str(tmp_path / "ref.h5"), str(tmp_path / "same.h5"), "--max-iter", "30"]) == 0
    null = _auc(capsys.readouterr().out)
    assert script.main([str(tmp_path / "ref.h5"), str(tmp_path / "wide.h5"), "--groups", "--max-iter", "30"]) == 0
    out = capsys.readouterr().out
    assert abs(null - 0.5) < 0.1 and _auc(out) > 0.9, (null, out)
    lines = out.split("AUC with it alone")[1].strip().splitlines()[1:]
    assert lines[0].split()[0] in ("width_y", "r_mean"), out  # the group that loses most when left out comes first
