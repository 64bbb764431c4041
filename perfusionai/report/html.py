"""The HTML report: one self-contained page of sections, each with text, tables and PNGs.

Every domain's demo returns a :class:`ReportSection`; :func:`write_report`
assembles them into ``report.html`` with images referenced by relative path
(the PNGs live beside the report).
"""

from __future__ import annotations

import datetime
import html
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from .. import __version__


@dataclass(frozen=True)
class Figure:
    """A PNG with the one-sentence caption that tells the reader what to look for."""

    path: Path
    caption: str = ""


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
        :class:`Figure` objects (or bare PNG paths, shown without a caption), in order below the body.
    """

    title: str
    html_body: str = ""
    images: list[Union[Figure, Path]] = field(default_factory=list)


def fmt(value, digits: int = 3) -> str:
    """A number to ``digits`` significant figures without exponent where readable (0.000240, 37.4,
    1230); integers stay exact; below 1e-4 scientific (2.40e-05)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, int):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else str(v)
    if v == 0:
        return "0"
    if abs(v) < 1e-4:
        return f"{v:.{digits - 1}e}"
    decimals = digits - 1 - math.floor(math.log10(abs(v)))
    if decimals > 0:
        return f"{v:.{decimals}f}"
    return f"{round(v, decimals):.0f}"


def table_html(header: Sequence[str], rows: Iterable[Sequence], caption: str = "") -> str:
    """An HTML table; floats are shown with 3 significant figures (:func:`fmt`)."""

    def cell(v):
        if isinstance(v, float):
            return fmt(v)
        try:  # numpy scalars
            import numpy as np

            if isinstance(v, np.floating):
                return fmt(float(v))
        except ImportError:  # pragma: no cover
            pass
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
figure{display:block;margin:1em 0}figcaption{font-size:90%;color:#444;max-width:900px}img{max-width:100%}
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
        for item in s.images:
            img, caption = (item.path, item.caption) if isinstance(item, Figure) else (Path(item), "")
            rel = Path(img).resolve().relative_to(out.resolve()) if Path(img).resolve().is_relative_to(
                out.resolve()) else Path(Path(img).name)
            if not (out / rel).exists() and Path(img).is_file():  # an image from elsewhere goes beside the report
                shutil.copyfile(img, out / rel)
            cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
            parts.append(f"<figure><img src='{html.escape(rel.as_posix())}' alt='{html.escape(caption or rel.stem)}'>"
                         f"{cap}</figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
