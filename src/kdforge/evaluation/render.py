"""Render a document (a list of blocks) as Markdown and as one self-contained HTML page.

A block is ``(kind, payload)``:

* ``("h1" | "h2" | "p", text)``; ``("warning", text)``: a line that must not be missed (red in HTML,
  bold in Markdown);
* ``("table", (headers, rows))``: the first column left-aligned, the others right-aligned;
* ``("image", (filename, png_bytes, alt))``: Markdown links ``filename`` (the caller writes the file
  beside the page), HTML embeds the bytes as base64 so the page stands alone;
* ``("code", (language, text))``; ``("details", (summary, language, text))``: a code block folded
  under a summary line (``<details>``, which GitHub's Markdown renders too).
"""

from __future__ import annotations

import base64
import html
from typing import Any

Block = tuple[str, Any]


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


def _fenced(language: str, text: str) -> str:
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, payload in blocks:
        if kind == "h1":
            out.append("# " + " ".join(payload.split()))
        elif kind == "h2":
            out.append(f"## {payload}")
        elif kind == "p":
            out.append(payload)
        elif kind == "warning":
            out.append(f"**Warning: {payload}**")
        elif kind == "table":
            headers, rows = payload
            align = ["---", *["---:"] * (len(headers) - 1)]
            out.append("\n".join("| " + " | ".join(_md_cell(c) for c in cells) + " |"
                                 for cells in [headers, align, *rows]))
        elif kind == "image":
            filename, _png, alt = payload
            out.append(f"![{alt}]({filename})")
        elif kind == "code":
            out.append(_fenced(*payload))
        elif kind == "details":
            summary, language, text = payload
            out.append(f"<details><summary>{html.escape(summary)}</summary>\n\n{_fenced(language, text)}\n\n</details>")
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:80rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem}"
        "th{background:#f3f3f3}td:not(:first-child),th:not(:first-child){text-align:right}"
        "pre{background:#f6f6f6;padding:1rem;overflow:auto}img{max-width:100%}"
        ".warning{background:#fde8e8;border-left:.3rem solid #c62828;padding:.5rem 1rem;font-weight:bold}"
        "summary{cursor:pointer;margin:.5rem 0}")


def render_html(blocks: list[Block], title: str) -> str:
    esc = html.escape
    body: list[str] = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{esc(payload)}</{kind}>")
        elif kind == "warning":
            body.append(f'<p class="warning">{esc(payload)}</p>')
        elif kind == "table":
            headers, rows = payload
            head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
            rows_html = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
        elif kind == "image":
            _filename, png, alt = payload
            data = base64.b64encode(png).decode("ascii")
            body.append(f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">')
        elif kind == "code":
            body.append(f"<pre><code>{esc(payload[1].rstrip())}</code></pre>")
        elif kind == "details":
            summary, _language, text = payload
            body.append(f"<details><summary>{esc(summary)}</summary><pre><code>{esc(text.rstrip())}</code></pre>"
                        "</details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
