"""Tests of the dashboard: the metrics feed, figures and panels from records, the report, the server's API and the
Ray gauges seen through Ray's own metrics endpoint (the page in a real browser: tests/test_dashboard_browser.py).

Most tests use a synthetic feed written with `MetricsLog` (`write_feed`: 6 steps of 2 rollout actors, two rewards,
evaluations of H2PO over steps and of two baselines, restarts, a sample) - a second or so each. The Ray test
starts its own local Ray (1 CPU, a free metrics port; about 25 s: Ray exports every few seconds).
Run: `python -m pytest tests/test_dashboard.py -q`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.cli import main
from core.errors import UserError
from dashboard.charts import CHARTS, build_figures, latest_steps
from dashboard.feed import METRICS_FILE, MetricsLog, read_records
from dashboard.panels import build_panels
from dashboard.report import write_report
from dashboard.server import start_dashboard

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
ARTIFACTS = ROOT / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCRIPT_TITLE = "<script>window.__pwned=1</script>"
IMG_MESSAGE = "actor died: <img src=x onerror=\"window.__pwned=2\">"
BOLD_REWARD = "<b>bold</b>"
IMG_TAG = "<img src=x onerror=\"window.__pwned=2\">"
MARKED_SUFFIX = f" {SCRIPT_TITLE} {IMG_TAG}"  # appended to every title of the live test's catalog


def write_feed(run_dir: Path, steps: int = 6, first: int = 1, ray_metrics: bool = False) -> MetricsLog:
    """A run record, baselines, then `steps` step records (2 actors; H2PO eval, a restart and a sample every 2)."""
    log = MetricsLog(run_dir, ray_metrics=ray_metrics)
    if first == 1:
        log.write("run", run=run_dir.name, mode="async", steps=first + steps - 1, learners=2, rollout_actors=2,
                  zero_stage=2, rewards=["ndcg", BOLD_REWARD], resumed_from=0)
        for method, value in (("EASE", 0.36), ("MOST", 0.33)):
            log.write("eval", step=None, method=method, split="val", family="A", metrics={"ndcg@10": value})
    for s in range(first, first + steps):
        log.write("step", step=s, version=s, actors=[{"actor": 0, "lists_per_s": 40.0 + s, "version": s - 1},
                                                     {"actor": 1, "lists_per_s": 30.0, "version": s}],
                  staleness={"0": 1, "1": 3}, **{
                      "reward/ndcg": 0.1 * s, f"reward/{BOLD_REWARD}": 0.5, "reward/total": 0.3 + 0.1 * s,
                      "loss/total": 1.0 / s, "loss/on": -0.01, "loss/off": 0.6, "loss/anchor": 6.0, "kl": 0.01 * s,
                      "ppo/clip_fraction": 0.05, "ppo/dropped_share": 0.01, "buffer/waiting": 2, "batch/on": 2,
                      "batch/off": 2, "time/step": 0.6, "time/train": 0.5, "time/rollout": 0.05, "time/sync": 0.01,
                      "learner/idle_fraction": 1 / 6})
        if s % 2 == 0:
            log.write("eval", step=s, method="H2PO", split="val", family="A", metrics={"ndcg@10": 0.33 + 0.01 * s})
            log.write("event", event="restart", actor=1, step=s, message=IMG_MESSAGE)
            log.write("sample", step=s, request="{'k': 3}", seeds=[SCRIPT_TITLE, "Alien (1979)"],
                      list=["Aliens (1986)", "Blade Runner (1982)", SCRIPT_TITLE], reward=1.5)
    return log


def results_json(run_dir: Path) -> None:
    """A results.json of two groups and three methods, in the layout `app.pipeline.run_evaluation` writes."""
    def summary(v: float, vs: bool) -> dict:
        out = {"n": 40, "ndcg@10": v, "ndcg@10_ci": [v - 0.02, v + 0.02], "recall_min@10": v / 2, "coverage": 0.1}
        return {**out, "ndcg@10_vs_EASE": v - 0.3, "ndcg@10_vs_EASE_ci": [v - 0.32, v - 0.28]} if vs else out
    results = {g: {"EASE": summary(0.3, False), "MOST": summary(0.31, True), "H2PO": summary(0.34, True)}
               for g in ("A", "B")}
    (run_dir / "results.json").write_text(json.dumps({"results": results}))


def test_feed_round_trip_skips_a_torn_line(tmp_path):
    """Records come back as written (NaN as null); a last line without its newline is left for the next read,
    and a line torn by a crash before a restart's lines is skipped."""
    log = MetricsLog(tmp_path, ray_metrics=False)
    log.write("step", step=1, **{"loss/on": 0.5, "kl": float("nan")})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"kind": "step", "step": 2, "loss')  # a torn last line
    records, offset = read_records(tmp_path)
    assert [(r["step"], r["loss/on"], r["kl"]) for r in records] == [(1, 0.5, None)]
    assert read_records(tmp_path, offset) == ([], offset)
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write("\n")  # the crash happened; a restart appends its own lines after the torn one
    log.write("step", step=2, **{"loss/on": 0.25})
    records, _ = read_records(tmp_path, offset)
    assert [(r["step"], r["loss/on"]) for r in records] == [(2, 0.25)]


