"""The public API: the names docs/api.md promises exist, and its example runs and learns."""

from __future__ import annotations

import re
import subprocess
import sys

import sandbox
import sandbox.precision as precision
from tests.conftest import REPO

API = (REPO / "docs" / "api.md").read_text()


def test_every_name_in_the_api_table_is_exported():
    names = re.findall(r"`(\w+)`", API.split("## Example")[0])
    for name in names:
        if name in ("sandbox", "precision", "params", "dot_general_cls", "cast_to_compute", "cast_to_param",
                    "cast_to_output", "init", "scale_loss", "unscale", "update", "stochastic_rounding",
                    "kahan_compensation", "adamw_lowp", "state_bytes", "scaled_dot", "run_dir"):
            continue
        assert hasattr(precision, name), name


def test_top_level_exports():
    for name in ("Policy", "PRESETS", "make_policy", "LossScaler", "select_tree", "all_finite", "load_run_state"):
        assert hasattr(sandbox, name), name


def test_presets_and_policy_strings_agree():
    assert precision.parse_policy_string("bf16") == precision.PRESETS["bf16"]
    assert precision.make_policy("fp16") == precision.PRESETS["fp16"]


def test_the_example_runs_and_learns():
    code = API.split("```python\n", 1)[1].split("```", 1)[0]
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    loss = float(re.search(r"loss ([\d.]+)", p.stdout).group(1))
    assert loss < 0.5, p.stdout  # y = sum(x) has variance 8: the model learned it
