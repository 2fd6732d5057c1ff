"""Ray nodes that tests start themselves with `ray start --block`, on loopback with token authentication on, and stop
by process id (never `ray stop`, which would stop every Ray instance on the machine).

Every node runs as its own process session (`start_new_session`): its raylet, agents, workers (and on the head the
GCS, dashboard and jobs) share the session id of the `ray start` process, so `kill_session(pid)` ends exactly that
node, raylet and all, and checks that nothing of it is left. Ports are free ones picked here (GCS, dashboard, client,
metrics, every node's manager and agent ports) plus a worker-port range per node, so several test clusters and other
Ray instances on the machine do not collide. `start_head` is shared by tests/test_job_submit.py,
tests/test_serve_cluster.py and tests/test_multinode.py (`Cluster`: a head and worker nodes with custom resources).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` ports free now on loopback that this process has not handed out before: the kernel may give a port again
    once its socket is closed, and a node whose GCS and agent got the same port does not start."""
    socks = []
    try:
        while len(socks) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in HANDED_OUT:
                s.close()
            else:
                socks.append(s)
                HANDED_OUT.add(s.getsockname()[1])
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (a node's `setsid` session: raylet, agents, workers; GCS etc. on a head)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int, gentle: bool = True) -> list[int]:
    """SIGTERM the session (unless not `gentle`), wait a little, SIGKILL what is left.  -> pids still alive (none
    expected)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))[0 if gentle else 1:]:
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
    return session_pids(sid)


def start_head(cpus: int, ports: list[int], low: int, prefix: str, resources: dict | None = None,
               env_extra: dict | None = None):
    """`ray start --head` on loopback with token authentication, on `ports` (GCS, dashboard, client, metrics) and
    worker ports low..low+199, with `resources` (custom resources) and `env_extra` (e.g. Ray's health-check
    settings).  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: `ray start --address` refuses to start a worker node when that
    variable holds anything but 1/true (CI's environment once held such a value), whatever the platform.
    -> (its process, its clients' environment, its temp dir, its open log file)"""
    port, dashboard, client, metrics = ports
    manager, objects, agent, agent_grpc, runtime_env = free_ports(5)  # not Ray's defaults: another instance has them
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "head.log", "w")
    extra = ["--resources", json.dumps(resources)] if resources else []
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
         "--metrics-export-port", str(metrics), "--node-manager-port", str(manager), "--object-manager-port",
         str(objects), "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env), "--min-worker-port", str(low), "--max-worker-port",
         str(low + 199), "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir", temp, "--disable-usage-stats",
         *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, env, temp, log


def start_worker(gcs: str, env: dict, cpus: int, resources: dict, temp: str, name: str):
    """`ray start --address GCS` (a worker node of the head at `gcs`) on loopback, its own ports, session and temp
    dir under `temp` (nodes sharing one would share the plasma store's socket path).  -> (its process, its log)"""
    manager, objects, metrics, agent, agent_grpc, runtime_env = free_ports(6)
    low = random.randrange(40000, 50000, 200)
    log = open(Path(temp) / f"{name}.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--address", gcs, "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
         "--num-gpus", "0", "--resources", json.dumps(resources), "--node-manager-port", str(manager),
         "--object-manager-port", str(objects), "--metrics-export-port", str(metrics),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env), "--min-worker-port", str(low),
         "--max-worker-port", str(low + 199), "--temp-dir", str(Path(temp) / name), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def wait_for_jobs(dashboard: str, token: str, head: subprocess.Popen, temp: str, seconds: float = 120) -> None:
    """Wait until the head accepts job submissions: its dashboard answers and a node's job agent has registered.
    A trivial job (`true`) goes through the jobs REST API until Ray stops answering 'No available agent to submit
    job' (its own advice: try again later); the agent comes up some seconds after the dashboard on a loaded
    machine. Fails at once, with the head's log (TEMP/head.log), when its `ray start` process exits."""
    deadline, body = time.time() + seconds, json.dumps({"entrypoint": "true"}).encode()
    # the head waits WAIT_AVAILABLE_AGENT_TIMEOUT (10 s) for its agent before it answers 500: wait longer than that
    while True:
        request = urllib.request.Request(f"{dashboard}/api/jobs/", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            assert head.poll() is None, f"ray start exited: {(Path(temp) / 'head.log').read_text()[-3000:]}"
            if time.time() > deadline:
                raise AssertionError(f"the Ray head at {dashboard} took no job in {seconds:.0f} s: {err}") from None
            time.sleep(1)


class Cluster:
    """A head and worker nodes on loopback (module docstring): `add(name, cpus, resources)` starts a worker node,
    `kill(name)` SIGKILLs a node's whole session at once (a node lost, raylet and all), `close()` stops what is
    left and reports any process that survived."""

    def __init__(self, cpus: int, resources: dict, env_extra: dict | None = None) -> None:
        self.ports = free_ports(4)
        self.head, self.env, self.temp, log = start_head(cpus, self.ports, random.randrange(20000, 30000, 200), "rm",
                                                         resources, env_extra)
        self.gcs, self.dashboard = f"127.0.0.1:{self.ports[0]}", f"http://127.0.0.1:{self.ports[1]}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.logs = [log]

    def add(self, name: str, cpus: int, resources: dict) -> None:
        proc, log = start_worker(self.gcs, self.env, cpus, resources, self.temp, name)
        self.nodes[name] = proc
        self.logs.append(log)

    def stop(self, name: str) -> None:
        """Stop a worker node (e.g. one whose start failed) and forget it."""
        proc = self.nodes.pop(name)
        kill_session(proc.pid)
        proc.wait(timeout=10)

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of the node's session.  -> pids left (none expected)"""
        return kill_session(self.nodes[name].pid, gentle=False)

    def log(self, name: str = "head") -> str:
        return (Path(self.temp) / f"{name}.log").read_text()[-3000:]

    def close(self) -> list[int]:
        """Stop the worker nodes, then the head (by session); remove the temp dir.  -> pids left running"""
        left = []
        for proc in [*self.nodes.values(), self.head]:
            left += kill_session(proc.pid)
            proc.wait(timeout=10)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
        return left
