"""Bad input is refused with one line and exit 2, and leaves nothing behind.

Property-based: hypothesis mutates a valid tiny config (values, types, key
names, whole sections) and throws random `--set` strings and raw bytes at
`sandbox train`. Training itself is stubbed out after validation (the policy
is still built, since `precision.policy` is parsed there): what is under test
is that every input either passes validation or is refused cleanly, before
any run directory exists. Data-file failures run the real data pipeline.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import config as config_lib
from sandbox.cli import main
from sandbox.data import make_pipeline
from sandbox.errors import UserError

BASE = {
    "name": "fuzz",
    "seed": 0,
    "model": {"vocab_size": 256, "context": 16, "n_layer": 1, "n_head": 2, "d_model": 32, "positions": "learned"},
    "data": {"source": "synthetic", "val_fraction": 0.1, "synthetic": {"alphabet": 8, "order": 1}},
    "optimizer": {"lr": 1e-3, "warmup_steps": 2, "accum_steps": 1, "b2": 0.99},
    "training": {"steps": 4, "batch_size": 4, "eval_every": 0, "log_every": 2},
    "checkpoint": {"every": 0, "keep": 2},
    "precision": {"policy": "fp32", "loss_scale": {"mode": "auto", "init_scale": 1024.0}},
    "forensics": {"nan_policy": "capture"},
    "logging": {"progress": False, "tensorboard": False},
}
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _paths(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


PATHS = _paths(BASE)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["fp16", "bf16", "params=float32,compute=int8", "e4m3", "rotary", "text",
                                     "-1", "1e400", "0x10", "", "..", "a/b"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))
KEYS = st.text(min_size=1, max_size=10)


def _copy(d):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _parent(d, path):
    for k in path[:-1]:
        d = d[k]
    return d


mutation = st.one_of(
    st.tuples(st.just("value"), st.sampled_from(PATHS), VALUES),
    st.tuples(st.just("rename"), st.sampled_from(PATHS), KEYS),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
)


def _apply(raw: dict, op) -> dict:
    kind, path, arg = op
    raw = _copy(raw)
    parent = _parent(raw, path)
    if path[-1] not in parent:  # an earlier mutation removed it
        return raw
    if kind == "value":
        parent[path[-1]] = arg
    elif kind == "rename":
        parent[arg] = parent.pop(path[-1])
    else:
        del parent[path[-1]]
    return raw


@pytest.fixture
def stub_train(monkeypatch):
    """Stands in for training once the config validated: builds the policy, records the call."""
    calls = []

    def fake_train(cfg, hooks=(), **kwargs):
        from sandbox.precision.policy import make_policy

        make_policy(cfg.precision)
        calls.append(cfg)
        return SimpleNamespace(run_dir=cfg.run_dir, status="finished", bundle=None,
                               summary={"status": "finished", "steps": 0})

    monkeypatch.setattr("sandbox.train.loop.train", fake_train)
    return calls


def _check(code, err, out_root, calls_before, calls):
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and len(err) > 10, err
        assert len(calls) == calls_before  # refused before training
    else:
        assert len(calls) == calls_before + 1
    assert not out_root.exists()  # validation never creates the run directory


@SETTINGS
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_yaml_configs_train_or_exit_2_with_one_line(tmp_path_factory, capsys, stub_train, ops):
    tmp = tmp_path_factory.mktemp("fuzz")
    raw = BASE
    for op in ops:
        raw = _apply(raw, op)
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    n = len(stub_train)
    code = main(["train", str(path), "--set", f"run_root={tmp / 'runs'}"])
    err = capsys.readouterr().err
    _check(code, err, tmp / "runs", n, stub_train)
    kind, key_path, arg = ops[-1]
    if code == 2 and len(ops) == 1 and kind == "rename":
        assert "unknown config key" in err or arg in err, err
    if code == 2 and len(ops) == 1 and kind == "value":
        # names the key, or (a consistency error) a key it conflicts with
        assert key_path[-1] in err or "model." in err or "data." in err or "optimizer." in err, err


@SETTINGS
@given(sets=st.lists(st.one_of(st.text(max_size=30),
                               st.builds(lambda p, v: ".".join(p) + "=" + v,
                                         st.sampled_from(PATHS), st.text(max_size=12))), min_size=1, max_size=3))
def test_random_set_overrides_train_or_exit_2(tmp_path_factory, capsys, stub_train, sets):
    tmp = tmp_path_factory.mktemp("sets")
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    argv = ["train", str(path)]
    for s in sets:
        argv += ["--set", s]
    n = len(stub_train)
    code = main(argv + ["--set", f"run_root={tmp / 'runs'}"])
    _check(code, capsys.readouterr().err, tmp / "runs", n, stub_train)


@SETTINGS
@given(blob=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")),
                      st.sampled_from([b"\xff\xfe\x00bin", b"model: [1, 2\n", b"- a\n", b"a: b: c",
                                       b"name: !!python/object/apply:os.system ['touch PWNED']\n",
                                       b"!!binary AAAA", b"\x00\x00", b"model: {n_layer: *x}"])))
def test_random_bytes_as_config_file(tmp_path_factory, capsys, stub_train, blob):
    tmp = tmp_path_factory.mktemp("bytes")
    path = tmp / "c.yaml"
    path.write_bytes(blob)
    n = len(stub_train)
    code = main(["train", str(path), "--set", f"run_root={tmp / 'runs'}"])
    _check(code, capsys.readouterr().err, tmp / "runs", n, stub_train)
    assert not (tmp / "PWNED").exists() and not os.path.exists("PWNED")


# ----------------------------------------------------------------- data files


def _text_cfg(tmp_path, paths, context=16):
    raw = config_lib.deep_merge(BASE, {"data": {"source": "text", "paths": [str(p) for p in paths],
                                                "cache_dir": str(tmp_path / "cache")},
                                       "model": {"context": context}, "run_root": str(tmp_path / "runs")})
    return config_lib.from_dict(raw)


def _pipeline_error(tmp_path, paths, context=16) -> str:
    with pytest.raises(UserError) as e:
        make_pipeline(_text_cfg(tmp_path, paths, context))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_empty_directory_and_short_corpora_are_refused(tmp_path):
    assert "file not found" in _pipeline_error(tmp_path, [tmp_path / "nope.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert "empty.txt: file is empty" in _pipeline_error(tmp_path, [empty])
    assert "is a directory" in _pipeline_error(tmp_path, [tmp_path])
    short = tmp_path / "short.txt"
    short.write_text("hello world, but short\n")
    msg = _pipeline_error(tmp_path, [short], context=16)
    assert "too short for model.context=16" in msg or "shorter than" in msg, msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_is_refused(tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("x" * 1000)
    f.chmod(0)
    try:
        assert "not readable" in _pipeline_error(tmp_path, [f])
    finally:
        f.chmod(0o600)


def test_binary_and_non_utf8_data_is_fine_for_the_byte_tokenizer(tmp_path):
    blob = bytes(range(256)) * 8 + b"\xff\xfe\xc3\x28" * 50  # invalid UTF-8 sequences
    f = tmp_path / "data.bin"
    f.write_bytes(blob)
    pipe = make_pipeline(_text_cfg(tmp_path, [f]))
    assert pipe.info["train_tokens"] + pipe.info["val_tokens"] == len(blob)
    batch = pipe.train_batch(0)
    assert batch.inputs.shape == (4, 16) and int(batch.inputs.max()) <= 255


def test_cli_data_error_is_one_line_and_creates_no_run_dir(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    short = tmp_path / "short.txt"
    short.write_text("tiny\n")
    raw = config_lib.deep_merge(BASE, {"data": {"source": "text", "paths": [str(short)],
                                                "cache_dir": str(tmp_path / "cache")}})
    cfg.write_text(yaml.safe_dump(raw))
    code = main(["train", str(cfg), "--set", f"run_root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "too short for model.context" in err, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------- disk and paths


def test_unwritable_run_root_fails_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes through permissions; /proc refuses even root
        ro = "/proc/self/sandbox-runs"
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(BASE))
        code = main(["train", str(cfg), "--set", f"run_root={ro}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "cannot" in err and "the run directory" in err, err
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_run_root_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    code = main(["train", str(cfg), "--set", f"run_root={blocker}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot" in err and "the run directory" in err, err
    assert blocker.read_text() == "not a directory"


def test_sample_refuses_bad_run_directories(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.yaml").write_bytes(b"model: {n_layer: zero}\n\xff")
    cases = {"nope": "not a run directory", "empty": "no config.yaml", "cfgonly": "no checkpoint found",
             "badcfg": "config.yaml"}
    for name, expected in cases.items():
        code = main(["sample", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expected in err, (name, err)


# ----------------------------------------------------------------- issue 14.10: a path is a path


CORPUS = ("the quick brown fox jumps over the lazy dog. " * 20).encode()


def _tokens(pipe):
    return np.concatenate([pipe.train_tokens, pipe.val_tokens]) if pipe.val_tokens is not pipe.train_tokens \
        else np.asarray(pipe.train_tokens)


def test_bracketed_path_reads_exactly_that_file_not_a_glob_match(tmp_path):
    (tmp_path / "corpus1.txt").write_bytes(b"WRONG FILE " * 200)
    exact = tmp_path / "corpus[1].txt"
    exact.write_bytes(CORPUS)
    pipe = make_pipeline(_text_cfg(tmp_path, [exact]))
    assert bytes(_tokens(pipe).astype(np.uint8)) == CORPUS


def test_bracketed_path_without_the_file_is_not_found_even_if_the_glob_matches(tmp_path):
    (tmp_path / "corpus1.txt").write_bytes(CORPUS)
    assert "file not found" in _pipeline_error(tmp_path, [tmp_path / "corpus[1].txt"])


@pytest.mark.parametrize("name", ["a::b.txt", "s3:x.txt", "*.txt", "x?.txt", os.fsdecode(b"caf\xe9.txt")])
def test_odd_file_names_are_read_as_plain_files(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(CORPUS)
    pipe = make_pipeline(_text_cfg(tmp_path, [f]))
    assert bytes(_tokens(pipe).astype(np.uint8)) == CORPUS


def test_odd_file_names_train_or_refuse_through_the_cli(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9::[1].txt"
    open(name, "wb").write(CORPUS)
    cfg = tmp_path / "c.yaml"
    raw = config_lib.deep_merge(BASE, {"data": {"source": "text", "paths": [str(tmp_path / "nope[1].txt")],
                                                "cache_dir": str(tmp_path / "cache")}})
    cfg.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "sandbox", "train", str(cfg), "--set", f"run_root={tmp_path / 'r'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope[1].txt: file not found" in out.stderr, \
        out.stderr[-2000:]
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------- issue 14.13: the token cache is input too


def _cache_file(tmp_path):
    (npy,) = (tmp_path / "cache").glob("tokens-*.npy")
    return npy


def _cached_pipeline(tmp_path):
    f = tmp_path / "corpus.txt"
    if not f.exists():
        f.write_bytes(CORPUS)
    return make_pipeline(_text_cfg(tmp_path, [f]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "out_of_vocab", "pickle", "garbage", "missing_sum"])
def test_damaged_token_cache_is_detected_and_rebuilt(tmp_path, capsys, damage):
    _cached_pipeline(tmp_path)
    npy = _cache_file(tmp_path)
    raw = bytearray(npy.read_bytes())
    if damage == "truncate":
        npy.write_bytes(bytes(raw[: len(raw) - 100]))
    elif damage == "flip":
        raw[-10] ^= 0x20
        npy.write_bytes(bytes(raw))
    elif damage == "out_of_vocab":  # a consistent cache (checksum rewritten) holding ids >= 256
        np.save(npy, np.full(len(CORPUS), 300, np.uint16), allow_pickle=False)
        _rewrite_checksum(npy)
    elif damage == "pickle":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        _rewrite_checksum(npy)
    elif damage == "garbage":
        npy.write_bytes(b"\x93NUMPY garbage")
    else:
        for side in npy.parent.glob(npy.name + ".*"):
            side.unlink()
    pipe = _cached_pipeline(tmp_path)
    assert bytes(_tokens(pipe).astype(np.uint8)) == CORPUS
    err = capsys.readouterr().err
    assert "token cache" in err and "rebuilt" in err and err.count("\n") == 1, err


def test_intact_token_cache_is_reused(tmp_path, capsys):
    _cached_pipeline(tmp_path)
    npy = _cache_file(tmp_path)
    before = npy.stat().st_mtime_ns
    _cached_pipeline(tmp_path)
    assert npy.stat().st_mtime_ns == before and capsys.readouterr().err == ""


def _rewrite_checksum(npy):
    (npy.parent / (npy.name + ".sha256")).write_text(hashlib.sha256(npy.read_bytes()).hexdigest())
