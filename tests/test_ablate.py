"""Ablation experiments: spec expansion and validation, resume logic, the report's statistics, end to end."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from sandbox import config as config_lib
from sandbox import rundir
from sandbox.ablate import runner
from sandbox.ablate.report import load_experiment, summarize, welch, write_report
from sandbox.ablate.spec import load_spec
from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.yaml"


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------- spec


def test_smoke_spec_expands_grid_and_explicit_cells(tmp_path):
    spec = load_spec(SMOKE, tmp_path / "exp")
    assert [c.name for c in spec.cells] == ["fp32_s0", "fp32_s1", "fp16_s0", "fp16_s1", "fp16_naive_softmax_s0"]
    assert spec.variants == ["fp32", "fp16", "fp16_naive_softmax"]
    bad = spec.cells[-1].config
    assert bad.precision.naive_softmax and bad.model.init_std == 2.0 and bad.precision.policy == "fp16"
    assert spec.cells[1].config.seed == 1 and spec.cells[1].config.model.d_model == 32
    assert spec.cells[0].config.run_dir == tmp_path / "exp" / "cells" / "fp32_s0"


def test_precision_ablation_spec_is_six_policies_by_three_seeds():
    if not (REPO / "configs" / "shakespeare_char.yaml").exists():
        pytest.skip("configs/shakespeare_char.yaml not present")
    spec = load_spec(REPO / "experiments" / "precision_ablation.yaml")
    assert spec.variants == ["fp32", "bf16", "fp16", "fp8", "bf16_pure", "fp16_noscale"]
    assert len(spec.cells) == 18
    cfg = spec.cells[0].config
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.context) == (4, 4, 128, 64)
    assert (cfg.training.batch_size, cfg.training.steps, cfg.data.source) == (12, 2000, "text")


def test_seed_axis_crosses_explicit_cells(tmp_path):
    path = write_spec(tmp_path, "axes: {seed: [3, 4]}\ncells:\n  - {optimizer.lr: 0.01}\n  - {optimizer.lr: 0.1, seed: 9}\n")
    spec = load_spec(path, tmp_path / "exp")
    assert [(c.variant, c.seed) for c in spec.cells] == [("0.01", 3), ("0.01", 4), ("0.1", 9)]
    assert spec.cells[0].config.optimizer.lr == 0.01


@pytest.mark.parametrize("text, message", [
    ("axes: {precision.polcy: [fp32]}", "cell fp32_s0: unknown config key 'precision.polcy'"),
    ("axes: {optimizer.lr: [fast]}", "optimizer.lr: expected a number, got 'fast'"),
    ("axes: {training.steps: [0]}", "training.steps: expected >= 1, got 0"),
    ("axes: {precision.policy: [fp9]}", "cell fp9_s0:"),
    ("axes: {seed: []}", "axes.seed: expected a non-empty list"),
    ("axis: {seed: [0]}", "unknown spec key 'axis'"),
    ("base: nowhere.yaml", "nowhere.yaml: file not found"),
    ("target_loss: -1", "target_loss: expected a positive number"),
    ("cells: [{label: a, seed: 0}, {label: a, seed: 0}]", "two cells are both named 'a_s0'"),
])
def test_bad_specs_give_one_line_errors(tmp_path, text, message):
    path = write_spec(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_spec(path, tmp_path / "exp")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value) or "nowhere.yaml" in message


def test_cli_reports_bad_input_with_exit_2(tmp_path, capsys):
    assert main(["ablate", str(write_spec(tmp_path, "axes: {nope: [1]}")), "--out", str(tmp_path / "e")]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "unknown config key 'nope'" in err[0] and "not a directory" in err[1]


# ----------------------------------------------------------------- resume logic


def test_rerun_skips_finished_and_failed_and_resumes_the_rest(tmp_path, monkeypatch):
    spec = load_spec(SMOKE, tmp_path / "exp")
    exp = tmp_path / "exp"
    rundir.open_dir(exp, "experiment").release()  # made by an earlier `sandbox ablate`
    (exp / "logs").mkdir(parents=True)
    prior = {"fp32_s0": ("finished", 0), "fp32_s1": ("failed", 3), "fp16_s0": ("interrupted", 0),
             "fp16_s1": (None, 1)}  # fp16_s1 crashed before writing a summary; the last cell never ran
    for name, (status, rc) in prior.items():
        (exp / "cells" / name).mkdir(parents=True)
        if status:
            (exp / "cells" / name / "summary.json").write_text(json.dumps({"status": status}))
        (exp / "logs" / f"{name}.json").write_text(json.dumps({"returncode": rc}))
    assert [runner.cell_status(exp, n) for n in prior] == ["finished", "failed", "interrupted", "crashed"]
    ran = []
    monkeypatch.setattr(runner, "run_cell", lambda cell, d: ran.append(cell.name) or
                        runner.Outcome(cell.name, "finished", 0, 0.0, {}))
    runner.run_experiment(spec, exp, jobs=2)
    assert sorted(ran) == ["fp16_naive_softmax_s0", "fp16_s0", "fp16_s1"]
    assert (exp / "configs" / "fp16_s0.yaml").exists() and (exp / "experiment.json").exists()


def test_changed_spec_refuses_to_resume_a_cell(tmp_path, monkeypatch):
    spec = load_spec(SMOKE, tmp_path / "exp")
    rundir.open_dir(tmp_path / "exp", "experiment").release()
    cell_dir = tmp_path / "exp" / "cells" / "fp32_s0"
    cell_dir.mkdir(parents=True)
    (cell_dir / "config.yaml").write_text("seed: 5\n")
    monkeypatch.setattr(runner, "run_cell", lambda cell, d: runner.Outcome(cell.name, "finished", 0, 0.0, {}))
    with pytest.raises(UserError, match=r"different config \(seed, .*\); pass --overwrite"):
        runner.run_experiment(spec, tmp_path / "exp")
    runner.run_experiment(spec, tmp_path / "exp", overwrite=True)


# ----------------------------------------------------------------- report on a hand-made experiment

VAL = {"fp32": [2.00, 2.02, 1.98], "bf16": [2.01, 1.97, 2.03], "fp16": [2.30, 2.33, 2.28]}


def fake_experiment(root: Path) -> Path:
    exp = root / "exp"
    cells = []
    for policy, vals in VAL.items():
        for seed, v in enumerate(vals):
            name = f"{policy}_s{seed}"
            cells.append({"name": name, "variant": policy, "seed": seed, "policy": policy,
                          "settings": {"precision.policy": policy, "seed": seed}})
            d = exp / "cells" / name
            d.mkdir(parents=True)
            rows = []
            for step in range(1, 11):
                row = {"step": step * 10, "split": "train", "loss": 4.0 - step * 0.2, "overflow": 0.0,
                       "loss_scale": 1.0}
                if policy == "fp16":
                    row["overflow"] = float(step == 3)
                    row["loss_scale"] = 2.0 ** (16 - (step >= 3))
                rows.append(row)
                rows.append({"step": step * 10, "split": "val", "ce": v + (10 - step) * 0.1})
            d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            d.joinpath("summary.json").write_text(json.dumps({
                "status": "finished", "steps": 100, "policy": policy, "train_ce": 2.1, "val_ce": v,
                "val_perplexity": math.exp(v), "val_bits_per_token": v / math.log(2), "tokens_per_s": 1000.0 + seed,
                "overflow_skips": 1 if policy == "fp16" else 0, "nonfinite_skips": 0, "final_loss_scale": 1.0}))
    cells.append({"name": "noscale_s0", "variant": "fp16_noscale", "seed": 0, "policy": "fp16_noscale",
                  "settings": {"precision.policy": "fp16_noscale", "seed": 0}})
    (exp / "cells" / "noscale_s0").mkdir(parents=True)
    (exp / "cells" / "noscale_s0" / "summary.json").write_text(json.dumps(
        {"status": "failed", "failed_step": 7, "val_ce": None, "bundle": "x"}))
    cells.append({"name": "fp8_s0", "variant": "fp8", "seed": 0, "policy": "fp8",
                  "settings": {"precision.policy": "fp8", "seed": 0}})
    cells.append({"name": "fp8_s1", "variant": "fp8", "seed": 1, "policy": "fp8",
                  "settings": {"precision.policy": "fp8", "seed": 1}})
    d = exp / "cells" / "fp8_s1"
    d.mkdir(parents=True)
    d.joinpath("summary.json").write_text(json.dumps({"status": "finished", "val_ce": 2.1, "fp8_saturated_frac": 0.01}))
    d.joinpath("metrics.jsonl").write_text("".join(json.dumps(
        {"step": k, "split": "train", "loss": 3.0, "fp8/block_0/fc/Fp8DotGeneral_0/input_amax": 1.0 + k,
         "fp8/block_0/fc/Fp8DotGeneral_0/input_scale": 448.0 / (1.0 + k)}) + "\n" for k in range(1, 20)))
    (exp / "logs").mkdir(parents=True)
    (exp / "logs" / "fp8_s0.json").write_text(json.dumps({"returncode": 1, "stderr_tail": "Boom"}))
    (exp / "experiment.json").write_text(json.dumps(
        {"name": "fake", "baseline": "fp32", "alpha": 0.05, "target_loss": 3.0, "cells": cells}))
    return exp


def test_welch_matches_the_textbook_formula():
    a, b = VAL["fp16"], VAL["fp32"]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    from scipy import stats

    assert welch(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert welch([1.0], b) is None


def test_welch_with_identical_seeds_in_one_variant_answers_without_a_warning():
    """A variant whose seeds all end at the same val CE (common when it does not depend on the seed): the
    test is still defined by the other variant's spread, and the report must not print scipy's
    'catastrophic cancellation' RuntimeWarning into the user's console."""
    a, b = [2.12, 2.12], [2.0, 2.01]
    vb = np.var(b, ddof=1) / 2
    t, df = (2.12 - np.mean(b)) / math.sqrt(vb), 1.0  # Welch-Satterthwaite with va = 0: vb^2 / (vb^2 / 1)
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = welch(a, b)
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-6)


