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
Access: it binds to loopback unless another host is asked for. Bound beyond loopback (or given a token) it
requires a token on every request: `?token=T` once (it then sets an HttpOnly cookie), the cookie, or an
`Authorization: Bearer T` header; a request without it gets 401. The token is `token=` / --token, else
$H2PO_DASHBOARD_TOKEN, else generated (`secrets.token_urlsafe`) and part of the printed URL; a one-line warning says
that the page listens beyond loopback. Every response carries a restrictive Content-Security-Policy (`page.csp`:
scripts from the server only; report.html's inlined scripts by their hashes) and X-Content-Type-Options: nosniff.
report.html is served only when it is a regular file inside the run directory (a symlink out of it is refused).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from core.errors import UserError
from dashboard.feed import METRICS_FILE, read_records
from dashboard.page import STATIC, csp, inline_scripts, page_state, plotly_js_path, render_page
from dashboard.panels import REPORT_FILE, RESULTS_FILE

ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
TOKEN_ENV = "H2PO_DASHBOARD_TOKEN"
TOKEN_PATTERN = r"[A-Za-z0-9_\-.~]{16,200}"  # URL-safe, long enough not to be guessed


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


def make_app(run_dir: str | Path, token: str | None = None) -> web.Application:
    """The page's routes; with a `token`, every request must carry it (module docstring)."""
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

    async def report(request: web.Request) -> web.Response:
        path = Path(run_dir) / REPORT_FILE
        if not path.exists():
            raise web.HTTPNotFound(text="no report yet: it is written at the end of the run")
        if not (path.resolve().is_relative_to(Path(run_dir).resolve()) and path.resolve().is_file()):
            raise web.HTTPForbidden(text=f"{REPORT_FILE} is not a regular file inside the run directory")
        text = path.read_text(encoding="utf-8", errors="replace")
        return web.Response(text=text, content_type="text/html", headers={"Content-Security-Policy": csp(
            inline_scripts(text))})

    async def plotly_js(request: web.Request) -> web.FileResponse:
        return web.FileResponse(plotly_js_path(), headers={"Content-Type": "text/javascript"})

    app = web.Application(middlewares=[_guard(token)])
    app.router.add_get("/", index)
    app.router.add_get("/api/state", state)
    app.router.add_get("/plotly.min.js", plotly_js)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/report.html", report)
    return app


def _guard(token: str | None):
    """Middleware: the token check (when there is a token) and the security headers on every response."""
    cookie = f"h2po_token_{hashlib.sha256((token or '').encode()).hexdigest()[:8]}"  # one per dashboard and token

    def allowed(request: web.Request) -> bool:
        given = [request.query.get("token", ""), request.cookies.get(cookie, "")]
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        given.append(bearer.strip() if scheme.lower() == "bearer" else "")
        return any(secrets.compare_digest(g.encode(), token.encode()) for g in given if g)

    @web.middleware
    async def guard(request: web.Request, handler):
        if token is not None and not allowed(request):
            response = web.Response(status=401, text="this dashboard needs its token: open the URL printed when it "
                                    "started (it ends in ?token=...), or send Authorization: Bearer TOKEN\n",
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            try:
                response = await handler(request)
            except web.HTTPException as err:  # 403, 404: sent with the same headers
                _secure(err.headers)
                raise
            if token is not None and request.query.get("token"):
                response.set_cookie(cookie, token, httponly=True, samesite="Strict", path="/")
        _secure(response.headers)
        return response

    return guard


def _secure(headers) -> None:
    headers.setdefault("Content-Security-Policy", csp())
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or "localhost"): only this machine can reach it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dashboard_token(host: str, token: str | None) -> str | None:
    """The token a dashboard on `host` requires (`required_token` with $H2PO_DASHBOARD_TOKEN)."""
    return required_token(host, token, TOKEN_ENV, "dashboard token")


def required_token(host: str, token: str | None, env: str, what: str) -> str | None:
    """The token a service on `host` requires: the given one, else $`env`, else (beyond loopback) a fresh one;
    None = no token (loopback, none asked for). A given token must match TOKEN_PATTERN."""
    token = token or os.environ.get(env) or None
    if token is not None and not re.fullmatch(TOKEN_PATTERN, token):
        raise UserError(f"{what} (--token or ${env}) must be 16..200 URL-safe characters (letters, digits, - _ . ~), "
                        f"got {len(token)} characters")
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    return token


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


def page_url(host: str, port: int, token: str | None = None) -> str:
    """The address to open: a wildcard address is shown as this machine's address on its outward interface (where
    other machines reach it), and the token, when there is one, is part of it."""
    shown = reachable_address() if host in ("0.0.0.0", "::", "") else host
    query = f"?token={token}" if token else ""
    return f"http://[{shown}]:{port}/{query}" if ":" in shown else f"http://{shown}:{port}/{query}"


def reachable_address() -> str:
    """This machine's address on the interface of its default route (a UDP connect sends nothing), else its name."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 9))
            address = probe.getsockname()[0]
        except OSError:
            address = ""
    return address if address and not ipaddress.ip_address(address).is_loopback else socket.gethostname()


def start_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                    token: str | None = None) -> DashboardHandle:
    """Serve the page of `run_dir` from a daemon thread (its own event loop).  -> handle with .url and .stop()

    Bound beyond loopback, or given a token (`token`, $H2PO_DASHBOARD_TOKEN), every request needs the token
    (`dashboard_token`; the URL carries it) and a one-line warning goes to stderr. Raises OSError when the address
    cannot be bound (port in use), UserError for a malformed token."""
    token = dashboard_token(host, token)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(run_dir, token), access_log=None)
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
    if not is_loopback(host):
        print(f"warning: the dashboard listens beyond loopback on {host}:{bound}; whoever has its token (in the URL "
              "below) can see the run", file=sys.stderr, flush=True)
    return DashboardHandle(page_url(host, bound, token), loop, runner, thread)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C), printing the URL first: `h2po dashboard --run DIR`."""
    handle = start_dashboard(run_dir, host, port, token)
    print(f"dashboard: {handle.url}  (Ctrl-C to stop)", flush=True)
    try:
        while handle.thread.is_alive():
            handle.thread.join(timeout=1.0)
    finally:
        handle.stop()
