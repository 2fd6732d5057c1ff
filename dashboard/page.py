"""The page's state and HTML, shared by the live server and the report: figures (`charts`), panels (`panels`) and
the Jinja2 templates under `templates/` (autoescape on: every string that comes from data is escaped).

    state = page_state("runs/default", records)   # {"version", "figures", "panels", "html": {"summary", "details"}}
    text = render_page(state, live=False)         # the report: plotly.js, CSS, script and figures inlined

The live page loads plotly.js and its assets from the server (`dashboard.server`); the report inlines them, so it
opens offline and names no external URL.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2
from markupsafe import Markup

from dashboard.charts import CHARTS, build_figures, latest_steps
from dashboard.panels import build_panels

STATIC = Path(__file__).parent / "static"
TEMPLATES = Path(__file__).parent / "templates"


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def plotly_js_path() -> Path:
    """plotly.min.js as installed with the `plotly` package (no CDN)."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def render_fragments(panels: dict) -> dict[str, Markup]:
    """The summary (status, step, run facts) and details (events, sample, comparison) sections as escaped HTML."""
    env = environment()
    return {name: Markup(env.get_template(f"{name}.html").render(p=panels)) for name in ("summary", "details")}


def page_state(run_dir: str | Path, records: list[dict], version: str = "") -> dict:
    """Everything the page shows, as JSON-ready data (`version` tells a poll whether anything changed)."""
    steps = latest_steps(records)
    panels = build_panels(records, steps, run_dir)
    return {"version": version, "figures": build_figures(records), "panels": panels,
            "html": render_fragments(panels)}


def render_page(state: dict, live: bool) -> str:
    """The whole page: live (assets fetched from the server, figures polled) or the self-contained report."""
    context = {"live": live, "state": state, "charts": list(CHARTS), "run": state["panels"]["run"]}
    if not live:  # our own package files, trusted: inlined as they are
        context.update(css=Markup((STATIC / "page.css").read_text()), page_js=Markup((STATIC / "page.js").read_text()),
                       plotly_js=Markup(plotly_js_path().read_text(encoding="utf-8")))
    return environment().get_template("page.html").render(**context)
