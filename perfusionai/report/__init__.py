"""Figures (matplotlib, PNG) and the HTML report that the demo and the CLI write."""

from .html import Figure, ReportSection, fmt, write_report

__all__ = ["Figure", "ReportSection", "fmt", "write_report"]
