"""Starting, updating and stopping the served applications: the model at `/`, each rival at `/<route>/`.

    server = start(Path("runs/g_intent10/h2po.safetensors"), ServeConfig())   # embedded Ray unless address given
    print(server.url)                  # http://127.0.0.1:8000/  (the try-it page at /try)
    reload(server, Path("runs/g_intent10/h2po.safetensors"))                     # the hot swap
    server.stop()

`h2po serve --checkpoint C` is `serve_forever`: start, print the URLs, then watch C every serve.watch_s seconds and
hot-swap when the file is replaced by a newer version (training writes it atomically). A checkpoint of another
catalog is refused with one line and the current one keeps serving.

Ray: `address` (or $RAY_ADDRESS) joins a running cluster, where the applications stay after the command ends with
`detach`; otherwise a local Ray instance starts on loopback only (`actors.driver.loopback_only`) and stops
with the command. The HTTP proxy binds serve.host:serve.port; beyond loopback every request needs the bearer token.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.config import ServeConfig
from core.errors import UserError
from serving.lists import MODEL, RIVALS, catalog_of, checkpoint_stamp

TOKEN_ENV = "H2PO_SERVE_TOKEN"
LOGGING = {"log_level": "WARNING", "enable_access_log": False}  # the replicas' logs: problems only


@dataclass
class Server:
    """The running applications: where they answer, and what they serve."""

    url: str  # the model's base URL, ending in "/"
    token: str | None
    checkpoint: Path
    catalog: str  # fingerprint of the served catalog
    cfg: ServeConfig
    started_ray: bool

    def rival_urls(self) -> dict[str, str]:
        return {name: f"{self.url}{RIVALS[name]}/" for name in self.cfg.rivals}

    def stop(self) -> None:
        """Delete the applications (and shut down the Ray instance this process started)."""
        import ray
        from ray import serve

        if self.started_ray:
            serve.shutdown()
            ray.shutdown()
            return
        for name in [MODEL, *self.cfg.rivals]:
            serve.delete(app_name(name))


def app_name(method: str) -> str:
    return "h2po" if method == MODEL else "rival-" + RIVALS[method]


def serve_token(host: str, token: str | None) -> str | None:
    """The token the server requires: the given one, else $H2PO_SERVE_TOKEN, else (beyond loopback) a fresh one."""
    from dashboard.server import required_token

    return required_token(host, token, TOKEN_ENV, "serve token")


def connect(address: str | None, cpus: float) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local instance on loopback.
    -> whether this process started Ray"""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines; h2po prints its own
    if address:
        ray.init(address=address, logging_level="WARNING")
        return False
    from actors.driver import loopback_only

    loopback_only()
    ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus + 0.999)), include_dashboard=False, logging_level="WARNING")
    return True


def deployment(method: str, checkpoint: Path, cfg: ServeConfig, token: str | None):
    """The bound application of one method, with its batching, replicas and load-shedding options."""
    from ray.serve.config import BackpressureConfig

    from serving.app import ListServer

    replicas, gpus = (cfg.replicas, cfg.replica_gpus) if method == MODEL else (1, 0.0)
    threads = replica_threads(cfg)
    limits = {"max_body_bytes": cfg.max_body_bytes, "max_batch_size": cfg.max_batch_size,
              "batch_wait_ms": cfg.batch_wait_ms, "threads": threads, "ease_lambda": cfg.ease_lambda,
              "gpus": gpus, "bf16": cfg.bf16, "rivals": {name: RIVALS[name] for name in cfg.rivals}}
    return ListServer.options(
        name=app_name(method), num_replicas=replicas, max_ongoing_requests=cfg.max_ongoing,
        max_queued_requests=cfg.max_queued, ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": gpus},
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        user_config=user_config(checkpoint, cfg.steps if method == MODEL else 0),
    ).bind(method, token, limits)


