"""`h2po serve` end to end: the real command in a subprocess (its own local Ray instance, Ray Serve's proxy on a free
loopback port, a bearer token), the tiny checkpoint of conftest.py on a copy of its catalog whose odd items' titles
carry `<script>` and `<img onerror>` markup, EASE and the two-tower beside it. One server for the module (about
30 s to start on 2 cores); then: answers with titles equal to `h2po retrieve`'s, bad input (malformed JSON, unknown
ids, k beyond the valid pool, a 10 MB body, no token), 1,000 concurrent connections from a bounded aiohttp loop
(every answer a valid list or a 503 with Retry-After; the server keeps serving), the hot swap of a newer
checkpoint while clients keep asking (no request dropped) and the refusal of another catalog's, and the try-it page
in headless Chromium. Run: `python -m pytest tests/test_serve.py -q` (about a minute and a half).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_catalog, make_tiny_model, write_tiny_checkpoint
from test_dashboard import free_port
from test_dashboard_browser import ARTIFACTS, browser, save_screenshot, wait_for  # noqa: F401

from app.cli import main
from learner.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "serve-test-token-0123456789"
MARKUP = "<script>window.__pwned=1</script>"
IMG = "<img src=x onerror=\"window.__pwned=2\">"
OPTIONS = ["serve.max_ongoing=4", "serve.max_queued=8", "serve.max_batch_size=8", "serve.replica_cpus=0.5",
           "serve.watch_s=0.5", "serve.ease_lambda=10"]


def marked_title(i: int, title: str) -> str:
    return f"{MARKUP}Item {i} {IMG}{title.removeprefix(f'Item {i}')}" if i % 2 else title


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`h2po serve` on the marked tiny checkpoint; yields (base URL, checkpoint path, process, log files)."""
    directory = tmp_path_factory.mktemp("serve")
    checkpoint = write_tiny_checkpoint(directory)
    items = pq.read_table(directory / "catalog" / "items.parquet")
    titles = [marked_title(i, t) for i, t in enumerate(items.column("title").to_pylist())]
    pq.write_table(items.set_column(items.schema.get_field_index("title"), "title", pa.array(titles)),
                   directory / "catalog" / "items.parquet")
    port = free_port()
    out, err = directory / "stdout.txt", directory / "stderr.txt"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(checkpoint),
                                    "--token", TOKEN, f"serve.port={port}", *OPTIONS], stdout=stdout, stderr=stderr,
                                   cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "try it:" not in out.read_text() and process.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "try it:" in out.read_text(), f"h2po serve did not start: {err.read_text()[-3000:]}"
        yield f"http://127.0.0.1:{port}/", checkpoint, process, (out, err)
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, which h2po serve takes as Ctrl-C (it shuts its Ray down), then the process group it leads if that
    hangs. Not SIGINT: a process started from a shell's background job (CI's) inherits SIGINT ignored."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


async def ask(session: aiohttp.ClientSession, url: str, body, headers: dict | None = None,
              token: bool = True) -> tuple[int, dict, object]:
    """(status, headers, JSON answer or text) of one POST (GET when body is None)."""
    headers = {**({"Authorization": f"Bearer {TOKEN}"} if token else {}), **(headers or {})}
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    method = session.get(url, headers=headers) if data is None else session.post(url, data=data, headers=headers)
    async with method as response:
        text = await response.text()
        try:
            return response.status, dict(response.headers), json.loads(text)
        except ValueError:
            return response.status, dict(response.headers), text


def run(coro):
    return asyncio.run(coro)


async def one(url: str, body=None, **kwargs):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await ask(session, url, body, **kwargs)


def test_answers_with_titles_as_retrieve_does(server, capsys, restore_threads):
    """The model's answer is `h2po retrieve --json`'s list (greedy sampling, the same checkpoint) with titles; the
    rivals answer on their prefixes; /health names the checkpoint, the catalog and S."""
    url, checkpoint, _, _ = server
    request = {"seeds": [101, 104], "k": 6, "constraints": [{"type": "exclude", "field": "genre", "value": "Horror"}]}
    status, _, got = run(one(url + "retrieve", request))
    assert status == 200 and got["method"] == "h2po" and len(got["items"]) == 6
    assert main(["retrieve", "--checkpoint", str(checkpoint), "--seeds", "101", "104", "--exclude", "genre=Horror",
                 "--k", "6", "--json"]) == 0
    assert got["items"] == json.loads(capsys.readouterr().out)["items"]
    for prefix, name in (("ease/", "EASE"), ("two-tower/", "two-tower")):
        status, _, rival = run(one(url + prefix + "retrieve", request))
        ids = [row["item_id"] for row in rival["items"]]
        assert status == 200 and rival["method"] == name and len(set(ids)) == 6 and not {101, 104} & set(ids)
    status, _, health = run(one(url + "health"))
    assert status == 200 and health["checkpoint"] == "most.safetensors" and health["steps"] == 10
    assert (health["device"], health["precision"]) == ("cpu", "fp32")  # serve.replica_gpus=0, the default
    assert health["catalog"] == make_tiny_catalog().fingerprint


