"""The README's commands: every one parses, names files that exist, and (slow) runs as written."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from sandbox import config as config_lib
from sandbox.cli import build_parser
from tests.conftest import REPO


def _check_readme():
    spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exactly_two_setup_commands_each_one_line():
    blocks = _check_readme().bash_blocks((REPO / "README.md").read_text())
    assert len(blocks[0]) == 1 and len(blocks[1]) == 1
    assert "pip install -e ." in blocks[0][0] and "sandbox train" in blocks[0][0]
    ci = (REPO / ".ci" / "run").read_text()
    assert blocks[1][0].split("pip install")[-1].split("&&")[-1].strip() in ci  # CI runs the README's tests


def test_every_tour_command_parses_and_names_existing_files():
    setup, commands = _check_readme().tour((REPO / "README.md").read_text())
    parser = build_parser()
    for argv in [setup] + commands:
        if argv[0] != "sandbox":
            assert argv[0] == "tensorboard", argv
            continue
        args = parser.parse_args(argv[1:])
        for attr in ("config", "spec"):
            if isinstance(getattr(args, attr, None), str):
                assert (REPO / getattr(args, attr)).is_file(), argv


def test_no_tour_command_collides_with_an_earlier_run():
    """A second `sandbox train` into the same run directory needs --resume (the first tour line once did not)."""
    setup, commands = _check_readme().tour((REPO / "README.md").read_text())
    parser, seen = build_parser(), set()
    for argv in [setup] + commands:
        if argv[:2] != ["sandbox", "train"]:
            continue
        args = parser.parse_args(argv[1:])
        name = args.name or config_lib.load_config(REPO / args.config).name
        assert name not in seen or args.resume or argv is setup, f"collides with an earlier run: {argv}"
        seen.add(name)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "check_readme.py"), "--steps", "10"],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
