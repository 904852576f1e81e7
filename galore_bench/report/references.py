"""The papers' printed numbers (GaLore arXiv 2403.03507, LOMO arXiv 2306.09782), shipped as package data.

One CSV per paper table under galore_bench/report/reference/, one printed number per line with its table, row,
unit and citation, so a wheel carries them and every figure names its source. The reports read them as wide
frames: one row per paper row, one column per quantity.
"""
from __future__ import annotations

import io
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import pandas as pd

PACKAGE_FOLDER = "galore_bench/report/reference"  # how reports name the tables: never a machine's path
OVERRIDE_ENV = "GALORE_BENCH_REFERENCE"  # a folder of tables in this layout, replacing the packaged ones
NUMBER_COLUMNS = ("quantity", "value", "unit", "citation")  # the rest of a table's columns say which row
TABLES = ("lomo_table1", "lomo_table2", "galore_table2", "galore_table3", "galore_table6", "galore_table11",
          "galore_7b_totals", "successors_7b_claims")


def reference_folder() -> Traversable:
    """The packaged tables, or the folder $GALORE_BENCH_REFERENCE names (to try corrected figures)."""
    override = os.environ.get(OVERRIDE_ENV)
    return Path(override) if override else resources.files("galore_bench") / "report" / "reference"


def source_text() -> str:
    """Where the tables come from, as a report prints it: the package-relative folder unless overridden."""
    override = os.environ.get(OVERRIDE_ENV)
    return f"${OVERRIDE_ENV}={override}" if override else PACKAGE_FOLDER


def read_numbers(name: str) -> pd.DataFrame | None:
    """A table as stored, one printed number per row (value a float, the rest text); None when absent."""
    entry = reference_folder() / f"{name}.csv"
    if not entry.is_file():
        return None
    frame = pd.read_csv(io.StringIO(entry.read_text(encoding="utf-8")), comment="#", dtype=str,
                        keep_default_na=False)
    return frame.assign(value=frame["value"].astype(float))


def paper_table(name: str) -> pd.DataFrame | None:
    """One row per paper row: its key columns (table, row, method, size, ...) and one column per quantity."""
    numbers = read_numbers(name)
    if numbers is None:
        return None
    keys = [column for column in numbers.columns if column not in NUMBER_COLUMNS]
    rows: dict[tuple[str, ...], dict[str, object]] = {}
    for number in numbers.to_dict("records"):
        key = tuple(number[k] for k in keys)
        row = rows.setdefault(key, dict(zip(keys, key)))
        if number["quantity"] in row:
            raise ValueError(f"{name}.csv: {number['quantity']} given twice for {key}")
        row[number["quantity"]] = number["value"]
    return pd.DataFrame(list(rows.values()))


def load_references() -> dict[str, pd.DataFrame]:
    """Every table that is there, by name (an override folder may hold some: the others' columns drop)."""
    tables = {name: paper_table(name) for name in TABLES}
    return {name: frame for name, frame in tables.items() if frame is not None}


def provenance_line(found: list[str]) -> str:
    """The report's line naming the paper tables it compared against."""
    if not found:
        return f"paper references ({source_text()}): not found: paper columns omitted"
    return f"paper references ({source_text()}): " + ", ".join(f"{name}.csv" for name in sorted(found))
