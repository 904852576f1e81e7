"""How a report table is written as text: the cell text every format shares, markdown (escaped, never HTML),
CSV cells a spreadsheet cannot run as formulas, and the console's rich table."""
from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd
from rich.table import Table
from rich.text import Text


def cell_text(value: Any) -> str:
    """How a table prints a value: '-' for missing, 2 decimals (3 digits when small), yes/NO for booleans."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):  # a small model's 0.0047 GiB keeps 3 digits rather than printing 0.00
        return f"{value:.3g}" if math.isinf(value) or 0.0005 <= abs(value) < 0.05 else f"{value:.2f}"
    return ("yes" if value else "NO") if isinstance(value, bool) else str(value)


def md_text(text: str) -> str:
    """Text from a record as markdown shows it, never as HTML: '<' and '&' escaped (no tag or entity can
    start without them; a lone '>' stays, as in our own '>5%' flags)."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table; numeric columns right-aligned, 2 decimals (no `tabulate` dependency)."""
    numeric = [pd.api.types.is_float_dtype(df[c]) or pd.api.types.is_integer_dtype(df[c]) for c in df.columns]
    lines = ["| " + " | ".join(df.columns) + " |", "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(md_text(cell_text(v)).replace("|", "\\|") for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula
OUR_DASH = re.compile(r"-( \([0-9.]+ [A-Za-z]+\))?")  # '-' and '- (0.35 GB)': our 'not run' cells, no payload


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """The table with each text cell that a spreadsheet would run as a formula ('=HYPERLINK(...)', a label
    '@cmd') prefixed with "'"; numbers, text that reads as a number ('-1.5') and OUR_DASH stay as they are."""
    def safe(value: Any) -> Any:
        if not isinstance(value, str) or not value.startswith(FORMULA_STARTS) or OUR_DASH.fullmatch(value):
            return value
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value

    return df.apply(lambda column: column if pd.api.types.is_numeric_dtype(column) else column.map(safe))


def rich_table(title: str, df: pd.DataFrame) -> Table:
    """The console view of a table, with the same cell text as the markdown."""
    table = Table(title=title, title_justify="left")
    for column in df.columns:
        table.add_column(column, justify="right" if pd.api.types.is_numeric_dtype(df[column]) else "left",
                         overflow="fold", max_width=48 if column == "cause" else None)
    for row in df.itertuples(index=False):
        table.add_row(*(Text(cell_text(v)) for v in row))  # Text: a run label is never read as markup
    return table
