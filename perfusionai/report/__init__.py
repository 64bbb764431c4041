"""Figures (matplotlib, PNG) and the HTML report that the demo and the CLI write."""

from .html import ReportSection, write_report

__all__ = ["ReportSection", "write_report"]