def test_summary_rows_statistics_and_failures(tmp_path):
    rows, target = summarize(load_experiment(fake_experiment(tmp_path)))
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["fp32", "bf16", "fp16", "fp16_noscale", "fp8"] and target == 3.0
    assert by["fp32"]["val_ce"] == pytest.approx(2.0) and by["fp32"]["val_ce_std"] == pytest.approx(0.02)
    assert by["fp32"]["vs_baseline"] == "baseline"
    assert by["bf16"]["vs_baseline"] == "same" and by["bf16"]["p_value"] > 0.05
    assert by["fp16"]["vs_baseline"] == "worse" and by["fp16"]["p_value"] < 0.01
    assert by["fp16"]["overflow_events"] == 1 and by["fp16"]["skipped_steps"] == 1
    assert by["fp32"]["steps_to_target"] == 50  # loss 4 - 0.2 k <= 3 first at k = 5
    assert by["fp16_noscale"]["status"] == "1 failed" and by["fp16_noscale"]["nan_step"] == "7"
    assert by["fp16_noscale"]["val_ce"] is None and by["fp16_noscale"]["vs_baseline"] == "no finished run"
    assert by["fp8"]["status"] == "1 crashed, 1 finished" and by["fp8"]["crashed_cells"] == "fp8_s0"
    assert by["fp8"]["fp8_saturated_frac"] == 0.01 and by["fp8"]["vs_baseline"] is None  # one seed: no test
    assert by["fp32"]["precision_drift"] is None  # not in these summaries: shown as '-'


