"""One static HTML page for a whole report: opens from disk, offline, with no server and no JavaScript.

Charts are inlined as base64 PNG data URIs and every piece of text goes through html.escape, so a run label
such as `<script>` shows up as text. This module only lays out what report.py has already formatted.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2.5em; }
h3 { font-size: 1.05em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fff4e5; } .note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; } .failed { color: #b00020; }
code { background: #f6f6f6; padding: 0 3px; }
"""


@dataclass(frozen=True)
class HtmlTable:
    """A table already formatted as text cells; `numeric` right-aligns a column."""

    heading: str
    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HtmlSection:
    """Everything about one scenario: provenance first, so each number traces back to its record file."""

    scenario: str
    provenance: list[str]
    runs: HtmlTable
    tables: list[HtmlTable]
    images: list[tuple[str, bytes]]
    failed: list[str] = field(default_factory=list)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(table: HtmlTable) -> list[str]:
    esc = html.escape
    flag_col = table.columns.index("flag") if "flag" in table.columns else None
    out = [f"<h3>{esc(table.heading)}</h3>", "<table>",
           "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr></thead>", "<tbody>"]
    for row in table.rows:
        flagged = flag_col is not None and row[flag_col] not in ("", "-")
        cells = "".join(f'<td class="num">{esc(v)}</td>' if num else f"<td>{esc(v)}</td>"
                        for v, num in zip(row, table.numeric))
        out.append(('<tr class="flagged">' if flagged else "<tr>") + cells + "</tr>")
    out += ["</tbody>", "</table>"]
    if table.notes:
        out += ['<ul class="note">'] + [f"<li>{esc(n)}</li>" for n in table.notes] + ["</ul>"]
    return out


def render_html(sections: list[HtmlSection], title: str, header: list[str]) -> str:
    """The whole page as one string; `header` lines describe the report as a whole (sources, units, time)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{esc(title)}</h1>", '<ul class="note">', *(f"<li>{esc(line)}</li>" for line in header), "</ul>"]
    out += ["<nav><ul>"] + [f'<li><a href="#s{i}">{esc(s.scenario)}</a></li>' for i, s in enumerate(sections)]
    out += ["</ul></nav>"]
    for i, section in enumerate(sections):
        out += [f'<section id="s{i}">', f"<h2>{esc(section.scenario)}</h2>", "<ul>"]
        out += [f"<li>{esc(line)}</li>" for line in section.provenance] + ["</ul>"]
        out += _table(section.runs)
        for caption, png in section.images:
            out += [f"<h3>{esc(caption)}</h3>", f'<img src="{data_uri(png)}" alt="{esc(caption, quote=True)}">']
        for table in section.tables:
            out += _table(table)
        if section.failed:
            out += ["<h3>Runs that did not finish</h3>", '<ul class="failed">']
            out += [f"<li>{esc(line)}</li>" for line in section.failed] + ["</ul>"]
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
