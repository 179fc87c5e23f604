"""Experiment specs: a base config plus axes, expanded into validated cells.

A spec is a YAML file (read with `yaml.safe_load`, like every config):

    name: precision_ablation          # default: the file's stem
    base: ../configs/shakespeare_char.yaml   # relative to the spec file
    config: {training: {steps: 500}}  # optional, merged over the base
    axes:                             # dotted config keys -> values; grid
      precision.policy: [fp32, bf16, fp16]
      seed: [0, 1, 2]
    cells:                            # optional explicit cells, added to the grid
      - {label: naive_softmax, precision.policy: fp16, precision.naive_softmax: true, seed: 0}
    target_loss: 2.0                  # for "steps to target" (default: see report.py)
    baseline: fp32                    # the policy each row is tested against

`seed` is the replicate axis: cells that differ only in their seed form one
*variant* (one row of the table, averaged over seeds). Explicit `cells` are
crossed with the seed axis unless they set `seed` themselves. Every cell's
config is built and validated here, before anything runs, through the same
`from_dict` (and policy parser) as `sandbox train`; an error names the spec
file and the cell, then says what the config loader says.

`sandbox ablate SPEC --set KEY=VALUE` (repeatable) changes the base config
of every cell, parsed and validated like `sandbox train --set`. A key the
spec varies (an axis, a key an explicit cell sets, or a section holding one)
is refused in one line: the cells' own values would silently win over it,
or it would silently erase the axis; change the spec for that. So are
`name` and `run_root`, which the experiment sets per cell (use `--out`).

`Spec.resolved` is the spec made self-contained: its base config merged into
`config`, no `base:` left. The experiment keeps it as `spec.yaml`, so
`sandbox ablate EXP/spec.yaml --out EXP` re-runs exactly the same cells from
anywhere, whatever relative paths the original spec used; `--set` values
are merged into it, so a re-run from it needs no `--set`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.precision.policy import make_policy
from sandbox.rundir import check_name

SPEC_KEYS = ("name", "description", "base", "config", "axes", "cells", "target_loss", "baseline", "alpha")
SET_BY_EXPERIMENT = ("name", "run_root")  # per-cell values `--set` cannot change


@dataclass(frozen=True)
class Cell:
    name: str  # directory name under the experiment's cells/
    variant: str  # row label: the cell's settings without the seed
    seed: int
    settings: dict  # dotted key -> value, as written in the spec (incl. seed)
    config: config_lib.Config


@dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    cells: tuple[Cell, ...]
    target_loss: float | None
    baseline: str
    alpha: float
    resolved: dict  # the spec with its base merged in: what the experiment saves as spec.yaml
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE texts, already merged into every cell and `resolved`

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(c.variant for c in self.cells))


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "cell"


def _label(settings: dict) -> str:
    """`fp16` for a single setting, `policy=fp16 lr=0.01` for several."""
    rest = {k: v for k, v in settings.items() if k != "seed"}
    if not rest:
        return "base"
    if len(rest) == 1:
        return str(next(iter(rest.values())))
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in rest.items())


def _check_key(path: Path, key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or not all(key.split(".")):
        raise UserError(f"{path}: {where}: expected a dotted config key like 'precision.policy', got {key!r}")
    return key


def _read_base(path: Path, base: Any) -> dict:
    if base is None:
        return {}
    if not isinstance(base, str):
        raise UserError(f"{path}: base: expected a config file name, got {base!r}")
    base_path = path.parent / base
    if not base_path.exists() and Path(base).exists():  # also accept paths relative to the cwd
        base_path = Path(base)
    cfg = config_lib.load_config(base_path)  # resolves its own `base:` chain and data paths
    raw = config_lib.to_dict(cfg)
    raw.pop("name", None)
    return raw


def _settings_list(path: Path, raw: dict) -> list[tuple[str | None, dict]]:
    """(explicit label or None, settings) for every cell, seeds expanded."""
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise UserError(f"{path}: axes: expected a mapping of config keys to lists of values")
    for key, values in axes.items():
        _check_key(path, key, "axes")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: axes.{key}: expected a non-empty list of values, got {values!r}")
    seeds = axes.get("seed", [None])
    grid_keys = [k for k in axes if k != "seed"]
    out: list[tuple[str | None, dict]] = []
    explicit = raw.get("cells") or []
    if not isinstance(explicit, list):
        raise UserError(f"{path}: cells: expected a list of mappings")
    if grid_keys or not explicit:
        for combo in itertools.product(*(axes[k] for k in grid_keys)):
            out.append((None, dict(zip(grid_keys, combo))))
    for i, entry in enumerate(explicit):
        if not isinstance(entry, dict) or not entry:
            raise UserError(f"{path}: cells[{i}]: expected a mapping of config keys to values")
        entry = dict(entry)
        label = entry.pop("label", None)
        for key in entry:
            _check_key(path, key, f"cells[{i}]")
        out.append((None if label is None else str(label), entry))
    expanded = []
    for label, settings in out:
        if "seed" in settings:
            expanded.append((label, settings))
        else:
            for s in seeds:
                expanded.append((label, settings if s is None else {**settings, "seed": s}))
    return expanded


def _overlapping(a: str, b: str) -> bool:
    """Whether dotted keys a and b name the same setting, or one is a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _apply_sets(path: Path, base: dict, overrides: list[str], varied: set[str]) -> dict:
    """The base config with `--set` overrides applied; a key the spec varies is refused."""
    for text in overrides:
        key = ".".join(config_lib.parse_override(text)[0])
        if key in SET_BY_EXPERIMENT:
            raise UserError(f"--set {text!r}: {key} is set per cell by sandbox ablate (use --out to choose "
                            f"where the experiment goes)")
        clash = next((v for v in sorted(varied) if _overlapping(key, v)), None)
        if clash is not None:
            raise UserError(f"--set {text!r}: {path} varies {clash} across its cells (an axis or a cell's "
                            f"setting); --set applies to all cells, so change {clash} in the spec instead")
    return config_lib.apply_overrides(base, overrides)