def test_report_writes_table_csv_and_plots(tmp_path, capsys):
    exp = fake_experiment(tmp_path)
    assert main(["report", str(exp)]) == 0
    table = (exp / "table.md").read_text()
    assert "| fp16 | 3 finished |" in table and "worse (p=" in table and "Welch" in table
    assert "| fp16_noscale | 1 failed |" in table and "| fp8 | 1 crashed, 1 finished |" in table
    with (exp / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["fp32", "bf16", "fp16", "fp16_noscale", "fp8"]
    assert float(rows[2]["val_ce"]) == pytest.approx(np.mean(VAL["fp16"]))
    names = sorted(p.name for p in (exp / "plots").iterdir())
    stems = ["final_values", "fp8_scaling", "loss_scale", "val_loss", "vs_baseline"]
    assert names == sorted(f"{s}.{fmt}" for s in stems for fmt in ("png", "svg"))
    assert all((exp / "plots" / n).stat().st_size > 5000 for n in names)


# ----------------------------------------------------------------- end to end


def test_a_crashing_cell_is_recorded_with_its_stderr(tmp_path, capsys):
    # The cell's process dies before training (its corpus is missing): a real
    # subprocess, no compile, so this stays fast.
    path = write_spec(tmp_path, "config: {data: {source: text, paths: [no_such_corpus.txt]}}\n"
                                "axes: {seed: [0]}\n")
    exp = tmp_path / "exp"
    (outcome,) = runner.run_experiment(load_spec(path, exp), exp)
    assert outcome.status == "crashed" and outcome.returncode == 2
    assert "no_such_corpus.txt" in outcome.stderr_tail
    assert "CRASHED (exit 2)" in capsys.readouterr().err
    rows, _ = summarize(load_experiment(exp))
    assert rows[0]["status"] == "1 crashed" and rows[0]["crashed_cells"] == "base_s0"


@pytest.mark.slow  # five tiny runs, each its own process and compile: minutes on a loaded 2-core CPU
def test_smoke_experiment_end_to_end(tmp_path, capsys):
    exp = tmp_path / "smoke"
    assert main(["ablate", str(SMOKE), "--out", str(exp), "--jobs", "2"]) == 0
    out = capsys.readouterr()
    assert out.err.count("] ") >= 5  # one line per finished cell

    with (exp / "summary.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["fp32", "fp16", "fp16_naive_softmax"]
    for variant in ("fp32", "fp16"):
        r = rows[variant]
        assert r["status"] == "2 finished"
        for key in ("train_ce", "val_ce", "val_perplexity", "val_bits_per_token", "tokens_per_s", "final_loss_scale"):
            assert math.isfinite(float(r[key])), (variant, key)
        assert 0 < float(r["val_ce"]) < math.log(256)
        assert float(r["val_bits_per_token"]) == pytest.approx(float(r["val_ce"]) / math.log(2))
    assert rows["fp32"]["vs_baseline"] == "baseline" and rows["fp16"]["vs_baseline"] in ("same", "worse", "better")
    bad = rows["fp16_naive_softmax"]
    assert bad["status"] == "1 failed" and int(bad["nan_step"]) >= 1 and bad["val_ce"] == ""
    assert (exp / "cells" / "fp16_naive_softmax_s0" / "failure").exists()

    table = (exp / "table.md").read_text()
    assert table.count("\n| ") == 4 and "| fp16_naive_softmax | 1 failed |" in table
    assert {p.name for p in (exp / "plots").iterdir()} >= {"val_loss.png", "loss_scale.png", "final_values.png",
                                                          "vs_baseline.svg"}
    assert len(list((exp / "tb").iterdir())) == 5  # one shared TensorBoard root, a subdirectory per cell

    assert main(["ablate", str(SMOKE), "--out", str(exp)]) == 0  # re-run: everything is kept
    assert "5 of 5 cells already done" in capsys.readouterr().err


# ----------------------------------------------------------------- only its own folders (issue 14.2)


def _canaries(folder: Path, names=("configs", "logs", "plots")) -> list[Path]:
    out = []
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        out.append(folder / name / "canary.txt")
        out[-1].write_text("precious")
    return out


def _stub_cells(monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "run_cell", lambda cell, d: ran.append(cell.name) or
                        runner.Outcome(cell.name, "finished", 0, 0.0, {}))
    return ran


def test_overwrite_of_a_folder_that_is_not_an_experiment_deletes_nothing(tmp_path, capsys, monkeypatch):
    ran = _stub_cells(monkeypatch)
    folder = tmp_path / "mine"
    canaries = _canaries(folder)
    assert main(["ablate", str(SMOKE), "--out", str(folder), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and ".sandbox-run" in err[-1] and not ran
    assert all(c.read_text() == "precious" for c in canaries)


def test_spec_named_dotdot_is_refused_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    ran = _stub_cells(monkeypatch)
    monkeypatch.chdir(tmp_path)
    canaries = _canaries(tmp_path)
    (tmp_path / "specs").mkdir()
    spec = write_spec(tmp_path / "specs", 'name: ".."\naxes: {seed: [0]}\n')
    assert main(["ablate", str(spec), "--overwrite"]) == 2
    assert "name: expected a plain name" in capsys.readouterr().err and not ran
    assert all(c.read_text() == "precious" for c in canaries)


def test_without_overwrite_existing_report_files_of_a_foreign_folder_are_kept(tmp_path, capsys, monkeypatch):
    ran = _stub_cells(monkeypatch)
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("table.md", "spec.yaml", "summary.csv"):
        (folder / name).write_text("precious")
    assert main(["ablate", str(SMOKE), "--out", str(folder)]) == 2 and not ran
    assert all((folder / n).read_text() == "precious" for n in ("table.md", "spec.yaml", "summary.csv"))
    assert sorted(p.name for p in folder.iterdir()) == ["spec.yaml", "summary.csv", "table.md"]


def test_rerun_from_the_experiments_own_spec_yaml(tmp_path, capsys, monkeypatch):
    ran = _stub_cells(monkeypatch)
    exp = tmp_path / "exp"
    assert main(["ablate", str(SMOKE), "--out", str(exp)]) == 0
    first = [c.config for c in load_spec(SMOKE, exp).cells]
    assert [c.config for c in load_spec(exp / "spec.yaml", exp).cells] == first  # self-contained copy
    assert main(["ablate", str(exp / "spec.yaml"), "--out", str(exp)]) == 0
    assert main(["ablate", str(exp / "spec.yaml"), "--out", str(exp), "--overwrite"]) == 0
    assert len(ran) == 15 and (exp / "spec.yaml").is_file() and (exp / ".sandbox-run").is_file()


def test_overwrite_clears_a_marked_experiment_but_nothing_outside_it(tmp_path, capsys, monkeypatch):
    _stub_cells(monkeypatch)
    exp = tmp_path / "exp"
    assert main(["ablate", str(SMOKE), "--out", str(exp)]) == 0
    outside = _canaries(tmp_path / "outside", ("keep",))[0]
    (exp / "logs" / "link").symlink_to(outside.parent)
    (exp / "stray.txt").write_text("ours to delete")
    assert main(["ablate", str(SMOKE), "--out", str(exp), "--overwrite"]) == 0
    assert not (exp / "stray.txt").exists() and outside.read_text() == "precious"


def test_report_replaces_a_planted_table_link_and_leaves_its_target(tmp_path, capsys):
    exp = fake_experiment(tmp_path)
    target = tmp_path / "precious.md"
    target.write_text("precious")
    (exp / "table.md").symlink_to(target)
    (exp / "summary.csv").symlink_to(target)
    assert main(["report", str(exp)]) == 0
    assert target.read_text() == "precious"
    assert not (exp / "table.md").is_symlink() and "| fp16 |" in (exp / "table.md").read_text()


def test_report_refuses_a_plots_link(tmp_path, capsys):
    exp = fake_experiment(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (exp / "plots").symlink_to(elsewhere)
    assert main(["report", str(exp)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not list(elsewhere.iterdir())


def test_a_locked_experiment_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    import os

    from sandbox import rundir

    ran = _stub_cells(monkeypatch)
    exp = tmp_path / "exp"
    lock = rundir.open_dir(exp, "experiment")
    try:
        assert main(["ablate", str(SMOKE), "--out", str(exp)]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"in use by another sandbox process (pid {os.getpid()}" in err and not ran


# ----------------------------------------------------------------- TensorBoard hparams (issue 15.2)


def _hparams_sessions(tb_dir: Path) -> dict:
    """run -> (hparams, {metric tag: value}), read back with TensorBoard's own event reader and hparams plugin."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins.hparams import metadata

    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tb_dir))
    mux.Reload()
    out = {}
    for run, tags in mux.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        if metadata.SESSION_START_INFO_TAG not in tags:
            continue
        start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
        hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        acc = mux.GetAccumulator(run)
        metrics = {tag: float(acc.Tensors(tag)[-1].tensor_proto.float_val[0])
                   for tag in acc.Tags()["tensors"] if tag.startswith("hparams/")}
        experiment = metadata.parse_experiment_plugin_data(tags[metadata.EXPERIMENT_TAG])
        out[run] = (hparams, metrics, {m.name.tag for m in experiment.metric_infos})
    return out


def test_report_writes_hparams_that_tensorboard_reads(tmp_path, capsys):
    exp = fake_experiment(tmp_path)
    (exp / "configs").mkdir()
    (exp / "configs" / "fp32_s0.yaml").write_text("precision: {policy: fp32}\nseed: 0\noptimizer: {lr: 0.001}\n")
    assert main(["report", str(exp)]) == 0
    assert main(["report", str(exp)]) == 0  # a second report replaces the sessions, it does not add any
    sessions = _hparams_sessions(exp / "tb")
    # every cell that ran is a session; fp8_s0 crashed (still a session, without metrics)
    assert sorted(sessions) == sorted(f"{c}/hparams" for c in
                                      [f"{p}_s{s}" for p in VAL for s in range(3)] + ["noscale_s0", "fp8_s0", "fp8_s1"])
    hp, metrics, declared = sessions["fp16_s2/hparams"]
    assert hp == {"precision.policy": "fp16", "seed": 2.0, "variant": "fp16"}
    assert declared == {"hparams/val_ce", "hparams/train_ce", "hparams/skipped_steps", "hparams/tokens_per_s"}
    summary = json.loads((exp / "cells" / "fp16_s2" / "summary.json").read_text())
    assert metrics["hparams/val_ce"] == pytest.approx(summary["val_ce"])
    assert metrics["hparams/train_ce"] == pytest.approx(summary["train_ce"])
    assert metrics["hparams/skipped_steps"] == summary["overflow_skips"] + summary["nonfinite_skips"] == 1
    assert metrics["hparams/tokens_per_s"] == pytest.approx(1002.0)
    assert sessions["noscale_s0/hparams"][1] == {}  # failed: no final values, no invented ones
    assert [p.name for p in (exp / "tb" / "fp32_s0" / "hparams").iterdir()] == ["events.out.tfevents.0.sandbox-hparams"]


# ----------------------------------------------------------------- --set and per-cell progress (issue 15.11)


def test_set_overrides_every_cell_and_the_saved_spec(tmp_path, capsys, monkeypatch):
    spec = load_spec(SMOKE, tmp_path / "exp", ["training.steps=3", "optimizer.lr=1e-3"])
    assert {(c.config.training.steps, c.config.optimizer.lr) for c in spec.cells} == {(3, 1e-3)}
    assert spec.resolved["config"]["training"]["steps"] == 3  # spec.yaml re-runs it without --set
    assert load_spec(SMOKE, tmp_path / "exp").cells[0].config.training.steps == 30

    ran = _stub_cells(monkeypatch)
    exp = tmp_path / "cli"
    assert main(["ablate", str(SMOKE), "--out", str(exp), "--set", "training.steps=3"]) == 0 and len(ran) == 5
    for cell in ran:  # what each cell's process is given to run
        assert config_lib.load_config(exp / "configs" / f"{cell}.yaml").training.steps == 3
    assert [c.config.training.steps for c in load_spec(exp / "spec.yaml", exp).cells] == [3] * 5
    # Changing the override later is a changed config: refused, not silently resumed.
    (exp / "cells" / "fp32_s0").mkdir(parents=True)
    rundir.atomic_write(exp / "cells" / "fp32_s0" / "config.yaml", (exp / "configs" / "fp32_s0.yaml").read_text())
    assert main(["ablate", str(SMOKE), "--out", str(exp), "--set", "training.steps=4"]) == 2
    assert "different config (training.steps)" in capsys.readouterr().err


@pytest.mark.parametrize("sets, message", [
    (["precision.policy=bf16"], "varies precision.policy across its cells"),
    (["precision=x"], "varies precision.naive_softmax across its cells"),  # a section holding a varied key
    (["seed=4"], "varies seed across its cells"),
    (["name=other"], "name is set per cell by sandbox ablate"),
    (["training.stesp=3"], "unknown config key 'training.stesp'"),
    (["training.steps=0"], "training.steps: expected >= 1, got 0"),
    (["training.steps"], "expected KEY.PATH=VALUE"),
])
def test_bad_set_is_one_line_exit_2(tmp_path, capsys, monkeypatch, sets, message):
    ran = _stub_cells(monkeypatch)
    argv = ["ablate", str(SMOKE), "--out", str(tmp_path / "exp")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not ran and not (tmp_path / "exp").exists()


def test_progress_lines_show_each_running_cells_step(tmp_path, capsys):
    spec = load_spec(SMOKE, tmp_path / "exp")
    a, b = spec.cells[:2]
    logs = tmp_path / "exp" / "logs"
    logs.mkdir(parents=True)
    progress = runner._Progress(total=5, done=0, line_every_s=0.0)
    progress.start(a)
    progress.start(b)
    rundir.atomic_write(runner.progress_path(tmp_path / "exp", a.name), json.dumps({"step": 20, "total": 30}))
    steps = {c.name: runner.read_progress(tmp_path / "exp", c.name) for c in (a, b)}
    assert steps == {a.name: 20, b.name: None}
    progress.update(steps, {a.name: 12.0, b.name: 3.0}, {a.name: 30, b.name: 30})
    progress.update(steps, {a.name: 13.0, b.name: 4.0}, {a.name: 30, b.name: 30})  # nothing moved: no new line
    progress.finish(runner.Outcome(a.name, "finished", 0, 41.0, {"steps": 30, "val_ce": 2.5}))
    progress.close()
    err = capsys.readouterr().err.splitlines()
    assert err == ["[start] fp32_s0 (30 steps)", "[start] fp32_s1 (30 steps)",
                   "running: fp32_s0 step 20/30 (12s), fp32_s1 step -/30 (3s)",
                   "[1/5] fp32_s0: finished at step 30 in 41s, val_ce 2.5000"]


@pytest.mark.slow  # two real cells, each its own process and compile: ~1 minute on a loaded 2-core CPU
def test_set_steps_runs_three_steps_per_cell_and_progress_names_them(tmp_path, capsys):
    # Two real cells (own processes, own compiles): the smoke model, three steps each.
    path = write_spec(tmp_path, "config:\n"
                      "  model: {context: 16, n_layer: 1, n_head: 2, d_model: 16}\n"
                      "  data: {source: synthetic, synthetic: {alphabet: 8, order: 1, seed: 7}, prefetch: 0}\n"
                      "  training: {steps: 30, batch_size: 4, eval_every: 0, eval_batches: 1, log_every: 1}\n"
                      "  checkpoint: {every: 0}\n"
                      "axes: {precision.policy: [fp32, bf16]}\n")
    exp = tmp_path / "exp"
    assert main(["ablate", str(path), "--out", str(exp), "--set", "training.steps=3", "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    for cell in ("fp32_s0", "bf16_s0"):
        rows = [r for r in read_metrics(exp / "cells" / cell) if r.get("split") == "train"]
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert json.loads((exp / "cells" / cell / "summary.json").read_text())["steps"] == 3
        assert f"[start] {cell} (3 steps)" in err
        assert re.search(rf"\[\d/2\] {cell}: finished at step 3 in \d+s", err), err
        assert json.loads((exp / "logs" / f"{cell}.progress.json").read_text())["step"] == 3
    assert "--set training.steps=3" in (exp / "spec.yaml").read_text().splitlines()[0]
