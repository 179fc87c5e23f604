"""Lessons as Jupyter notebooks, generated from the lesson modules themselves.

A notebook is a view of a lesson, never a copy of it: its cells import the
lesson module and call the same `run(out_dir, quick=...)` the CLI and the
tests call, so a notebook cannot drift from `sandbox lesson run`. The text
cells come from the module (`TITLE`, `NARRATIVE`, and the design notes of
its docstring); the code cells show the verdict table and the plots inline.
A teacher generates them with `sandbox lesson notebook [NAME ...] --out DIR`
and runs one top to bottom (Run All); `QUICK = True` in the first code cell
shortens the runs as the tests do.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sandbox.teaching.lessons import get

SETUP = """\
QUICK = {quick}  # True: shortened runs (about a minute); False: the full lesson
OUT = "lessons/{name}"  # where runs and plots are written

from sandbox.teaching.lessons import get
lesson = get("{name}")"""

RUN = "result = lesson.run(OUT, quick=QUICK)"

CHECKS = """\
from IPython.display import Markdown, display

rows = ["| expected | observed | verdict |", "|---|---|---|"]
rows += [f"| {c.expected} | {c.observed} | {'PASS' if c.passed else 'FAIL'} |" for c in result.checks]
display(Markdown("\\n".join(rows)))
assert result.passed, "a check of this lesson did not hold"
"""

PLOTS = """\
from IPython.display import Image

for plot in result.plots:
    display(Image(filename=str(plot)))"""


def lesson_notebook(name: str, quick: bool = False) -> nbformat.NotebookNode:
    """The notebook of lesson `name` (a UserError for an unknown name)."""
    module = get(name)
    design = inspect.getdoc(module) or ""
    cells = [
        new_markdown_cell(f"# {module.TITLE}\n\n{module.NARRATIVE}"),
        new_markdown_cell(f"## How this lesson works\n\n{design}"),
        new_code_cell(SETUP.format(quick=quick, name=module.NAME)),
        new_markdown_cell("## Run it\n\nTrains (or computes) and checks the lesson's expectation "
                          "on the numbers it has just produced."),
        new_code_cell(RUN),
        new_markdown_cell("## Expected and observed"),
        new_code_cell(CHECKS),
        new_markdown_cell("## Plots"),
        new_code_cell(PLOTS),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def write_notebook(name: str, out_dir: Path, quick: bool = False) -> Path:
    path = Path(out_dir) / f"{get(name).NAME}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(lesson_notebook(name, quick), path)
    return path
