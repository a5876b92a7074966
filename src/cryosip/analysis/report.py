"""A self-contained HTML report (images inlined as base64 PNG)."""

from __future__ import annotations

import base64
import html
import os

from .._atomic import write_text


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


CSS = """body{font-family:system-ui,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}.note{background:#f7f7ff;padding:.6em 1em;border-left:3px solid #88f}
code{background:#f4f4f4;padding:1px 4px}"""


def write_report(path, title: str, sections: list[tuple[str, list]]) -> None:
    """sections: (heading, items) where an item is ("text", html), ("img", png_path, caption) or ("table", rows, columns)."""
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for it in items:
            if it[0] == "text":
                parts.append(f"<p>{it[1]}</p>")
            elif it[0] == "note":
                parts.append(f"<p class='note'>{it[1]}</p>")
            elif it[0] == "img":
                if os.path.exists(it[1]):
                    parts.append(_img(it[1], it[2]))
            elif it[0] == "table":
                parts.append(_table(it[1], it[2]))
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
