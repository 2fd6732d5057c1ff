"""The one formatter of a results-table cell, shared by the text report and the dashboard's tables."""

from __future__ import annotations


def cell(summary: dict, key: str, with_ci: bool = False) -> str:
    """`summary[key]` to three decimals (signed for a paired difference, a key with `_vs_`), with its 95% interval
    `summary[key + "_ci"]` when `with_ci`; "-" when the value is missing."""
    if summary.get(key) is None:
        return "-"
    signed = "_vs_" in key
    text = f"{summary[key]:+.3f}" if signed else f"{summary[key]:.3f}"
    if with_ci and summary.get(f"{key}_ci"):
        lo, hi = summary[f"{key}_ci"]
        text += f" [{lo:+.3f}, {hi:+.3f}]" if signed else f" [{lo:.3f}, {hi:.3f}]"
    return text
