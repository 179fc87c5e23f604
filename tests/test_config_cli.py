"""`sandbox config keys|show` and `sandbox --version`: discoverable schema and resolved configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from sandbox import config as config_lib
from sandbox.cli import main
from tests.conftest import REPO


def _leaf_paths(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _leaf_paths(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_keys_lists_every_schema_leaf_with_type_default_range_and_help(capsys):
    assert main(["config", "keys", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == list(_leaf_paths(config_lib.Config))
    by = {r["key"]: r for r in rows}
    assert by["optimizer.b2"] == {"key": "optimizer.b2", "type": "number", "default": 0.99,
                                  "range": ">= 0.0 and <= 1.0", "help": "Adam beta2"}
    assert by["precision.loss_scale.mode"]["range"] == "auto | dynamic | static | none"
    assert all(r["help"] for r in rows), [r["key"] for r in rows if not r["help"]]


def test_keys_filters_by_prefix(capsys):
    assert main(["config", "keys", "precision.fp8."]) == 0
    out = capsys.readouterr().out
    keys = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert keys and all(k.startswith("precision.fp8.") for k in keys)


def test_show_prints_the_resolved_config_that_train_accepts(capsys, tmp_path):
    path = REPO / "configs" / "quickstart_bf16.yaml"  # inherits from quickstart.yaml through base:
    assert main(["config", "show", str(path), "--set", "optimizer.lr=0.0123"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optimizer"]["lr"] == 0.0123
    assert shown["precision"]["policy"] == "bf16"
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(shown))
    again = config_lib.load_config(tmp_path / "resolved.yaml")
    assert again == config_lib.load_config(path, ["optimizer.lr=0.0123"])


def test_show_of_a_bad_key_is_one_line_exit_2(capsys):
    assert main(["config", "show", str(REPO / "configs" / "quickstart.yaml"), "--set", "optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.lrr" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "sandbox 0.1.0"
