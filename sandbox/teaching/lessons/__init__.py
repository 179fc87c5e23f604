"""Lessons: a narrative, a few runs, and an expectation checked on the runs' own numbers.

Design. A lesson is a module here with `NAME`, `TITLE`, `NARRATIVE` (printed
before it runs) and `run(out_dir, quick=False) -> LessonResult`. The result
holds `Check`s, each an (expected, observed, passed) triple: "expected" is
the claim in words with its threshold, "observed" the measured figure, so a
teacher sees both and a test asserts `passed`. Nothing is compared with a
stored golden number: every verdict is computed from metrics the lesson has
just produced (metrics.jsonl and summary.json of real training runs, or the
arrays of a small direct computation).

Lessons that train read their runs from YAML files in configs/ beside this
module, shipped as package data (found through `importlib.resources`, so an
installed wheel works as well as a checkout; one file per run, so a teacher
can rerun any of them with `sandbox train`),
with overrides that put the run under the lesson's output folder and switch
the progress bar off. `quick=True` shortens runs for the tests; thresholds
are chosen so that the verdict holds in both modes.

Plots are written with matplotlib's Agg backend (no display needed) as PNG, with
an SVG copy beside each for print; every axes has a title (`save_figure` checks).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sandbox import plotting
from sandbox.config import load_config
from sandbox.errors import UserError
from sandbox.forensics.bundle import save_bundle
from sandbox.logger import read_metrics
from sandbox.train.loop import train

CONFIGS = resources.files(__name__) / "configs"  # the lessons' run configs (package data)

# Lesson modules, in teaching order.
LESSON_MODULES = (
    "fp16_underflow",
    "bf16_master_weights",
    "bf16_remedies",
    "naive_softmax",
    "fp8_delayed_scaling",
    "kl_direction",
    "sampling_entropy",
    "tokenizer_perplexity",
    "attention_logit_growth",
)


@dataclass(frozen=True)
class Check:
    expected: str  # the claim, with its threshold
    observed: str  # the measured figure(s)
    passed: bool


@dataclass
class LessonResult:
    name: str
    checks: list[Check] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    runs: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, expected: str, observed: str, passed) -> None:
        self.checks.append(Check(expected, observed, bool(passed)))


def get(name: str):
    """The lesson module called `name`, or a one-line UserError listing the lessons."""
    key = name.replace("-", "_")
    if key not in LESSON_MODULES:
        raise UserError(f"unknown lesson {name!r}; choose from {', '.join(LESSON_MODULES)}")
    return importlib.import_module(f"{__name__}.{key}")


def all_lessons() -> list:
    return [get(n) for n in LESSON_MODULES]


def train_lesson_run(yaml_name: str, out_dir: Path, overrides: list[str] = ()):
    """Trains configs/<yaml_name>.yaml (beside this module) with its run under out_dir/runs."""
    sets = [f"run_root={Path(out_dir) / 'runs'}", "logging.progress=false", "logging.tensorboard=false",
            *overrides]
    cfg = load_config(Path(str(CONFIGS / f"{yaml_name}.yaml")), sets)
    return train(cfg, overwrite=True, quiet=True, capture=save_bundle)


def train_lesson_runs(res: LessonResult, names, out_dir: Path, overrides: list[str] = ()) -> dict:
    """Trains each of `names` (`train_lesson_run`) and records their run directories in `res`: {name: RunResult}."""
    results = {name: train_lesson_run(name, out_dir, overrides) for name in names}
    res.runs += [r.run_dir for r in results.values()]
    return results


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, the title every lesson plot must have, and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()


def train_rows(run_dir: Path) -> list[dict]:
    """The run's logged train rows (metrics.jsonl), in step order."""
    return [r for r in read_metrics(run_dir) if r.get("split", "train") == "train" and "loss" in r]


def new_figure(ncols: int = 1):
    """(figure, list of `ncols` axes side by side)."""
    fig, axes = plotting.new_figure(1, ncols, (5.5 * ncols, 4))
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> Path:
    """Writes `path` (PNG) and the same figure as SVG beside it; returns the PNG's path.

    Every axes must have a title (a teacher projects these plots): an untitled
    one is a ValueError and nothing is written.
    """
    path = Path(path)
    untitled = [i for i, ax in enumerate(fig.axes, 1) if not ax.get_title().strip()]
    if untitled:
        plotting.pyplot().close(fig)
        raise ValueError(f"{path.name}: axes {untitled[0]} of {len(fig.axes)} has no title")
    path.parent.mkdir(parents=True, exist_ok=True)
    return plotting.write_figure(fig, path, ("png", "svg"), dpi=100)[0]


def plot_runs(run_dirs: dict, metric: str, metric_label: str, path: Path, log_loss: bool = False) -> Path:
    """Two panels over training steps, one line per run: `metric`, and the train loss."""
    fig, (ax_m, ax_loss) = new_figure(2)
    for name, run_dir in run_dirs.items():
        rows = train_rows(run_dir)
        steps = [r["step"] for r in rows]
        ax_m.plot(steps, [r[metric] for r in rows], marker="o", ms=3, label=name)
        (ax_loss.semilogy if log_loss else ax_loss.plot)(steps, [r["loss"] for r in rows], marker="o", ms=3,
                                                          label=name)
    label_axes(ax_m, "step", metric_label, f"{metric_label} per step")
    label_axes(ax_loss, "step", "train loss (nats)", "train loss per step" + (" (log scale)" if log_loss else ""))
    for ax in (ax_m, ax_loss):
        plotting.integer_ticks(ax.xaxis)
    return save_figure(fig, path)
