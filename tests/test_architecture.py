"""The package layering of docs/architecture.md holds: `lint-imports` keeps every contract in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_layers_contract_is_kept():
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_contract_puts_cli_on_top_and_errors_at_the_bottom():
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = contract["layers"]
    assert contract["type"] == "layers" and contract["containers"] == ["sandbox"]
    assert layers[0] == "cli" and layers[-1] == "errors"
    documented = (REPO / "docs" / "architecture.md").read_text()
    for layer in layers:  # the picture in the docs names every layer the contract enforces
        for module in layer.replace("(", "").replace(")", "").split("|"):
            assert f"`{module.strip()}`" in documented, module
