"""The end-of-run report: OUT_DIR/report.html, one self-contained file (plotly.js, styles and data inlined; it
names no external URL, so it opens offline) with the training curves of the live page, the comparison table
(baselines, MOST, H2PO from OUT_DIR/results.json), the events and the run's facts.

    path = write_report("runs/default")   # also: h2po dashboard --run runs/default --report
"""

from __future__ import annotations

from pathlib import Path

from catalog.schema import atomic_write
from dashboard.feed import read_records
from dashboard.page import page_state, render_page
from dashboard.panels import REPORT_FILE


def write_report(run_dir: str | Path) -> Path:
    """Render the report from the run's whole feed and write it atomically.  -> its path"""
    records, _ = read_records(run_dir)
    text = render_page(page_state(run_dir, records), live=False)
    path = Path(run_dir) / REPORT_FILE
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
