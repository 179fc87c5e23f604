"""Teaching explorers: number formats, softmax stability, numeric demos.

Each explorer is a pure function returning numbers (tests check those) plus a
renderer that prints them with `print_table`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text  # plain Text: "E[x^2]" is data, not rich markup


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[str]], notes: Iterable[str] = ()) -> None:
    """Print a table and the explanation lines under it.

    Piped output and tests get a console wide enough that no cell is wrapped
    or cut (rich would otherwise assume 80 columns); terminals keep their own
    width.
    """

    console = Console()
    if not console.is_terminal:
        console = Console(width=400, soft_wrap=True)
    table = Table(title=Text(title), title_justify="left")
    for header in headers:
        table.add_column(Text(header), overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    for line in notes:
        console.print(line, highlight=False, markup=False)
