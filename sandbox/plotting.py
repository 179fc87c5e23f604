"""Figures written to files: the one matplotlib set-up that ablation reports and lessons share.

Headless and reproducible: the Agg backend (no display needed), a
constrained layout, and SVG files without a creation date, so the same data
gives the same bytes. Files go through `rundir.atomic_write`, so a reader
never sees half a plot.

matplotlib is imported on first use (`pyplot()`), the one deliberate lazy
import here: it costs about 0.4 s, which every `sandbox` command would pay
at start-up, and a library user's own backend choice is not overridden by
merely importing sandbox.
"""

from __future__ import annotations

import io
from pathlib import Path

from sandbox.rundir import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(nrows: int, ncols: int, size: tuple[float, float], **kw):
    """(figure, 2-d array of axes), constrained layout."""
    return pyplot().subplots(nrows, ncols, figsize=size, layout="constrained", squeeze=False, **kw)


def render(fig, fmt: str, dpi: int) -> bytes:
    buf = io.BytesIO()
    # No creation date in the SVG: the same data gives the same file.
    fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def integer_ticks(axis) -> None:
    """Whole-number ticks only (steps, counts)."""
    axis.set_major_locator(pyplot().MaxNLocator(integer=True))


def write_figure(fig, path: Path, formats: tuple[str, ...], dpi: int) -> list[Path]:
    """Writes `fig` as path.with_suffix(.FMT) for each format and closes it; returns the paths."""
    try:
        return [atomic_write(Path(path).with_suffix(f".{fmt}"), render(fig, fmt, dpi)) for fmt in formats]
    finally:
        pyplot().close(fig)