def test_bad_input_gets_a_4xx_naming_it_and_serving_goes_on(server):
    """Malformed JSON 400, unknown id 422, k beyond the valid pool 422, a 10 MB body 413, no token 401, a wrong
    method 405; then a good request is still answered."""
    url = server[0] + "retrieve"
    cases = [(b"{\"seeds\": [1,", 400, "malformed JSON"), ({"seeds": [100, 99999]}, 422, "unknown item id 99999"),
             ({"seeds": [100], "k": 50}, 422, "only 49 items satisfy"),
             ({"seeds": [100], "k": 65}, 422, "k=65 is outside 1..64"),
             (b"{\"seeds\": [100], \"pad\": \"" + b"x" * 10_000_000 + b"\"}", 413, "over the limit of 1,000,000")]
    for body, status, words in cases:
        got, _, answer = run(one(url, body))
        assert got == status and words in answer["error"], (status, answer)
    got, headers, answer = run(one(url, {"seeds": [100]}, token=False))
    assert got == 401 and "token" in answer["error"] and headers["WWW-Authenticate"] == "Bearer"
    assert run(one(url))[0] == 405
    status, _, answer = run(one(url, [{"seeds": [100], "k": 3}, {"seeds": ["no such title"]}]))
    assert status == 200 and len(answer[0]["items"]) == 3 and "no item titled" in answer[1]["error"]


async def storm(url: str, n: int) -> list[tuple[int, dict, object]]:
    """n requests at once, one connection each (bounded: every request times out after 90 s)."""
    connector = aiohttp.TCPConnector(limit=n, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as session:
        bodies = [{"seeds": [100 + i % 50], "k": 5} for i in range(n)]
        return await asyncio.gather(*(ask(session, url, body) for body in bodies))


def test_a_thousand_connections_get_lists_or_a_retry_hint(server):
    """1,000 concurrent connections on a server taking 4 at once and queueing 8: every answer is a valid list (5
    distinct items, not the seed) or a 503 with Retry-After and a message; some of each; nothing crashes."""
    url, _, process, _ = server
    answers = run(storm(url + "retrieve", 1000))
    statuses = [status for status, _, _ in answers]
    for n, (status, headers, answer) in enumerate(answers):
        if status == 200:
            ids = [row["item_id"] for row in answer["items"]]
            assert len(set(ids)) == 5 and 100 + n % 50 not in ids and all(row["title"] for row in answer["items"])
        else:
            assert status == 503 and headers.get("Retry-After") == "1" and "queued" in str(answer), (status, answer)
    assert statuses.count(200) >= 12 and statuses.count(503) >= 1, {s: statuses.count(s) for s in set(statuses)}
    assert process.poll() is None and run(one(url + "health"))[0] == 200
    assert run(one(url + "retrieve", {"seeds": [100], "k": 5}))[0] == 200


async def keep_asking(url: str, stop: asyncio.Event, clients: int = 3) -> list[tuple[int, str]]:
    """(status, stamp) of every request of `clients` clients asking one after another until `stop`."""
    results: list[tuple[int, str]] = []

    async def client(session, c: int) -> None:
        while not stop.is_set():
            status, _, answer = await ask(session, url, {"seeds": [100 + c], "k": 5})
            results.append((status, answer.get("stamp") if isinstance(answer, dict) else str(answer)))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(session, c) for c in range(clients)))
    return results


async def swap_while_asking(url: str, swap, settled) -> list[tuple[int, str]]:
    """Clients ask while `swap()` replaces the checkpoint; they stop 1 s after `settled()` holds (at most 90 s)."""
    stop = asyncio.Event()
    clients = asyncio.create_task(keep_asking(url + "retrieve", stop))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(swap)
    deadline = time.time() + 90
    while not await asyncio.to_thread(settled) and time.time() < deadline:
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)
    stop.set()
    return await clients


