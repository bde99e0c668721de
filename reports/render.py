"""Markdown and self-contained HTML from the views."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import pandas as pd

# Display formats by column: the figures' own precision, never more.
_SPECIAL = {"final lr": "{:.2e}", "max abs error": "{:.2e}", "limit": "{:.1e}"}
_INTEGER = {"last iteration", "best at iteration", "B", "H", "N", "D", "C"}
_VERDICT_COLOUR = {"reproduced": "#d4edda", "below": "#f8d7da", "above": "#fff3cd", "failed": "#f5c6cb",
                   "no verdict": "#e9ecef"}


@dataclass
class Section:
    title: str
    intro: str                       # Markdown-free prose, shown above the table
    table: pd.DataFrame
    empty_text: str = "None logged."
    image: bytes | None = None       # PNG
    image_name: str = ""             # file stem for the Markdown report's plots/


def _cell(column: str, value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if column == "run_id":
        return value[:8]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if column in _INTEGER:
            return f"{value:.0f}"
        if column.endswith("frac peak"):
            return f"{value:.3f}"
        return _SPECIAL.get(column, "{:.2f}").format(value)
    return str(value)


def display(df: pd.DataFrame) -> pd.DataFrame:
    """The view as the strings both reports show (run ids shortened, missing values as –)."""
    out = pd.DataFrame({col: [_cell(col, v) for v in df[col]] for col in df.columns}, index=df.index)
    return out.rename(columns={"run_id": "run"})


def markdown(title: str, header: list[str], sections: list[Section], notes: list[str]) -> str:
    lines = [f"# {title}", ""] + [f"- {h}" for h in header] + [""]
    for s in sections:
        lines += [f"## {s.title}", "", s.intro, ""]
        if s.table.empty:
            lines += [s.empty_text, ""]
        else:
            lines += [display(s.table).to_markdown(index=False, disable_numparse=True), ""]
        if s.image is not None:
            lines += [f"![{s.title}](plots/{s.image_name}.png)", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _colour_verdict(value: str) -> str:
    colour = _VERDICT_COLOUR.get(value.split(":")[0].split(" (")[0])
    return f"background-color: {colour}" if colour else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "–"
    return True


def _styled(df: pd.DataFrame, uid: str) -> str:
    shown = display(df)
    styler = shown.style.hide(axis="index").set_table_attributes('class="report"')
    styler.set_uuid(uid)
    marked = [c for c in shown.columns if c.startswith("verdict") or c == "status"]
    if marked:
        styler = styler.map(_colour_verdict, subset=marked)
    # Text reads left-aligned, figures right-aligned. A column holding a long unbroken token (a
    # path, a hash) may break it anywhere; any other keeps its words whole, so the table fits
    # the page without splitting a figure or a name.
    text = [c for c in shown.columns if not shown[c].map(_is_number).all()]
    if text:
        styler = styler.set_properties(subset=text, **{"text-align": "left"})
    unbroken = [c for c in shown.columns if shown[c].map(lambda v: max(map(len, v.split()), default=0)).max() > 24]
    if unbroken:
        styler = styler.set_properties(subset=unbroken, **{"overflow-wrap": "anywhere", "min-width": "10em"})
    return styler.to_html()


# Every table fits the page: its text wraps (see _styled) and the views keep few enough columns
# that figures stay whole.
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1600px; }
table.report { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; max-width: 100%; }
table.report th, table.report td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right;
  vertical-align: top; }
table.report th { background: #f2f2f2; }
table.report td:first-child, table.report th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def html_page(title: str, header: list[str], sections: list[Section], notes: list[str]) -> str:
    """One file with everything inline (styles, tables, base64 PNGs): it opens anywhere,
    offline, and can be attached or archived alone."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>"]
    parts += [f"<li>{html.escape(h)}</li>" for h in header] + ["</ul>"]
    for i, s in enumerate(sections):
        parts += [f"<h2>{html.escape(s.title)}</h2>", f"<p>{html.escape(s.intro)}</p>"]
        parts.append(f"<p>{html.escape(s.empty_text)}</p>" if s.table.empty else _styled(s.table, f"t{i}"))
        if s.image is not None:
            data = base64.b64encode(s.image).decode()
            parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>")
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
