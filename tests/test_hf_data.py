"""data.source=hf: local `save_to_disk` folders and local JSON/CSV/Parquet/text files; hub names refused.

The expected corpus is built here from the written records ("record\\n\\n" per record, in order), not
by the loader under test.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import datasets
import numpy as np
import pandas as pd
import pytest

from sandbox.data import make_pipeline
from sandbox.errors import UserError
from sandbox.train.loop import train

from conftest import REPO, SHAKESPEARE

PARAGRAPHS = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()][:120]


def expected_bytes(records) -> bytes:
    return "".join(r + "\n\n" for r in records).encode("utf-8")


def hf_cfg(tiny, **data):
    return tiny(overrides={"data": {"source": "hf", **data}, "training": {"steps": 3}})


def corpus_of(pipeline) -> bytes:
    tokens = np.concatenate([pipeline.train_tokens, pipeline.val_tokens])
    return bytes(tokens.astype(np.uint8))


def test_save_to_disk_folder_trains(tiny, tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"title": [f"t{i}" for i in range(len(PARAGRAPHS))],
                                "body": PARAGRAPHS}).save_to_disk(str(folder))
    cfg = hf_cfg(tiny, hf_name=str(folder), hf_field="body")
    assert corpus_of(make_pipeline(cfg)) == expected_bytes(PARAGRAPHS)
    r = train(cfg)
    assert r.status == "finished" and np.isfinite(r.summary["val_ce"])
    assert r.summary["val_bits_per_byte"] == pytest.approx(r.summary["val_bits_per_token"])


def test_save_to_disk_dataset_dict_uses_hf_split(tiny, tmp_path):
    folder = tmp_path / "dd"
    half = len(PARAGRAPHS) // 2
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": PARAGRAPHS[:half]}),
                          "other": datasets.Dataset.from_dict({"text": PARAGRAPHS[half:]})}
                         ).save_to_disk(str(folder))
    assert corpus_of(make_pipeline(hf_cfg(tiny, hf_name=str(folder), hf_split="other"))) == \
        expected_bytes(PARAGRAPHS[half:])
    with pytest.raises(UserError, match=r"data.hf_split: 'nope' .*other, train"):
        make_pipeline(hf_cfg(tiny, hf_name=str(folder), hf_split="nope"))


def write_records(path, fmt):
    frame = pd.DataFrame({"id": range(len(PARAGRAPHS)), "text": PARAGRAPHS})
    if fmt == "json":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)


@pytest.mark.parametrize("fmt, suffix", [("json", ".jsonl"), ("csv", ".csv"), ("parquet", ".parquet")])
def test_local_data_files_load_and_train(tiny, tmp_path, fmt, suffix):
    first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    write_records(first, fmt)
    write_records(second, fmt)
    cfg = hf_cfg(tiny, paths=[str(first), str(second)])  # data.hf_format: auto, from the suffix
    assert corpus_of(make_pipeline(cfg)) == expected_bytes(PARAGRAPHS * 2)
    if fmt == "parquet":  # training reads the same pipeline: once is enough
        assert train(cfg).status == "finished"


def test_local_text_file_is_one_document(tiny, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    cfg = hf_cfg(tiny, paths=[str(f)], hf_format="text")
    assert corpus_of(make_pipeline(cfg)) == expected_bytes(["\n\n".join(PARAGRAPHS)])


def test_missing_field_and_unknown_suffix_are_one_line_errors(tiny, tmp_path):
    f = tmp_path / "a.jsonl"
    write_records(f, "json")
    with pytest.raises(UserError, match=r"data.hf_field: 'body' is not a column .*\['id', 'text'\]"):
        make_pipeline(hf_cfg(tiny, paths=[str(f)], hf_field="body"))
    g = tmp_path / "a.dat"
    g.write_text("x")
    with pytest.raises(UserError, match=r"data.hf_format: cannot tell the format of .*a.dat"):
        make_pipeline(hf_cfg(tiny, paths=[str(g)]))
    with pytest.raises(UserError, match="data.paths: .*missing.csv: file not found"):
        make_pipeline(hf_cfg(tiny, paths=[str(tmp_path / "missing.csv")]))


def test_bpe_on_hf_data_files(tiny, tmp_path):
    f = tmp_path / "a.parquet"
    write_records(f, "parquet")
    cfg = tiny(overrides={"model": {"vocab_size": 300},
                          "data": {"source": "hf", "paths": [str(f)], "tokenizer": "bpe", "bpe_vocab_size": 300}})
    p = make_pipeline(cfg)
    text = p.tokenizer.decode(np.concatenate([p.train_tokens, p.val_tokens]))
    assert text.encode("utf-8") == expected_bytes(PARAGRAPHS)


def test_hub_name_is_refused_at_once_without_touching_the_network(tiny, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        make_pipeline(hf_cfg(tiny, hf_name="roneneldan/TinyStories"))
    assert time.perf_counter() - start < 5 and not attempts
    msg = str(e.value)
    assert "\n" not in msg and "does not download" in msg and "save_to_disk" in msg, msg


def test_hub_name_through_the_cli_is_one_line_and_exit_2(tmp_path):
    """Before: 26 s of retries and 22 warning lines. The time is not asserted here (a loaded machine
    takes seconds to import JAX); the test above asserts that no network call is made at all."""
    proc = subprocess.run([sys.executable, "-m", "sandbox", "train", str(REPO / "configs" / "quickstart.yaml"),
                           "--set", "data.source=hf", "--set", "data.hf_name=roneneldan/TinyStories",
                           "--set", f"run_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.hf_name" in lines[0] and "does not download" in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())  # no half-made run directory
