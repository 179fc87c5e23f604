import pytest
import yaml

from sandbox import config as config_lib
from sandbox.cli import main
from sandbox.errors import UserError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("override, expected", [
    ("model.foo=1", "unknown config key 'model.foo'"),
    ("model.n_layer=abc", "model.n_layer: expected an integer, got 'abc'"),
    ("model.n_layer=-3", "model.n_layer: expected >= 1, got -3"),
    ("optimizer.lr=nan", "optimizer.lr: expected a finite number"),
    ("precision.fp8.fwd_dtype=e3m4", "precision.fp8.fwd_dtype: expected one of e4m3, e5m2"),
    ("training.log_every=1.5", "training.log_every: expected an integer"),
    ("model.n_head=3", "model.d_model: 64 is not divisible by model.n_head=3"),
    ("precision.policy=params=float32,compute=int8", "unknown dtype 'int8'"),
])
def test_bad_overrides_exit_2_with_one_line(capsys, tmp_path, override, expected):
    code, out, err = run_cli(capsys, "train", "configs/quickstart.yaml", "--set", override,
                             "--set", f"run_root={tmp_path}")
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_missing_file_and_bad_yaml(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: file not found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    code, _, err = run_cli(capsys, "train", str(bad))
    assert code == 2 and "invalid YAML" in err
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    code, _, err = run_cli(capsys, "train", str(listing))
    assert code == 2 and "expected a mapping" in err


def test_unknown_key_in_file_names_path(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"optimizer": {"learning_rate": 0.1}}))
    code, _, err = run_cli(capsys, "train", str(f))
    assert code == 2 and "unknown config key 'optimizer.learning_rate'" in err


def test_overrides_apply_and_config_is_frozen():
    cfg = config_lib.load_config("configs/quickstart.yaml", ["optimizer.lr=3e-4", "model.n_layer=3"])
    assert cfg.optimizer.lr == 3e-4 and cfg.model.n_layer == 3 and cfg.name == "quickstart"
    with pytest.raises(Exception):
        cfg.model.n_layer = 4  # frozen
    again = config_lib.from_dict(yaml.safe_load(config_lib.dump_yaml(cfg)))
    assert again == cfg  # the resolved config round-trips


def test_safe_yaml_refuses_python_tags(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        config_lib.load_config(f)
