"""The live dashboard: an aiohttp server over a run directory's metrics feed (`dashboard.feed`).

    handle = start_dashboard("runs/default")     # a daemon thread with its own event loop; 127.0.0.1, a free port
    print(f"dashboard: {handle.url}")
    ...
    handle.stop()
    # or blocking, for a finished or running run: h2po dashboard --run runs/default  (serve(...))

Routes: `/` the page, `/plotly.min.js` (from the installed plotly package, no CDN), `/static/page.js|page.css`,
`/api/state?since=VERSION` (the page's whole state as JSON, or only `{"version"}` when nothing changed since
VERSION), `/report.html` (OUT_DIR/report.html once written). The page polls the state every 1.5 s. The feed is
re-read incrementally on each poll; figures are rebuilt only when new records (or a new results.json) arrived.
It binds to loopback unless another host is asked for: the page shows the run's data to whoever can reach it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from dashboard.feed import METRICS_FILE, read_records
from dashboard.page import STATIC, page_state, plotly_js_path, render_page
from dashboard.panels import REPORT_FILE, RESULTS_FILE

ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}


class Feed:
    """A run's records, read incrementally, and the page state built from them once per change."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.records: list[dict] = []
        self.offset = 0
        self.state: dict | None = None

    def refresh(self) -> dict:
        path = self.run_dir / METRICS_FILE
        if path.exists() and path.stat().st_size < self.offset:  # the file was replaced: read it again
            self.records, self.offset = [], 0
        new, self.offset = read_records(self.run_dir, self.offset)
        self.records += new
        results = self.run_dir / RESULTS_FILE
        report = self.run_dir / REPORT_FILE
        version = f"{self.offset}-{results.exists() and results.stat().st_mtime_ns}-{report.exists()}"
        if self.state is None or self.state["version"] != version:
            self.state = page_state(self.run_dir, self.records, version)
        return self.state


def make_app(run_dir: str | Path) -> web.Application:
    feed = Feed(run_dir)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=render_page(feed.refresh(), live=True), content_type="text/html")

    async def state(request: web.Request) -> web.Response:
        current = feed.refresh()
        if request.query.get("since") == current["version"]:
            return web.json_response({"version": current["version"]})
        return web.json_response({k: current[k] for k in ("version", "figures", "html")})

    async def asset(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Content-Type": ASSETS[name]})

    async def report(request: web.Request) -> web.FileResponse:
        path = Path(run_dir) / REPORT_FILE
        if not path.exists():
            raise web.HTTPNotFound(text="no report yet: it is written at the end of the run")
        return web.FileResponse(path)

    async def plotly_js(request: web.Request) -> web.FileResponse:
        return web.FileResponse(plotly_js_path(), headers={"Content-Type": "text/javascript"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/state", state)
    app.router.add_get("/plotly.min.js", plotly_js)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/report.html", report)
    return app


@dataclass
class DashboardHandle:
    """A dashboard served from a daemon thread: its URL, and `stop()`."""

    url: str
    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner
    thread: threading.Thread

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def page_url(host: str, port: int) -> str:
    """The address to open: the wildcard addresses are shown as this machine's name."""
    shown = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def start_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> DashboardHandle:
    """Serve the page of `run_dir` from a daemon thread (its own event loop).  -> handle with .url and .stop()

    Raises OSError when the address cannot be bound (port in use)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(run_dir), access_log=None)
    try:
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host, port)
        loop.run_until_complete(site.start())
    except BaseException:
        loop.run_until_complete(runner.cleanup())
        loop.close()
        raise
    bound = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="h2po-dashboard", daemon=True)
    thread.start()
    return DashboardHandle(page_url(host, bound), loop, runner, thread)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until interrupted (Ctrl-C), printing the URL first: `h2po dashboard --run DIR`."""
    handle = start_dashboard(run_dir, host, port)
    print(f"dashboard: {handle.url}  (Ctrl-C to stop)", flush=True)
    try:
        while handle.thread.is_alive():
            handle.thread.join(timeout=1.0)
    finally:
        handle.stop()
