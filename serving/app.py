"""The Ray Serve deployment: one class, `ListServer`, serves the model (route prefix `/`) or one rival (`/ease/`,
`/two-tower/`, ...) over HTTP JSON.

Routes (under the deployment's prefix):
    POST /retrieve   a request object -> {"items": [{"rank", "item_id", "title"}], ...}; a JSON array of requests
                     (the batch-retrieve format) -> [{"line", "items"} or {"line", "error"}]
    GET  /health     {"status": "ok", "method", "catalog", "checkpoint", facts}
    GET  /titles?q=  title completion (the model's deployment), GET /try the try-it page and /static/try.js|.css

Each request is parsed and checked on the replica's event loop (`serving.lists.parse_body`, the CLI's edge): a
malformed body is 400, an unsatisfiable request (unknown id, k beyond the valid pool) 422, a body over
max_body_bytes 413, a missing token 401, each with {"error": "..."} naming the problem. Checked requests go
through `serve.batch`, which gathers up to max_batch_size requests (waiting at most batch_wait_ms) into one
sampler call; that call runs on one worker thread so the event loop keeps answering (and refusing) meanwhile.
Overload is shed by Ray Serve itself: a replica takes max_ongoing requests at once, max_queued more wait, and the
rest get 503 with Retry-After (`launch.deployment_options`).

Hot swap: the checkpoint is the deployment's `user_config`; `serve.run` with a new one calls `reconfigure` on the
running replicas, which load the new weights beside the old and swap them between batches: no request is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

from serving.lists import MODEL, BadRequest, Lister, answer, complete_titles, load_policy, load_rival, parse_body

STATIC = Path(__file__).parent / "static"
ASSETS = {"try.js": "text/javascript", "try.css": "text/css"}


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@serve.deployment
class ListServer:
    """A replica serving one method. `method`: "h2po" or a rival name; `token`: required on every request when set;
    `limits`: {"max_body_bytes", "max_batch_size", "batch_wait_ms", "threads", "ease_lambda", "gpus", "bf16"}."""

    def __init__(self, method: str, token: str | None, limits: dict) -> None:
        import torch

        if limits.get("threads"):
            torch.set_num_threads(int(limits["threads"]))
        self.method, self.token, self.limits = method, token, limits
        self.cookie = f"h2po_serve_{hashlib.sha256((token or '').encode()).hexdigest()[:8]}"
        self.lister: Lister | None = None
        self.config: dict | None = None  # the user_config the lister was loaded from
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h2po-lists")  # one sampler call at a time
        self.lists.set_max_batch_size(int(limits["max_batch_size"]))
        self.lists.set_batch_wait_timeout_s(float(limits["batch_wait_ms"]) / 1000.0)

    async def reconfigure(self, config: dict) -> None:
        """Load `config["checkpoint"]` (a new one: the hot swap) beside the current lister and swap them."""
        if config == self.config:
            return
        loop = asyncio.get_running_loop()
        self.lister = await loop.run_in_executor(self.pool, self._load, config)
        self.config = config

    def _load(self, config: dict) -> Lister:
        path = Path(config["checkpoint"])
        if self.method == MODEL:
            catalog = self.lister.catalog if self.lister is not None else None  # another catalog raises here
            device = "cuda" if self.limits.get("gpus") else "cpu"  # Ray shows the replica its own GPU as cuda:0
            return load_policy(path, int(config.get("steps", 0)), catalog, device, bool(self.limits.get("bf16")))
        return load_rival(self.method, path, float(self.limits.get("ease_lambda", 0.0)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def lists(self, requests: list) -> list:
        """A batch of checked requests -> their lists, in one call of the sampler (or rival) on the worker thread."""
        lister = self.lister  # a swap during the call leaves this batch on the weights it started with
        return await asyncio.get_running_loop().run_in_executor(self.pool, lister.lists, requests)

    async def __call__(self, http: HttpRequest) -> Response:
        try:
            self._authorise(http)
            response = await self._route(http)
            if self.token and http.query_params.get("token"):
                response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        except Refused as err:
            response = JSONResponse({"error": str(err)}, err.status, headers=err.headers)
        except BadRequest as err:
            response = JSONResponse({"error": str(err)}, err.status)
        return _secure(response)

    def _authorise(self, http: HttpRequest) -> None:
        if self.token is None:
            return
        scheme, _, bearer = http.headers.get("authorization", "").partition(" ")
        given = [http.query_params.get("token", ""), http.cookies.get(self.cookie, ""),
                 bearer.strip() if scheme.lower() == "bearer" else ""]
        if not any(secrets.compare_digest(g.encode(), self.token.encode()) for g in given if g):
            raise Refused(401, "this server needs its token: send Authorization: Bearer TOKEN (or open the try-it "
                          "page's URL printed at start, which carries ?token=)", {"WWW-Authenticate": "Bearer"})

    async def _route(self, http: HttpRequest) -> Response:
        path = _local_path(http)
        method = http.method
        if path == "/retrieve":
            if method != "POST":
                raise Refused(405, "POST a JSON request to /retrieve", {"Allow": "POST"})
            return await self._retrieve(http)
        if method != "GET":
            raise Refused(405, f"{method} is not served on {path}", {"Allow": "GET"})
        if path == "/health":
            return JSONResponse(self._health())
        if self.method == MODEL:
            if path == "/titles":
                return JSONResponse(complete_titles(self._ready().catalog, http.query_params.get("q", "")))
            if path in ("/", "/try"):
                from serving.page import render_try_page

                return HTMLResponse(render_try_page(self._ready(), self.limits.get("rivals", {})))
            if path.startswith("/static/") and path.removeprefix("/static/") in ASSETS:
                name = path.removeprefix("/static/")
                return FileResponse(STATIC / name, media_type=ASSETS[name])
        raise Refused(404, f"no route {path[:100]!r}: POST /retrieve, GET /health" +
                      (", GET /try, GET /titles?q=" if self.method == MODEL else ""))

    def catalog(self) -> str:
        """The fingerprint of the catalog served (`launch.start` asks a running application before replacing it)."""
        return self._ready().catalog.fingerprint

    def _ready(self) -> Lister:
        if self.lister is None:
            raise Refused(503, "still loading the checkpoint", {"Retry-After": "1"})
        return self.lister

    def _health(self) -> dict:
        lister = self._ready()
        return {"status": "ok", "method": self.method, "catalog": lister.catalog.fingerprint,
                "items": lister.catalog.n_items, "checkpoint": Path(lister.source).name, **lister.facts}

    async def _retrieve(self, http: HttpRequest) -> Response:
        lister = self._ready()
        body = await _read_body(http, int(self.limits["max_body_bytes"]))
        batch, requests, errors = parse_body(body, lister.catalog, lister.default_k, lister.max_k)
        good = [r for r in requests if r is not None]
        lists = await asyncio.gather(*(self.lists(r) for r in good))
        catalog, served = lister.catalog, iter(lists)
        results = [{"line": n + 1, "error": e} if e else {"line": n + 1, "items": answer(catalog, next(served))}
                   for n, e in enumerate(errors)]
        facts = {"method": self.method, "checkpoint": Path(lister.source).name, "stamp": lister.facts.get("stamp")}
        return JSONResponse(results if batch else {"items": results[0]["items"], **facts})


async def _read_body(http: HttpRequest, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` (by its Content-Length, else while it
    streams in), so a huge body is never held whole."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"request body over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _local_path(http: HttpRequest) -> str:
    """The path below the deployment's route prefix ("/ease/retrieve" -> "/retrieve")."""
    path, root = http.scope.get("path", "/"), http.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.lstrip("/")


def _secure(response: Response) -> Response:
    from dashboard.page import csp

    response.headers.setdefault("Content-Security-Policy", csp())
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response
