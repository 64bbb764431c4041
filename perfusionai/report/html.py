"""The HTML report: one self-contained page of sections, each with text, tables and PNGs.

Every domain's demo returns a :class:`ReportSection`; :func:`write_report`
assembles them into ``report.html`` with images referenced by relative path
(the PNGs live beside the report).
"""

from __future__ import annotations

import datetime
import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .. import __version__


@dataclass
class ReportSection:
    """One section of the report.

    Attributes
    ----------
    title
        Section heading (e.g. "DSC perfusion").
    html_body
        Trusted HTML produced by our own code (tables from :func:`table_html`).
    images
        PNG paths, shown in order below the body with their file names as captions.
    """

    title: str
    html_body: str = ""
    images: list[Path] = field(default_factory=list)


def table_html(header: Sequence[str], rows: Iterable[Sequence], caption: str = "") -> str:
    """An HTML table; floats are shown with 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #4477aa}h2{margin-top:2em;color:#224466}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eef}caption{font-weight:bold;text-align:left;padding-bottom:4px}
figure{display:inline-block;margin:0.5em}figcaption{font-size:80%;color:#555}img{max-width:100%}
.note{background:#fff8e0;border-left:4px solid #e0b000;padding:0.5em 1em}
"""


def write_report(sections: Sequence[ReportSection], out_dir: str | Path, title: str = "PerfusionAI report",
                 meta: Mapping[str, str] | None = None) -> Path:
    """Write ``out_dir/report.html`` from the sections; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    info = {"perfusionai": __version__, "generated": datetime.datetime.now().isoformat(timespec="seconds")}
    info.update(meta or {})
    parts.append("<p>" + " &middot; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in info.items())
                 + "</p>")
    if len(sections) > 1:
        parts.append("<ul>" + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>"
                                      for i, s in enumerate(sections)) + "</ul>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>{s.html_body}")
        for img in s.images:
            rel = Path(img).resolve().relative_to(out.resolve()) if Path(img).resolve().is_relative_to(
                out.resolve()) else Path(Path(img).name)
            if not (out / rel).exists() and Path(img).is_file():  # an image from elsewhere goes beside the report
                shutil.copyfile(img, out / rel)
            parts.append(f"<figure><img src='{html.escape(rel.as_posix())}' alt='{html.escape(rel.stem)}'>"
                         f"<figcaption>{html.escape(rel.stem)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
