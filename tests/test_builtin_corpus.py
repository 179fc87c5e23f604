"""Built-in corpora: shipped configs, experiments and lessons never reach outside the repository."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from sandbox.data import builtin, make_pipeline
from sandbox.errors import UserError
from tests.conftest import REPO

# sha256 of ../shared/data/tinyshakespeare.txt, the corpus the issue asks to ship unchanged
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_builtin_tinyshakespeare_is_the_shared_corpus_byte_for_byte():
    path = builtin.resolve("builtin:tinyshakespeare")
    assert path.is_file() and path.stat().st_size == 1_115_394
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256


def test_unknown_builtin_is_one_line_naming_the_choices():
    with pytest.raises(UserError, match=r"builtin:nope: unknown built-in corpus \(choose from: builtin:tinyshakespeare\)"):
        builtin.resolve("builtin:nope")


def test_a_plain_path_is_left_as_the_path_it_names():
    assert builtin.resolve("data/x.txt") == Path("data/x.txt")


def test_text_source_trains_on_the_builtin_corpus(tiny):
    cfg = tiny(overrides={"data": {"source": "text", "paths": ["builtin:tinyshakespeare"]}})
    p = make_pipeline(cfg)
    assert p.info["train_tokens"] + p.info["val_tokens"] == 1_115_394


def _yaml_paths(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "paths" and isinstance(v, list):
                yield from v
            else:
                yield from _yaml_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_paths(v)


SHIPPED_YAML = sorted(p for d in ("configs", "experiments") for p in (REPO / d).rglob("*.yaml")
                      if "results" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_yaml_names_no_file_outside_the_repository(path):
    text = path.read_text()
    assert "shared/data" not in text
    for p in _yaml_paths(yaml.safe_load(text) or {}):
        if builtin.is_builtin(p):
            builtin.resolve(p)
            continue
        target = (path.parent / p).resolve()
        assert target.is_relative_to(REPO) and target.exists(), f"{path}: {p}"