def replica_threads(cfg: ServeConfig) -> int:
    """serve.threads, else this machine's cores shared by all replicas (the model's and one per rival): on a busy
    machine, more torch threads than cores make every small op wait for a descheduled thread (a 1-list call took
    6x longer with 2 threads than with 1 on a loaded 2-core machine)."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // (cfg.replicas + len(cfg.rivals)))


def user_config(checkpoint: Path, steps: int) -> dict:
    """What a replica loads; a new value makes Serve call `reconfigure` on the running replicas (the hot swap)."""
    return {"checkpoint": str(Path(checkpoint).resolve()), "stamp": checkpoint_stamp(checkpoint), "steps": steps}


def start(checkpoint: Path, cfg: ServeConfig, token: str | None = None, address: str | None = None) -> Server:
    """Deploy the model and its rivals on Ray Serve and wait until they answer (module docstring)."""
    from ray import serve
    from ray.serve.api import RunTarget

    checkpoint = Path(checkpoint)
    fingerprint, _ = catalog_of(checkpoint)  # a readable h2po checkpoint, before anything starts
    unknown = [name for name in cfg.rivals if name not in RIVALS]
    if unknown:
        raise UserError(f"serve.rivals: unknown rival {unknown[0]!r} (known: {', '.join(RIVALS)})")
    token = serve_token(cfg.host, token)
    started = connect(address, cfg.replica_cpus * (cfg.replicas + len(cfg.rivals)))
    try:
        check_gpus(cfg, started)
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=LOGGING)
        running = running_catalog()
        if running is not None and running != fingerprint:
            raise UserError(f"{checkpoint} was trained on another catalog (fingerprint {fingerprint}) than the one "
                            f"the running application serves (fingerprint {running}); delete that application first "
                            f"(serve.delete({app_name(MODEL)!r}))")
        serve.run_many([RunTarget(deployment(method, checkpoint, cfg, token), app_name(method),
                                  "/" if method == MODEL else f"/{RIVALS[method]}", LOGGING)
                        for method in [MODEL, *cfg.rivals]])  # in parallel: each replica loads on its own
    except BaseException:
        if started:
            serve.shutdown()
            import ray

            ray.shutdown()
        raise
    from dashboard.server import page_url

    return Server(page_url(cfg.host, cfg.port), token, checkpoint, fingerprint, cfg, started)


def check_gpus(cfg: ServeConfig, local: bool) -> None:
    """serve.replica_gpus asks for GPUs the cluster lacks: an error on the local instance (none can join it), a
    warning on a cluster (an autoscaler may add GPU nodes; until then the replicas wait to be placed)."""
    import ray

    need, have = cfg.replica_gpus * cfg.replicas, ray.cluster_resources().get("GPU", 0.0)
    if need <= have:
        return
    problem = (f"serve.replica_gpus={cfg.replica_gpus:g} x serve.replicas={cfg.replicas} asks for {need:g} GPUs and "
               f"the Ray cluster has {have:g}")
    if local:
        raise UserError(f"{problem}; set serve.replica_gpus=0 to serve on the CPU")
    print(f"warning: {problem}; the model's replicas wait until GPUs join", file=sys.stderr, flush=True)


def running_catalog() -> str | None:
    """The catalog fingerprint of the model application already running on this Ray cluster, None when none is."""
    from ray import serve

    if app_name(MODEL) not in serve.status().applications:
        return None
    return serve.get_app_handle(app_name(MODEL)).catalog.remote().result(timeout_s=60)


def reload(server: Server, checkpoint: Path) -> bool:
    """Hot-swap the model to `checkpoint` (a newer one of the same catalog): the running replicas load it and swap
    between batches. Another catalog's checkpoint raises UserError and nothing changes.  -> whether it changed"""
    from ray import serve

    checkpoint = Path(checkpoint)
    fingerprint, _ = catalog_of(checkpoint)
    if fingerprint != server.catalog:
        raise UserError(f"{checkpoint} was trained on another catalog (fingerprint {fingerprint}) than the one served "
                        f"(fingerprint {server.catalog}); still serving {server.checkpoint}. Serve it with its own "
                        "`h2po serve`")
    serve.run(deployment(MODEL, checkpoint, server.cfg, server.token), name=app_name(MODEL), route_prefix="/",
              logging_config=LOGGING)
    server.checkpoint = checkpoint
    return True


def watch(server: Server, stamp: str) -> str:
    """One check of the served checkpoint's file: hot-swap when it was replaced.  -> the stamp now served"""
    try:
        now = checkpoint_stamp(server.checkpoint)
    except OSError:
        return stamp  # mid-replace or removed: keep serving what is loaded
    if now == stamp:
        return stamp
    try:
        reload(server, server.checkpoint)
        print(f"h2po serve: hot-swapped to the newer {server.checkpoint} ({now})", flush=True)
    except UserError as err:
        print(f"h2po serve: refused: {err}", file=sys.stderr, flush=True)
    return now


def stop_on_signal(signum: int, frame) -> None:
    """SIGTERM (`kill PID`, a service manager) stops `h2po serve` as Ctrl-C does, Ray shut down: a process started
    from a shell's background job inherits SIGINT ignored, so SIGTERM is the one signal that always reaches it."""
    raise KeyboardInterrupt


def serve_forever(checkpoint: Path, cfg: ServeConfig, token: str | None = None, address: str | None = None,
                  detach: bool = False) -> None:
    """`h2po serve`: start, print where it answers, watch the checkpoint for a newer version until Ctrl-C or
    SIGTERM."""
    from dashboard.server import is_loopback

    start_time = time.time()
    server = start(checkpoint, cfg, token, address)
    query = f"?token={server.token}" if server.token else ""
    print(f"h2po serve: {checkpoint} in {time.time() - start_time:.0f}s; POST {server.url}retrieve, "
          f"GET {server.url}health", flush=True)
    for name, url in server.rival_urls().items():
        print(f"  rival {name}: POST {url}retrieve", flush=True)
    print(f"  try it: {server.url}try{query}", flush=True)
    if not is_loopback(cfg.host):
        print(f"warning: listening beyond loopback on {cfg.host}:{cfg.port}; every request needs the token "
              "(Authorization: Bearer TOKEN)", file=sys.stderr, flush=True)
    if detach:
        print("detached: the applications keep running on the cluster (serve.delete / `serve shutdown` stops them)")
        return
    stamp = checkpoint_stamp(server.checkpoint)
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        while True:
            time.sleep(cfg.watch_s or 3600)
            if cfg.watch_s:
                stamp = watch(server, stamp)
    except KeyboardInterrupt:
        print("h2po serve: stopping", flush=True)  # after Ctrl-C or SIGTERM
    finally:
        server.stop()
