"""Lesson notebooks: generated from the lesson modules, and they run top to bottom."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from sandbox.cli import main
from sandbox.teaching import lessons
from sandbox.teaching.notebooks import lesson_notebook


def _execute(nb, cwd) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.mark.parametrize("name", lessons.LESSON_MODULES)
def test_notebook_is_a_view_of_the_lesson_module(name):
    module = lessons.get(name)
    nb = lesson_notebook(name)
    nbformat.validate(nb)
    text = "\n".join(c.source for c in nb.cells)
    assert module.TITLE in text and module.NARRATIVE in text
    assert f'get("{name}")' in text and "lesson.run(OUT, quick=QUICK)" in text


def test_cli_writes_every_lesson_notebook(tmp_path, capsys):
    assert main(["lesson", "notebook", "--out", str(tmp_path)]) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.ipynb")) == sorted(lessons.LESSON_MODULES)


def test_kl_direction_notebook_runs_top_to_bottom(tmp_path):
    nb = _execute(lesson_notebook("kl_direction", quick=True), tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot, inline
    assert any("PASS" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert (tmp_path / "lessons" / "kl_direction" / "kl_direction.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", lessons.LESSON_MODULES)
def test_every_notebook_runs_top_to_bottom(name, tmp_path):
    nb = _execute(lesson_notebook(name, quick=True), tmp_path)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
