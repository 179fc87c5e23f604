"""The benchmark scripts run on CPU and print their table last (content, never timing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from sandbox import bench

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_counts_attention_unhalved():
    cfg = bench.load_config("tiny", "fp32")
    m = cfg.model
    params = {"embed": {"embedding": np.zeros((m.vocab_size, m.d_model))}}
    f = bench.flops_per_token(cfg, params)
    assert f["flops_6n"] == 6 * m.vocab_size * m.d_model
    assert f["flops_6n_attn"] - f["flops_6n"] == 12 * m.n_layer * m.n_head * (m.d_model // m.n_head) * m.context


@pytest.mark.parametrize("name", ["bench", "bench_step"])
def test_script_prints_a_markdown_table_last(name, tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["--policies", "fp32", "--steps", "1", "--repeats", "1", "--json", str(out)]
    args += ["--sizes", "tiny"] if name == "bench" else ["--size", "tiny"]
    assert _script(name).main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("| ") and set(lines[-2]) <= set("|-") and lines[-1].startswith("| ")
    header = [h.strip() for h in lines[-3].strip("|").split("|")]
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert "fp32" in cells and "-" not in (row.get("tok/s"), row.get("sandbox tok/s"))
    ratio = float(row.get("sandbox/bare") or row["sandbox/bare (telemetry on)"])
    assert ratio > 0
    data = json.loads(out.read_text())
    assert data["environment"]["backend"] == "cpu" and data.get("rows")


@pytest.mark.slow  # four compiles
def test_bench_step_compare_times_each_policy_against_the_first(tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["--compare", "--size", "tiny", "--policies", "bf16,fp8_current", "--steps", "1", "--repeats", "1",
            "--json", str(out)]
    assert _script("bench_step").main(args) == 0
    table = json.loads(out.read_text())["table"]
    assert [r["policy"] for r in table] == ["bf16", "fp8_current"] and table[0]["vs_first"] == 1.0
    assert all(r["step_ms"] > 0 and r["step_ms_telemetry"] > 0 for r in table)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| fp8_current |")
