"""The page's state and HTML, shared by the live server and the report: figures (`charts`), panels (`panels`) and
the Jinja2 templates under `templates/` (autoescape on: every string that comes from data is escaped).

    state = page_state("runs/default", records)   # {"version", "figures", "panels", "html": {"summary", "details"}}
    text = render_page(state, live=False)         # the report: plotly.js, CSS, script and figures inlined

The live page loads plotly.js and its assets from the server (`dashboard.server`); the report inlines them, so it
opens offline and names no external URL.
"""

from __future__ import annotations

import base64
import hashlib
import re
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


def csp(scripts: list[str] | tuple[str, ...] = (), meta: bool = False) -> str:
    """The Content-Security-Policy of a page: nothing by default; scripts from the server itself, or (the report)
    exactly the inline `scripts` by their sha256; styles inline too (plotly.js writes its own); images as data: URLs
    (plotly's icons); fetches to the server only (the page's poll). `meta`: the form a <meta> tag takes (without
    frame-ancestors, which only a header can set)."""
    script_src = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                          for s in scripts) or "'self'"
    policy = (f"default-src 'none'; script-src {script_src}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
              "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'")
    return policy if meta else policy + "; frame-ancestors 'none'"


def inline_scripts(html: str) -> list[str]:
    """The text of every plain `<script>` element of a page (not `<script src>`, not the JSON data block)."""
    return re.findall(r"<script>(.*?)</script>", html, re.S)


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
    if not live:  # our own package files, trusted: inlined as they are, and allowed by their hashes only
        page_js, plotly_js = (STATIC / "page.js").read_text(), plotly_js_path().read_text(encoding="utf-8")
        context.update(css=Markup((STATIC / "page.css").read_text()), page_js=Markup(page_js),
                       plotly_js=Markup(plotly_js), policy=csp([plotly_js, page_js], meta=True))
    return environment().get_template("page.html").render(**context)