def test_every_chart_has_data_and_names_are_escaped(tmp_path):
    """The synthetic feed fills every chart; a resumed step's last record wins; a reward name holding markup
    reaches the figure escaped; baselines are flat lines over the steps."""
    write_feed(tmp_path)
    MetricsLog(tmp_path, ray_metrics=False).write("step", step=6, version=6, staleness={"1": 2},
                                                  **{"loss/total": 9.0})  # a resumed run repeats step 6
    records, _ = read_records(tmp_path)
    figures = build_figures(records)
    assert list(figures) == list(CHARTS)
    for name, figure in figures.items():
        assert any(y is not None for trace in figure["data"] for y in trace.get("y", [])), name
    losses = {t["name"]: t["y"] for t in figures["losses"]["data"]}
    assert losses["loss/total"][-1] == 9.0 and losses["loss/on"][-1] is None
    names = [t["name"] for t in figures["rewards"]["data"]]
    assert "reward/&lt;b&gt;bold&lt;/b&gt;" in names and not any("<b>" in n for n in names)
    ease = next(t for t in figures["eval"]["data"] if t["name"] == "EASE A")
    assert ease["x"] == [1, 6] and ease["y"] == [0.36, 0.36]
    staleness = figures["staleness"]["data"]
    assert staleness[0]["y"] == [5, 17] and staleness[1]["y"] == [0, 2]  # 5 steps of (1, 3), then (0, 2)
    assert [t["name"] for t in figures["throughput"]["data"]] == ["actor 0", "actor 1"]


def test_panels_show_status_events_sample_and_comparison(tmp_path):
    write_feed(tmp_path)
    results_json(tmp_path)
    records, _ = read_records(tmp_path)
    panels = build_panels(records, latest_steps(records), tmp_path)
    assert (panels["status"], panels["step"], panels["version"]) == ("running", 6, 6)
    assert [e["step"] for e in panels["events"]] == [6, 4, 2] and panels["events"][0]["message"] == IMG_MESSAGE
    assert panels["sample"]["seeds"][0] == SCRIPT_TITLE
    table = panels["comparison"][0]
    assert table["group"] == "A" and table["header"][-1] == "ΔNDCG@10 vs EASE [95% CI]"
    assert table["rows"][2][:2] == ["H2PO", "0.340 [0.320, 0.360]"] and table["rows"][0][-1] == "-"
    old = [{**r, "time": r["time"] - 3600} for r in records]  # the same run, its last record an hour ago
    panels = build_panels(old, latest_steps(old), tmp_path)
    assert panels["status"] == "silent" and any(label == "silent for" for label, _ in panels["facts"])
    MetricsLog(tmp_path, ray_metrics=False).write("end", status="failed", message="learner rank 1 died")
    panels = build_panels(read_records(tmp_path)[0], [], tmp_path)
    assert panels["status"] == "failed" and ("end", "learner rank 1 died") in panels["facts"]


