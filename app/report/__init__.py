"""Reports of a run, written into its run directory: JSON for programs, HTML and PNGs for people.

Importing this package loads only numpy; matplotlib and torch load when a report is written.
"""
from app.report.selection import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
