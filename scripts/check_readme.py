"""Run every command the README shows, in order, as a new user would, so the README cannot rot.

    python scripts/check_readme.py            # tour commands, training shortened to --steps
    python scripts/check_readme.py --list     # only print the commands it would run

The commands are taken from the README's ```bash blocks. The first two blocks
are the set-up commands (install + main job, install + tests): they are
checked by CI itself, so here the main job is only re-run (shortened) to put
the working directory in the state the tour starts from. Every other line is
run as written in a fresh copy of the repository, with two changes that keep
it short and say nothing about correctness: `sandbox train configs/...`
gets `--set training.steps=N` (the experiments' own runs are short
already), and a command that serves forever
(`tensorboard`) passes once it says it is serving; a line whose comment says it
fails (on purpose) must exit 3, the code of a run stopped on non-finite values. A table of command, exit
status and seconds is printed; the exit status is the number of failures.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVERS = {"tensorboard": "TensorBoard"}  # command -> text it prints once it serves


def bash_blocks(readme: str) -> list[list[str]]:
    """The lines of each ```bash block (blank lines dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    return [[line for line in b.splitlines() if line.strip()] for b in blocks]


def argv_of(line: str) -> list[str]:
    """The command's words, its trailing `# comment` removed."""
    return shlex.split(line, comments=True)


def tour(readme: str) -> tuple[list[str], list[list[str]]]:
    """(the main set-up job, the tour commands in order)."""
    blocks = bash_blocks(readme)
    setup = argv_of(blocks[0][0].split("&&")[-1])
    return setup, [argv_of(line) for block in blocks[2:] for line in block]


def expected_exit(readme: str, argv: list[str]) -> int:
    """0, or 3 (a run stopped on non-finite values) for a line whose comment says it fails on purpose."""
    for block in bash_blocks(readme):
        for line in block:
            if argv_of(line) == argv and "#" in line and "fails" in line.split("#", 1)[1]:
                return 3
    return 0


def shortened(argv: list[str], steps: int) -> list[str]:
    """Runs of configs/ are cut to `steps`; experiments (failure recipes, smoke ablations) are short already."""
    if argv[:2] == ["sandbox", "train"] and argv[2].startswith("configs/"):
        return argv + ["--set", f"training.steps={steps}"]
    return argv


def run_server(argv, cwd, env, marker: str, timeout: float) -> int:
    """0 once the server prints `marker` (it is then stopped), 1 if it exits or times out first."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fd, seen, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    os.set_blocking(fd, False)
    while time.monotonic() < deadline and marker.encode() not in seen:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            seen += chunk
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    return 0 if marker.encode() in seen else 1


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps of each train/ablate command")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--workdir", help="run here instead of a temporary copy of the repository")
    args = ap.parse_args(argv)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup, commands = tour(readme)
    commands = [setup + ["--overwrite"] if "--overwrite" not in setup else setup] + commands
    if args.list:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
        cwd = Path(args.workdir or tmp)
        if not args.workdir:
            copy_repo(cwd)
        failures, rows = 0, []
        for argv in commands:
            t0 = time.perf_counter()
            if argv[0] in SERVERS:
                rc = run_server(argv, cwd, env, SERVERS[argv[0]], timeout=60)
                out = ""
            else:
                p = subprocess.run(shortened(argv, args.steps), cwd=cwd, env=env, capture_output=True, text=True)
                rc, out = p.returncode, (p.stdout + p.stderr)
            bad = rc != expected_exit(readme, argv)
            failures += bad
            rows.append((shlex.join(argv), rc, time.perf_counter() - t0))
            if bad:
                print(f"FAILED ({rc}): {shlex.join(argv)}\n{out[-2000:]}", file=sys.stderr)
        width = max(len(r[0]) for r in rows)
        print(f"{'command':<{width}}  rc  seconds")
        for cmd, rc, dt in rows:
            print(f"{cmd:<{width}}  {rc:>2}  {dt:7.1f}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