def test_report_is_self_contained_and_escapes_data(tmp_path):
    """report.html: plotly.js inlined (no src/href to any URL), every figure inlined, data text escaped."""
    write_feed(tmp_path)
    results_json(tmp_path)
    path = write_report(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.html" and len(text) > 3_000_000  # plotly.min.js is ~4.8 MB
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", text, re.I)
    assert SCRIPT_TITLE not in text and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text
    assert "<img" not in text and "&lt;img src=x onerror=" in text
    figures = json.loads(re.search(r'<script type="application/json" id="h2po-figures">(.*?)</script>', text,
                                   re.S).group(1))
    assert set(figures) == set(CHARTS) and "H2PO" in text and "0.340 [0.320, 0.360]" in text


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_server_serves_page_assets_and_changes(tmp_path):
    """Loopback by default; the page, plotly.js and its script are served; a poll with the current version gets
    only the version back, and new records change it."""
    write_feed(tmp_path, steps=2)
    handle = start_dashboard(tmp_path)
    try:
        assert handle.url.startswith("http://127.0.0.1:")
        page = fetch(handle.url).decode()
        assert '<script src="plotly.min.js">' in page and 'id="chart-rewards"' in page
        assert len(fetch(handle.url + "plotly.min.js")) > 3_000_000 and b"Plotly.react" in fetch(
            handle.url + "static/page.js")
        state = json.loads(fetch(handle.url + "api/state"))
        assert set(state["figures"]) == set(CHARTS) and 'id="latest-step">2<' in state["html"]["summary"]
        assert json.loads(fetch(f"{handle.url}api/state?since={state['version']}")) == {"version": state["version"]}
        write_feed(tmp_path, steps=1, first=3)
        newer = json.loads(fetch(f"{handle.url}api/state?since={state['version']}"))
        assert newer["version"] != state["version"] and 'id="latest-step">3<' in newer["html"]["summary"]
    finally:
        handle.stop()
    assert not handle.thread.is_alive()


TOKEN = "test-token-0123456789abcdef"


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_loopback_needs_no_token_and_pages_carry_security_headers(tmp_path):
    """The default (127.0.0.1, no token) serves without one; every response, 404s too, has a CSP that allows
    scripts from the server only, and nosniff."""
    write_feed(tmp_path, steps=1)
    handle = start_dashboard(tmp_path)
    try:
        assert "token" not in handle.url
        for path, status in (("", 200), ("api/state", 200), ("static/page.js", 200), ("report.html", 404),
                             ("static/nothing", 404)):
            code, headers, _ = get(handle.url + path)
            assert code == status, path
            policy = headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self';" in policy, path
            assert "'unsafe-eval'" not in policy and "frame-ancestors 'none'" in policy, path
            assert headers["X-Content-Type-Options"] == "nosniff", path
    finally:
        handle.stop()


def test_beyond_loopback_a_token_is_required_and_printed(tmp_path, capsys, monkeypatch):
    """0.0.0.0: a generated token in the printed URL (this machine's address, not localhost) and a one-line warning;
    401 without the token or with a wrong one; 200 with ?token= (which sets a cookie), the cookie, or a bearer."""
    monkeypatch.delenv("H2PO_DASHBOARD_TOKEN", raising=False)
    write_feed(tmp_path, steps=1)
    handle = start_dashboard(tmp_path, host="0.0.0.0")
    try:
        url, _, token = handle.url.partition("?token=")
        assert len(token) >= 30 and not url.startswith("http://localhost")
        warning = capsys.readouterr().err.strip()
        assert "\n" not in warning and "beyond loopback" in warning and "0.0.0.0" in warning
        local = f"http://127.0.0.1:{url.rsplit(':', 1)[1]}"  # the test reaches it over loopback
        for path in ("", "api/state", "plotly.min.js", "static/page.js", "report.html"):
            assert get(local + path)[0] == 401, path
        assert get(local + "?token=" + token[:-1] + "x")[0] == 401
        assert get(local + "api/state", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        code, headers, body = get(local + "?token=" + token)
        assert code == 200 and b'id="chart-rewards"' in body and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert get(local + "api/state", {"Cookie": cookie})[0] == 200
        assert get(local + "api/state", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        handle.stop()


def test_token_from_the_environment_and_a_malformed_one(tmp_path, monkeypatch):
    write_feed(tmp_path, steps=1)
    monkeypatch.setenv("H2PO_DASHBOARD_TOKEN", TOKEN)
    handle = start_dashboard(tmp_path)  # loopback, but a token was asked for: it is required
    try:
        assert handle.url.endswith(f"?token={TOKEN}") and get(handle.url.split("?")[0])[0] == 401
        assert get(handle.url)[0] == 200
    finally:
        handle.stop()
    with pytest.raises(UserError, match="16..200 URL-safe characters"):
        start_dashboard(tmp_path, token="short")


def test_report_symlinked_out_of_the_run_directory_is_refused(tmp_path):
    """report.html linking to a file outside the run directory: 403, its content not sent; a real report is served
    with a CSP naming its inline scripts by hash (no 'unsafe-inline' scripts)."""
    run = tmp_path / "run"
    write_feed(run, steps=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    (run / "report.html").symlink_to(secret)
    handle = start_dashboard(run)
    try:
        code, _, body = get(handle.url + "report.html")
        assert code == 403 and b"not for the page" not in body
        (run / "report.html").unlink()
        write_report(run)
        code, headers, body = get(handle.url + "report.html")
        policy = headers["Content-Security-Policy"]
        assert code == 200 and policy.count("'sha256-") == 2 and "script-src 'self'" not in policy
    finally:
        handle.stop()


def test_cli_dashboard_needs_a_feed_and_writes_the_report(tmp_path, capsys):
    assert main(["dashboard", "--run", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    write_feed(tmp_path)
    assert main(["dashboard", "--run", str(tmp_path), "--report"]) == 0
    assert (tmp_path / "report.html").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_urls_leave_out_nodes_without_a_metrics_agent():
    """Ray without its `default` extra (as on the GPU machine of docs/results.md) reports MetricsExportPort -1: no
    URL with port -1 is printed, and a cluster with no endpoint at all says so."""
    from actors.monitor import metrics_urls

    nodes = [{"NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 8080, "Alive": True},
             {"NodeManagerAddress": "10.0.0.3", "MetricsExportPort": -1, "Alive": True},
             {"NodeManagerAddress": "10.0.0.4", "MetricsExportPort": 8081, "Alive": False}]
    assert metrics_urls(nodes) == "http://10.0.0.2:8080/metrics"
    assert metrics_urls(nodes[1:]).startswith("none (")
    assert ":-1" not in metrics_urls(nodes[1:])


@pytest.mark.slow
def test_ray_gauges_reach_rays_metrics_endpoint(tmp_path):
    """Step records written by a Ray driver appear on Ray's Prometheus endpoint as `ray_h2po_*` gauges (Ray
    prefixes application metrics with `ray_`), tagged with the run and, per rollout actor, the actor."""
    import ray

    assert not ray.is_initialized()
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port)
    try:
        run = tmp_path / "gauged"
        write_feed(run, steps=2, ray_metrics=True)
        expected = [r'ray_h2po_loss_on{.*run="gauged".*} -0.01', r'ray_h2po_reward_total{.*run="gauged".*} 0.5',
                    r'ray_h2po_rollout_lists_per_s{.*actor="0".*run="gauged".*} 42.0']
        deadline, text = time.time() + 60, ""
        while time.time() < deadline:
            try:
                text = fetch(f"http://127.0.0.1:{port}/metrics").decode()
            except OSError:
                text = ""
            if all(re.search(pattern, text) for pattern in expected):
                break
            time.sleep(1)
        missing = [p for p in expected if not re.search(p, text)]
        assert not missing, f"{missing} not exported; h2po lines: {[x for x in text.splitlines() if 'h2po' in x]}"
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(monkeypatch):
    """The local Ray that `connect_ray` starts: node address 127.0.0.1, and its Prometheus metrics endpoint answers
    on loopback but refuses a connection to this machine's outward address (about 15 s)."""
    import ray
    from ray._private import ray_constants

    from actors.driver import LOOPBACK_ENV, connect_ray
    from core.config import SystemConfig
    from dashboard.server import reachable_address

    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(LOOPBACK_ENV, os.environ.get(LOOPBACK_ENV, "0"))  # restored after the test
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    assert connect_ray(SystemConfig(ray_cpus=1))
    try:
        node = ray.nodes()[0]
        port = node["MetricsExportPort"]
        assert node["NodeManagerAddress"] == "127.0.0.1"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                assert b"# HELP" in fetch(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"no metrics endpoint on 127.0.0.1:{port}")
        outward = reachable_address()
        if outward[0].isdigit():  # a machine with an outward IPv4 address
            with pytest.raises(ConnectionRefusedError), socket.create_connection((outward, port), timeout=5):
                pass
    finally:
        ray.shutdown()
