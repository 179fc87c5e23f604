"""Run and experiment directories: what the sandbox may create, delete, lock and overwrite.

Everything `sandbox train` and `sandbox ablate` write lives in a directory
named by the user (`run_root/name`, `--out`). A name or path is not proof
that a directory is ours, so these rules hold for both commands:

* **Names are one path component** (`check_name`): no separator, no `.` or
  `..`, no control character, at most 200 bytes. `--name ..` or an absolute
  path can never turn `run_root/name` into some other directory.
* **A marker says "ours"**: a directory the sandbox creates gets `.sandbox-run`,
  a small JSON record `{"created_by": "sandbox", "kind": "run"|"experiment",
  "created": ...}`. `--overwrite` clears only a directory whose marker has the
  right kind, and only its contents (links inside are unlinked, never
  followed), while holding its lock. A non-empty directory without the marker
  is never touched: refused in one line. An empty directory, or one holding
  only the marker and lock (left by a start that failed), is adopted.
  Directories written before markers existed are adopted on a *resume* only
  (recognised by `config.yaml` for a run, `experiment.json` for an
  experiment): resuming adds files, it never deletes.
* **One writer per directory** (`DirLock`): `fcntl.flock` on `.sandbox-lock`
  inside it, held for the whole run or experiment. The file names the holder
  (pid, host, start time), so a second writer is refused naming it. The
  kernel drops a flock when its process dies, so a `kill -9` never leaves a
  stale lock; the file's contents are only read while someone else holds it.
* **Atomic writes** (`atomic_write`): files written for people and for later
  commands (config.yaml, table.md, summary.csv, plots, manifests) go to a
  temporary file in the same directory, then `os.replace` onto the name. A
  reader never sees half a file, and a link planted at that name is replaced,
  not followed. `real_subdir` refuses a subdirectory that is a link.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from sandbox import sharding
from sandbox.errors import UserError

MARKER = ".sandbox-run"
LOCK = ".sandbox-lock"
KINDS = ("run", "experiment")
# The file a directory written before markers existed holds, per kind: proof enough to resume it.
LEGACY_EVIDENCE = {"run": "config.yaml", "experiment": "experiment.json"}
MAX_NAME_BYTES = 200


def check_name(name: object, what: str) -> str:
    """`name` if it is one plain path component, else a UserError naming `what`."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{what}: expected a plain name (one path component), got {name!r}")
    bad = (name in (".", "..") or "/" in name or "\\" in name or (os.altsep and os.altsep in name)
           or not name.isprintable() or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES)
    if bad:
        shown = repr(name if len(name) <= 60 else name[:60] + "...")
        raise UserError(f"{what}: expected a plain name (one path component: no '/', '\\', '.' or '..', "
                        f"no control characters, at most {MAX_NAME_BYTES} bytes), got {shown}")
    return name


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------- lock


class DirLock:
    """An exclusive flock on `directory/.sandbox-lock`; release() or leave the `with` block to free it."""

    def __init__(self, directory: Path, fd: int):
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | Path) -> DirLock:
        directory = Path(directory)
        path = directory / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"{path}: cannot open the lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{directory}: in use by another sandbox process ({holder}); wait for it "
                                f"to finish or stop it") from None
            raise UserError(f"{path}: cannot lock ({e.strerror})") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without finishing must not keep its directory locked
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]}, started {str(info['started'])[:40]}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "holder unknown"


# ----------------------------------------------------------------- marker and overwrite


def read_marker(directory: Path) -> dict | None:
    """The marker's record, or None when there is none (or it is not a regular file holding a JSON object)."""
    path = Path(directory) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("created_by") == "sandbox" else None


def _write_marker(directory: Path, kind: str) -> None:
    if read_marker(directory) is None:
        atomic_write(directory / MARKER, json.dumps({"created_by": "sandbox", "kind": kind, "created": _now()}))


def _user_entries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name not in (MARKER, LOCK)]


def _clear_contents(directory: Path) -> None:
    """Removes everything but the marker and the lock; a link is unlinked, never followed."""
    for entry in _user_entries(directory):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def open_dir(directory: str | Path, kind: str, *, resume: bool = False, overwrite: bool = False) -> DirLock:
    """Creates, adopts or (with overwrite) clears `directory` as a sandbox `kind` directory, locked.

    An existing marked directory needs `resume` (continue it) or `overwrite`
    (clear it); `resume` wins when both are given. Returns the held lock.
    In a multi-process JAX run process 0 does this and the others wait for it
    and hold no lock: they write only their checkpoint shards (docs/scaling.md).
    """
    assert kind in KINDS, kind
    if not sharding.is_primary_process():
        sharding.sync_processes(f"open_dir {kind}")
        return DirLock(Path(directory), None)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a directory")
    if directory.is_dir() and _user_entries(directory):
        marker = read_marker(directory)
        legacy = resume and marker is None and (directory / LEGACY_EVIDENCE[kind]).is_file()
        if not legacy and (marker is None or marker.get("kind") != kind):
            raise UserError(f"{directory}: not a sandbox {kind} directory (no {MARKER} marker of kind '{kind}'); "
                            f"refusing to write to or delete anything in it: choose another name or directory")
        if not (resume or overwrite):
            raise UserError(f"{directory}: {kind} directory exists; pass --resume to continue it or "
                            f"--overwrite to replace it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create the {kind} directory ({e.strerror})") from None
    lock = DirLock.acquire(directory)
    try:
        if overwrite and not resume:
            _clear_contents(directory)
        _write_marker(directory, kind)
    except OSError as e:
        lock.release()
        raise UserError(f"{directory}: cannot prepare the {kind} directory ({e.strerror})") from None
    except BaseException:
        lock.release()
        raise
    sharding.sync_processes(f"open_dir {kind}")
    return lock


# ----------------------------------------------------------------- writing files


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and corpora can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Writes `data` to a temp file beside `path`, fsyncs, renames it onto `path` (a link there is replaced)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e.__class__.__name__})") from None
    return path


def real_subdir(directory: str | Path, name: str) -> Path:
    """`directory/name`, created if missing; refused when it is a link (writes would land elsewhere)."""
    path = Path(directory) / name
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link; refusing to write through it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create ({e.strerror})") from None
    if not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    return path
