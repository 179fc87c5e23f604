import subprocess
import sys

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


# ----------------------------------------------------------------- issue 14: input that must be refused


def _train_file(capsys, tmp_path, text: str):
    f = tmp_path / "c.yaml"
    f.write_text(text, encoding="utf-8")
    code, _, err = run_cli(capsys, "train", str(f), "--set", f"run_root={tmp_path / 'runs'}")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    return err


@pytest.mark.parametrize("text, expected", [
    ("optimizer: {lr: 0.1}\noptimizer: {lr: 0.2}\n", "line 2: duplicate key 'optimizer'"),
    ("optimizer:\n  lr: 0.1\n  b1: 0.9\n  lr: 0.2\n", "line 4: duplicate key 'lr'"),
])
def test_duplicate_yaml_keys_are_refused(capsys, tmp_path, text, expected):
    assert expected in _train_file(capsys, tmp_path, text)


def test_yaml_merge_keys_may_override_without_being_duplicates():
    raw = config_lib.load_yaml_text("a: &a {x: 1, y: 2}\nb: {<<: *a, y: 3}\n", "t.yaml")
    assert raw["b"] == {"x": 1, "y": 3}


BOMB = "name: [" + ", ".join(
    [f"&a0 [{', '.join(['x'] * 9)}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "]\n"


def test_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    """Issue 14.11: ~540 bytes of nested aliases used to write gigabytes to stderr, then MemoryError."""
    assert len(BOMB) < 600
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    out = subprocess.run([sys.executable, "-m", "sandbox", "train", str(f), "--set", f"run_root={tmp_path / 'r'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and len(out.stderr) < 300, out.stderr[:1000]
    assert "aliases expand" in out.stderr and not (tmp_path / "r").exists()


def test_large_values_are_echoed_truncated(capsys, tmp_path):
    err = _train_file(capsys, tmp_path, "name: [" + ", ".join(["abcdefgh"] * 5000) + "]\n")
    assert "name: expected a string" in err and len(err) < 300, err


@pytest.mark.parametrize("override, expected", [
    ("seed=1180591620717411303424", "seed: expected <= 4294967295"),
    ("forensics.spike_window=1180591620717411303424", "forensics.spike_window: expected <="),
    ("model.vocab_size=4000000000", "model.vocab_size: expected <="),
    ("model.context=1000000000", "model.context: expected <="),
    ("model.n_layer=100000", "model.n_layer: expected <="),
    ("training.steps=99999999999", "training.steps: expected <="),
    ("mesh.fsdp=99999999999", "mesh.fsdp: expected <="),
    ("data.synthetic.seed=99999999999999999999999", "data.synthetic.seed: expected <="),
])
def test_integers_beyond_their_range_are_refused(capsys, tmp_path, override, expected):
    code, _, err = run_cli(capsys, "train", "configs/quickstart.yaml", "--set", override,
                           "--set", f"run_root={tmp_path / 'runs'}")
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, expected", [
    ('name: "a\\0b"\n', "name: contains a NUL byte"),
    ('data: {cache_dir: "c\\0"}\n', "data.cache_dir: contains a NUL byte"),
    ('objective: {kl: {reference: "\\0"}}\n', "objective.kl.reference: contains a NUL byte"),
    ('data: {source: text, paths: ["x\\0y.txt"]}\n', "data.paths[0]: contains a NUL byte"),
])
def test_nul_bytes_in_names_and_paths_are_refused(capsys, tmp_path, text, expected):
    assert expected in _train_file(capsys, tmp_path, text)


@pytest.mark.parametrize("override, expected", [
    ("model.d_model=65536", "do not fit"),
    ("training.batch_size=100000000", "do not fit"),
])
def test_configs_too_large_for_memory_are_refused_before_anything_is_written(capsys, tmp_path, override, expected):
    code, _, err = run_cli(capsys, "train", "configs/quickstart.yaml", "--set", override,
                           "--set", f"run_root={tmp_path / 'runs'}", "--set", "model.n_head=1")
    assert code == 2 and err.count("\n") == 1 and expected in err and "GiB" in err, err
    assert not (tmp_path / "runs").exists()
