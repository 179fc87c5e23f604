"""Run directories: names are one path component, `--overwrite` deletes only what the sandbox made,
one writer at a time, report files never written through a link.

The destructive cases run inside tmp_path with a canary file that must survive.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY, merge
from sandbox import rundir
from sandbox.cli import main
from sandbox.errors import UserError

HOLD_LOCK = """
import sys, time
from sandbox import rundir
lock = rundir.DirLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def _one_error_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def _config(tmp_path: Path, run_root: Path, **extra) -> Path:
    raw = merge(TINY, {"run_root": str(run_root), "data": {"cache_dir": str(tmp_path / "cache")},
                       "training": {"steps": 2}, **extra})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _canary(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    canary = directory / "canary.txt"
    canary.write_text("precious")
    return canary


# ----------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "x\x00y", "", "line\nbreak", "x" * 300])
def test_check_name_refuses_anything_but_one_path_component(name):
    with pytest.raises(UserError) as e:
        rundir.check_name(name, "--name")
    assert "--name" in str(e.value) and "\n" not in str(e.value)


def test_check_name_accepts_plain_names():
    for name in ("quickstart", "fp16_s0", "run-2.b", ".._s0"):
        assert rundir.check_name(name, "name") == name


@pytest.mark.parametrize("how", ["dotdot", "absolute", "nested"])
def test_train_name_that_is_a_path_is_refused_and_deletes_nothing(tmp_path, capsys, how):
    root = tmp_path / "root"
    canary = _canary(root)
    victim = _canary(tmp_path / "victim")
    name = {"dotdot": "..", "absolute": str(tmp_path / "victim"), "nested": "../victim"}[how]
    cfg = _config(tmp_path, root / "runs")
    assert main(["train", str(cfg), "--name", name, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and "--name" in err, err
    assert canary.read_text() == "precious" and victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["..", "a\\b", "tab\there"])
def test_yaml_name_that_is_not_a_plain_component_is_refused(tmp_path, capsys, name):
    canary = _canary(tmp_path / "root")
    cfg = _config(tmp_path, tmp_path / "root" / "runs", name=name)
    assert main(["train", str(cfg), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and "name" in err, err
    assert canary.exists()


# ----------------------------------------------------------------- marker and overwrite


def test_overwrite_refuses_a_directory_the_sandbox_did_not_create(tmp_path, capsys):
    runs = tmp_path / "runs"
    canary = _canary(runs / "mine")
    cfg = _config(tmp_path, runs)
    assert main(["train", str(cfg), "--name", "mine", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and rundir.MARKER in err, err
    assert canary.read_text() == "precious" and sorted(os.listdir(runs / "mine")) == ["canary.txt"]


def test_open_creates_a_marked_directory_and_overwrite_clears_only_its_contents(tmp_path):
    run = tmp_path / "runs" / "r"
    with rundir.open_dir(run, "run") as lock:
        assert lock.directory == run
        marker = json.loads((run / rundir.MARKER).read_text())
        assert marker["kind"] == "run" and marker["created_by"] == "sandbox"
        (run / "metrics.jsonl").write_text("{}\n")
        (run / "checkpoints").mkdir()
        outside = _canary(tmp_path / "outside")
        (run / "checkpoints" / "link").symlink_to(outside.parent)  # a link inside is removed, never followed
    with pytest.raises(UserError, match="--resume .* or --overwrite"):
        rundir.open_dir(run, "run")
    with rundir.open_dir(run, "run", overwrite=True):
        assert sorted(p.name for p in run.iterdir()) == sorted([rundir.MARKER, rundir.LOCK])
    assert outside.read_text() == "precious"
    with rundir.open_dir(run, "run", resume=True):
        pass


def test_a_marker_of_another_kind_is_not_enough(tmp_path):
    exp = tmp_path / "exp"
    rundir.open_dir(exp, "experiment").release()
    canary = _canary(exp)
    with pytest.raises(UserError, match="not a sandbox run directory"):
        rundir.open_dir(exp, "run", overwrite=True)
    assert canary.exists()


def test_an_empty_directory_is_adopted_and_a_half_made_one_counts_as_empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rundir.open_dir(empty, "run").release()
    assert (empty / rundir.MARKER).is_file()
    rundir.open_dir(empty, "run").release()  # only marker and lock: nothing to protect


def test_resume_adopts_a_run_directory_written_before_markers(tmp_path):
    old = tmp_path / "old"
    _canary(old)
    (old / "config.yaml").write_text("name: old\n")
    with pytest.raises(UserError, match=rundir.MARKER):
        rundir.open_dir(old, "run", overwrite=True)
    rundir.open_dir(old, "run", resume=True).release()
    assert (old / rundir.MARKER).is_file() and (old / "canary.txt").exists()


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        rundir.open_dir(f, "run", overwrite=True)
    assert f.read_text() == "x"


# ----------------------------------------------------------------- lock


def test_second_lock_names_the_holder(tmp_path):
    lock = rundir.DirLock.acquire(tmp_path)
    with pytest.raises(UserError) as e:
        rundir.DirLock.acquire(tmp_path)
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "\n" not in msg
    lock.release()
    rundir.DirLock.acquire(tmp_path).release()  # free again


def test_second_train_on_a_locked_run_exits_2_naming_the_other_process(tmp_path, capsys):
    runs = tmp_path / "runs"
    rundir.open_dir(runs / "busy", "run").release()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(runs / "busy")], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = _config(tmp_path, runs)
        assert main(["train", str(cfg), "--name", "busy", "--resume"]) == 2
        err = capsys.readouterr().err
        assert _one_error_line(err) and f"pid {holder.pid}" in err, err
        assert not (runs / "busy" / "config.yaml").exists()  # the loser wrote nothing
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's flock: no stale lock after kill -9
        try:
            rundir.DirLock.acquire(runs / "busy").release()
            break
        except UserError:
            assert time.time() < deadline
            time.sleep(0.1)


# ----------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_a_planted_link_and_leaves_its_target(tmp_path):
    target = _canary(tmp_path / "elsewhere")
    link = tmp_path / "table.md"
    link.symlink_to(target)
    rundir.atomic_write(link, "new table\n")
    assert not link.is_symlink() and link.read_text() == "new table\n"
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_onto_a_directory_is_one_line_error(tmp_path):
    (tmp_path / "summary.csv").mkdir()
    with pytest.raises(UserError, match="summary.csv: cannot write"):
        rundir.atomic_write(tmp_path / "summary.csv", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_real_subdir_refuses_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "plots").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        rundir.real_subdir(tmp_path / "exp", "plots")
    assert rundir.real_subdir(tmp_path / "exp", "logs").is_dir()