def load_spec(path: str | Path, exp_dir: str | Path | None = None, overrides: list[str] = ()) -> Spec:
    """Reads and validates a spec; every cell's config is built with run_root = exp_dir/cells.

    `overrides` are `--set KEY=VALUE` texts applied to every cell (see the module docstring).
    """
    path = Path(path)
    raw = config_lib.read_yaml(path)
    for key in raw:
        if key not in SPEC_KEYS:
            raise UserError(f"{path}: unknown spec key '{key}' (valid keys: {', '.join(SPEC_KEYS)})")
    name = check_name(raw.get("name") or path.stem, f"{path}: name")  # runs/<name> must stay in runs/
    exp_dir = Path(exp_dir) if exp_dir is not None else Path("runs") / name
    inline = raw.get("config") or {}
    if not isinstance(inline, dict):
        raise UserError(f"{path}: config: expected a mapping of config keys")
    base = config_lib.deep_merge(_read_base(path, raw.get("base")), inline)
    target = raw.get("target_loss")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0):
        raise UserError(f"{path}: target_loss: expected a positive number, got {target!r}")
    alpha = raw.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise UserError(f"{path}: alpha: expected a number in (0, 1), got {alpha!r}")
    baseline = str(raw.get("baseline", "fp32"))
    settings_list = _settings_list(path, raw)
    base = _apply_sets(path, base, list(overrides), {k for _, s in settings_list for k in s})

    cells, seen = [], set()
    for label, settings in settings_list:
        variant = label or _label(settings)
        seed = settings.get("seed", base.get("seed", 0))
        cell_name = _slug(variant) + f"_s{seed}"
        if cell_name in seen:
            raise UserError(f"{path}: two cells are both named '{cell_name}' (give one a distinct label)")
        seen.add(cell_name)
        cell_raw = base
        for key, value in settings.items():
            cell_raw = config_lib.deep_merge(cell_raw, _nest(key, value))
        cell_raw = config_lib.deep_merge(cell_raw, {"name": cell_name, "run_root": str(exp_dir / "cells"),
                                                    "logging": {"progress": False}})
        try:
            cfg = config_lib.from_dict(cell_raw)
            make_policy(cfg.precision)
        except UserError as e:
            raise UserError(f"{path}: cell {cell_name}: {e}") from None
        cells.append(Cell(cell_name, variant, cfg.seed, settings, cfg))
    policies = sorted({c.config.precision.policy for c in cells})
    if "baseline" in raw and baseline not in policies:
        raise UserError(f"{path}: baseline: {baseline!r} is not the policy of any cell (policies: {', '.join(policies)})")
    resolved = {**{k: v for k, v in raw.items() if k != "base"}, "name": name, "config": base}
    return Spec(name, path, tuple(cells), None if target is None else float(target), baseline, float(alpha),
                resolved, tuple(overrides))
