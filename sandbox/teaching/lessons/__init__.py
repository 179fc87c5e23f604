"""Lessons: a narrative, a few runs, and an expectation checked on the runs' own numbers.

Design. A lesson is a module here with `NAME`, `TITLE`, `NARRATIVE` (printed
before it runs) and `run(out_dir, quick=False) -> LessonResult`. The result
holds `Check`s, each an (expected, observed, passed) triple: "expected" is
the claim in words with its threshold, "observed" the measured figure, so a
teacher sees both and a test asserts `passed`. Nothing is compared with a
stored golden number: every verdict is computed from metrics the lesson has
just produced (metrics.jsonl and summary.json of real training runs, or the
arrays of a small direct computation).

Lessons that train read their runs from YAML files in experiments/lessons/
(one file per run, so a teacher can rerun any of them with `sandbox train`),
with overrides that put the run under the lesson's output folder and switch
the progress bar off. `quick=True` shortens runs for the tests; thresholds
are chosen so that the verdict holds in both modes.

Plots are written with matplotlib's Agg backend (no display needed) as PNG, with
an SVG copy beside each for print; every axes has a title (`save_figure` checks).
"""

from __future__ import annotations

import importlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.errors import UserError
from sandbox.rundir import atomic_write

REPO = Path(__file__).resolve().parents[3]
EXPERIMENTS = REPO / "experiments" / "lessons"

# Lesson modules, in teaching order.
LESSON_MODULES = (
    "fp16_underflow",
    "bf16_master_weights",
    "naive_softmax",
    "fp8_delayed_scaling",
    "kl_direction",
    "sampling_entropy",
    "tokenizer_perplexity",
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
    """Trains experiments/lessons/<yaml_name>.yaml with its run under out_dir/runs."""
    from sandbox.config import load_config
    from sandbox.train.loop import train

    sets = [f"run_root={Path(out_dir) / 'runs'}", "logging.progress=false", "logging.tensorboard=false",
            *overrides]
    cfg = load_config(EXPERIMENTS / f"{yaml_name}.yaml", sets)
    return train(cfg, overwrite=True, quiet=True)


def train_rows(run_dir: Path) -> list[dict]:
    """The run's logged train rows (metrics.jsonl), in step order."""
    from sandbox.logger import read_metrics

    return [r for r in read_metrics(run_dir) if r.get("split", "train") == "train" and "loss" in r]


def as_float(v) -> float:
    """A metrics.jsonl value as a float (non-finite numbers are written as strings such as "NaN")."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def new_figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> Path:
    """Writes `path` (PNG) and the same figure as SVG beside it; returns the PNG's path.

    Every axes must have a title (a teacher projects these plots): an untitled
    one is a ValueError and nothing is written.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    untitled = [i for i, ax in enumerate(fig.axes, 1) if not ax.get_title().strip()]
    if untitled:
        plt.close(fig)
        raise ValueError(f"{path.name}: axes {untitled[0]} of {len(fig.axes)} has no title")
    path.parent.mkdir(parents=True, exist_ok=True)
    for fmt, target in (("png", path), ("svg", path.with_suffix(".svg"))):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=100, metadata={"Date": None} if fmt == "svg" else None)
        atomic_write(target, buf.getvalue())
    plt.close(fig)
    return path


def plot_runs(run_dirs: dict, metric: str, metric_label: str, path: Path, log_loss: bool = False) -> Path:
    """Two panels over training steps, one line per run: `metric`, and the train loss."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax_m, ax_loss) = new_figure(2)
    for name, run_dir in run_dirs.items():
        rows = train_rows(run_dir)
        steps = [r["step"] for r in rows]
        ax_m.plot(steps, [r[metric] for r in rows], marker="o", ms=3, label=name)
        (ax_loss.semilogy if log_loss else ax_loss.plot)(steps, [r["loss"] for r in rows], marker="o", ms=3,
                                                          label=name)
    ax_m.set_ylabel(metric_label)
    ax_m.set_title(f"{metric_label} per step")
    ax_loss.set_ylabel("train loss (nats)")
    ax_loss.set_title("train loss per step" + (" (log scale)" if log_loss else ""))
    for ax in (ax_m, ax_loss):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return save_figure(fig, path)
