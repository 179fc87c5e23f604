"""sandbox/cli/: every command group registered by plain imports, nothing dropped silently, --tb-dir/--progress."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.cli import COMMAND_GROUPS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = {"train", "sample", "config", "replay", "whatif", "ablate", "report", "floats", "softmax", "demo", "lesson"}
# Makes `sandbox.ablate` unimportable, as a missing or broken package would be.
BLOCK_ABLATE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "sandbox.ablate":
            raise ModuleNotFoundError("No module named 'sandbox.ablate'", name="sandbox.ablate")
sys.meta_path.insert(0, Block())
from sandbox.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _sandbox(*args, script=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "sandbox", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def _subcommands(parser) -> set[str]:
    return {name for action in parser._subparsers._group_actions for name in action.choices}


def test_every_command_group_registers_its_subcommands():
    assert [g.__name__ for g in COMMAND_GROUPS] == [f"sandbox.cli.{m}" for m in
                                                   ("train", "config", "forensics", "ablate", "teaching", "lessons")]
    assert _subcommands(build_parser()) == SUBCOMMANDS


def test_help_of_python_m_sandbox_lists_every_subcommand():
    proc = _sandbox("--help")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert SUBCOMMANDS <= listed


def test_a_command_group_that_fails_to_import_fails_sandbox_loudly():
    proc = _sandbox("--help", script=BLOCK_ABLATE)
    assert proc.returncode != 0  # not a --help that quietly lacks `ablate` and `report`
    assert "No module named 'sandbox.ablate'" in proc.stderr


def test_version_and_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sandbox ")
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sandbox: argument COMMAND: invalid choice: 'no-such-command'") and err.count("\n") == 1


def test_the_cli_runs_from_a_source_tree_that_pip_never_installed(monkeypatch, capsys):
    """`python -m sandbox` from a clone on PYTHONPATH has no package metadata; building the parser read it
    for --version and every command failed with a traceback (found on a GPU machine, session 12)."""
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sandbox ")
    assert main(["floats", "70000"]) == 0 and "70000" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and err.count("\n") == 1


def test_train_tb_dir_and_progress_file(tmp_path):
    tb_dir, progress = tmp_path / "elsewhere" / "tb", tmp_path / "progress.json"
    args = ["train", str(REPO / "configs" / "quickstart.yaml"), "--set", f"run_root={tmp_path / 'runs'}",
            "--set", "training.steps=4", "--set", "training.eval_every=0", "--set", "training.log_every=2",
            "--set", "model.n_layer=1", "--set", "logging.progress=false", "--set", "logging.tensorboard=true",
            "--tb-dir", str(tb_dir), "--progress", str(progress)]
    assert main(args) == 0
    assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())
    assert not (tmp_path / "runs" / "quickstart" / "tb").exists()
    record = json.loads(progress.read_text())
    assert record["step"] == 4 and record["total"] == 4 and isinstance(record["loss"], float)


def test_sample_names_its_checkpoint_step_and_escapes_control_bytes(monkeypatch, capsys, tmp_path):
    import sandbox.cli.train as cli_train

    monkeypatch.setattr(cli_train, "sample_run", lambda run_dir, prompt, **kw: (prompt + "x\x1b[2Jy\x00z\nw", 40))
    assert main(["sample", str(tmp_path), "--prompt", "ab"]) == 0
    out, err = capsys.readouterr()
    assert out == "abx\\x1b[2Jy\\x00z\nw\n"
    assert "checkpoint step 40" in err
