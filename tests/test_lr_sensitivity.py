"""LR sensitivity from an lr sweep's cells (ablate/lr_sensitivity.py), on hand-made cells whose answer is known."""

from __future__ import annotations

import math

import pytest

from sandbox.ablate import lr_sensitivity as lrs
from sandbox.ablate.report import CellData, Experiment


def _rows(losses, attn=None):
    return [{"split": "train", "step": i + 1, "loss": x,
             **({"attention/block_0/logit_max": attn[i]} if attn else {})} for i, x in enumerate(losses)]


def _cell(lr, final, status="finished", qk="false", losses=None, failed_step=None, attn=None):
    losses = losses or [5.5] + [3.0] * 20
    summary = {"status": status, "val_ce": final, "failed_step": failed_step}
    settings = {"model.qk_norm": qk, "precision.policy": "fp32", "optimizer.lr": lr, "seed": 0}
    return CellData(f"c{lr}{qk}", f"lr={lr} qk={qk}", 0, "fp32", settings, status, summary, None,
                    _metrics=_rows(losses, attn))


def _exp(cells):
    return Experiment(None, "sweep", "fp32", 0.05, None, cells)


def test_sensitivity_is_the_mean_gap_to_the_best_lr_with_failures_counted_as_the_initial_loss():
    cells = [_cell(1e-3, 3.0), _cell(1e-2, 2.0), _cell(1e-1, None, "failed", failed_step=7),
             _cell(1e-3, 2.5, qk="layernorm"), _cell(1e-2, 2.0, qk="layernorm"), _cell(1e-1, 9.0, qk="layernorm")]
    exp = _exp(cells)
    assert lrs.is_sweep(exp)
    lines, l0 = lrs.sensitivity(lrs.cell_points(exp))
    assert l0 == 5.5  # the first logged loss
    by = {r["line"]: r for r in lines}
    base, qk = by["qk_norm=false"], by["qk_norm=layernorm"]
    assert base["panel"] == "policy=fp32"
    assert base["best_lr"] == 1e-2 and base["final"][1e-1] == 5.5
    assert base["lr_sensitivity"] == pytest.approx((1.0 + 0.0 + 3.5) / 3)
    assert qk["final"][1e-1] == 5.5  # a loss above l0 is clipped to l0, as in the paper
    assert qk["lr_sensitivity"] == pytest.approx((0.5 + 0.0 + 3.5) / 3)
    assert base["diverged"][1e-1] == [7] and base["diverged"][1e-3] == []


def test_two_lrs_are_not_a_sweep():
    assert not lrs.is_sweep(_exp([_cell(1e-3, 3.0), _cell(1e-2, 2.0)]))


def test_divergence_step_is_a_sustained_rise_not_a_spike():
    spike = [5.0] * 5 + [3.0] * 20 + [9.0] + [3.0] * 20
    assert lrs.divergence_step(_rows(spike)) is None
    rise = [5.0] * 5 + [3.0] * 20 + [5.0] * 20
    step = lrs.divergence_step(_rows(rise))
    assert 26 <= step <= 36  # the 10-step mean passes 3 + 1 nats after 6 high steps
    assert lrs.divergence_step(_rows([3.0] * 12 + [math.nan])) == 13


def test_report_files_and_plots_are_written(tmp_path):
    attn = [0.1 * 2**i for i in range(21)]
    cells = [_cell(lr, 3.0 - lr, attn=attn) for lr in (1e-3, 1e-2, 1e-1)]
    for c in cells:
        c.run_dir = tmp_path / c.name
    exp = Experiment(tmp_path, "sweep", "fp32", 0.05, None, cells)
    out = lrs.write(exp)
    text = out["table"].read_text()
    assert "LR sensitivity" in text and "| policy=fp32 | qk_norm=false |" in text
    assert out["csv"].read_text().splitlines()[0].startswith("cell,panel,line,lr")
    assert {p.name for p in out["plots"]} == {"lr_sweep.png", "lr_sweep.svg", "attn_logit_growth.png",
                                              "attn_logit_growth.svg"}
    assert lrs.attn_logit_curve(cells[0].rows("train"))[1][-1] == attn[-1]