def test_hot_swap_drops_no_request_and_refuses_another_catalog(server):
    """A newer checkpoint written over the served one (as training does, atomically) is swapped in while three
    clients keep asking: every request answered 200, first by the old weights, then by the new. A checkpoint of
    another catalog written there is refused with one line on stderr, and the new weights keep serving."""
    url, checkpoint, _, (_, err) = server
    old = run(one(url + "health"))[2]["stamp"]
    model, cfg, _ = load_checkpoint(checkpoint, make_tiny_catalog())
    catalog = make_tiny_catalog()

    def newer() -> None:
        save_checkpoint(checkpoint, make_tiny_model(catalog, seed=1), cfg, catalog, {"step": 1})

    results = run(swap_while_asking(url, newer, lambda: run(one(url + "health"))[2]["stamp"] != old))
    new = run(one(url + "health"))[2]["stamp"]
    assert new != old and {status for status, _ in results} == {200}, results[-5:]
    stamps = [stamp for _, stamp in results]
    assert stamps[0] == old and stamps[-1] == new and set(stamps) == {old, new}
    save_checkpoint(checkpoint, model, cfg, other_catalog(), {"step": 2})  # atomic, as training writes
    deadline = time.time() + 60
    while "another catalog" not in err.read_text() and time.time() < deadline:
        time.sleep(0.25)
    line = next(line for line in err.read_text().splitlines() if "another catalog" in line)
    assert line.startswith("h2po serve: refused:") and "still serving" in line
    assert run(one(url + "health"))[2]["stamp"] == new and run(one(url + "retrieve", {"seeds": [100]}))[0] == 200


def other_catalog():
    """The tiny catalog with every item id moved by 1000: another item index, another fingerprint."""
    from catalog.schema import Catalog

    base = make_tiny_catalog()
    return Catalog(item_ids=base.item_ids + 1000, titles=base.titles, attributes=base.attributes, years=base.years,
                   popularity=base.popularity, interactions=base.interactions, name="other")


ITEMS_JS = "return [...document.querySelectorAll('.column')].map(c => [...c.querySelectorAll('li')]" \
           ".map(li => li.textContent));"


@pytest.mark.slow
def test_try_page_lists_the_three_methods_with_titles_as_text(server, browser):  # noqa: F811
    """The try-it page in headless Chromium (token once in the URL, then its cookie): a seed picked through the
    completion (a title with markup), a constraint and k; the model's list equals the API's answer, EASE's and the
    two-tower's lists stand beside it, titles with `<script>`/`<img onerror>` show as text, nothing of them runs,
    and the Content-Security-Policy is never violated. Screenshot: artifacts/try.png."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = server[0]
    browser.get(f"{url}try?token={TOKEN}")
    wait_for(browser, lambda d: d.find_elements(By.ID, "seed-input"), 30, "the try-it page")
    seed = browser.find_element(By.ID, "seed-input")
    seed.send_keys("item 3")
    wanted = marked_title(3, "Item 3 (1971)")
    wait_for(browser, lambda d: wanted in d.execute_script(
        "return [...document.querySelectorAll('#seed-options option')].map(o => o.value);"), 30, "completion")
    seed.clear()
    seed.send_keys(wanted)
    browser.find_element(By.ID, "seed-add").click()
    browser.execute_script("document.getElementById('seed-input').value = 'Item 8 (2006)';")
    browser.find_element(By.ID, "seed-add").click()
    assert browser.execute_script("return [...document.querySelectorAll('#seeds li')].map(li => li.firstChild"
                                  ".textContent);") == [wanted, "Item 8 (2006)"]
    Select(browser.find_element(By.ID, "exclude-value")).select_by_value("genre=Horror")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("10")
    browser.find_element(By.ID, "go").click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.pending;") == "no", 60, "the lists")
    columns = browser.execute_script(ITEMS_JS)
    api = run(one(url + "retrieve", {"seeds": [103, "Item 8 (2006)"], "k": 10, "constraints": [
        {"type": "exclude", "field": "genre", "value": "Horror"}]}))[2]
    assert columns[0] == [row["title"] for row in api["items"]] and [len(c) for c in columns] == [10, 10, 10]
    assert any(MARKUP in title for column in columns for title in column)
    assert browser.execute_script("return typeof window.__pwned;") == "undefined"
    assert browser.execute_script("return document.querySelectorAll('main img, main script').length;") == 0
    assert browser.execute_script("return window.__cspViolations;") == []
    ARTIFACTS.mkdir(exist_ok=True)
    save_screenshot(browser, "try.png")
    assert (ARTIFACTS / "try.png").read_bytes().startswith(b"\x89PNG")


def test_gpus_the_cluster_lacks_are_one_line_before_anything_serves(tmp_path):
    """serve.replica_gpus beyond the local Ray instance's GPUs (64: more than any one machine here has) ends the
    command with one line naming the setting, instead of replicas waiting for ever to be placed."""
    checkpoint = write_tiny_checkpoint(tmp_path)
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(checkpoint),
                           f"serve.port={free_port()}", "serve.replica_gpus=64", "serve.rivals=[]"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"},
                          timeout=180)
    problem = [line for line in done.stderr.splitlines() if "serve.replica_gpus" in line]
    assert done.returncode != 0 and "try it:" not in done.stdout
    assert len(problem) == 1 and "asks for 64 GPUs and the Ray cluster has" in problem[0], done.stderr[-2000:]
