"""Tests of fetching MovieLens (catalog/movielens.py `download`, `locate`) against a local HTTP server.

A zip in the official layout (`ml-latest-small/<file>`) is built from the real CSVs and served by Python's
http.server on 127.0.0.1 (port 0) in a thread; nothing leaves the machine. H2PO_CACHE points into tmp_path so
the user's real cache is never touched. Skips when the real CSVs are absent.
Run: `python -m pytest tests/test_download.py -q`.
"""

from __future__ import annotations

import functools
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from catalog import movielens
from catalog.movielens import DATASET, REQUIRED, SHA256, download, locate, sha256
from catalog.schema import CatalogError


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Never read or write the user's cache or rely on their H2PO_MOVIELENS."""
    monkeypatch.setenv("H2PO_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.delenv("H2PO_MOVIELENS", raising=False)


@pytest.fixture(scope="module")
def source() -> Path:
    """The real CSV directory (found without consulting any cache)."""
    for path in movielens.candidates()[:-1]:  # env and ../shared/data candidates; not the cache
        if all((path / name).is_file() for name in SHA256):
            return path
    pytest.skip("MovieLens ml-latest-small CSVs not available")


def make_zip(source: Path, replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> bytes:
    """The official archive layout, with files optionally replaced or left out."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in SHA256:
            if name in drop:
                continue
            data = (replace or {}).get(name) or (source / name).read_bytes()
            archive.writestr(f"{DATASET}/{name}", data)
    return buf.getvalue()


@pytest.fixture
def serve(tmp_path):
    """serve(name, data) -> URL of `data` on a local HTTP server (shut down after the test)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def publish(name: str, data: bytes) -> str:
        (root / name).write_bytes(data)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    publish.server = server
    yield publish
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_download_installs_verified_files(source, serve, tmp_path):
    url = serve("ml-latest-small.zip", make_zip(source))
    dest = tmp_path / "dest"
    target = download(dest, url=url, timeout=10, progress=False)
    assert target == dest / DATASET
    assert leftovers(dest) == [DATASET]  # no staging folder left behind
    assert sorted(p.name for p in target.iterdir()) == sorted(SHA256)
    for name, digest in SHA256.items():
        assert sha256(target / name) == digest
    assert locate(str(target)) == target
    # a verified install is not fetched again: it works with the server gone
    serve.server.shutdown()
    serve.server.server_close()
    assert download(dest, url=url, timeout=2, progress=False) == target


def test_download_default_destination_is_cache(source, serve, tmp_path):
    url = serve("ml.zip", make_zip(source))
    target = download(url=url, timeout=10, progress=False)
    assert target == tmp_path / "user-cache" / DATASET
    assert locate() in (target, *movielens.candidates()[:-1])  # found (the cache is a candidate too)
    assert movielens.candidates()[-1] == target


def test_download_replaces_damaged_install(source, serve, tmp_path):
    dest = tmp_path / "dest"
    (dest / DATASET).mkdir(parents=True)
    (dest / DATASET / "movies.csv").write_text("damaged")
    (dest / DATASET / "stale.txt").write_text("old")
    target = download(dest, url=serve("ml.zip", make_zip(source)), timeout=10, progress=False)
    assert sha256(target / "movies.csv") == SHA256["movies.csv"]
    assert not (target / "stale.txt").exists()


def test_corrupted_file_is_rejected(source, serve, tmp_path):
    movies = bytearray((source / "movies.csv").read_bytes())
    movies[1000] ^= 0x01  # one flipped bit; the zip itself is consistent
    url = serve("ml.zip", make_zip(source, replace={"movies.csv": bytes(movies)}))
    dest = tmp_path / "dest"
    with pytest.raises(CatalogError, match="checksum mismatch for movies.csv.*not installed"):
        download(dest, url=url, timeout=10, progress=False)
    assert leftovers(dest) == []  # neither the dataset nor a staging folder


def test_archive_damaged_in_transit_is_rejected(source, serve, tmp_path):
    """Bytes flipped inside the compressed data of ratings.csv (bad deflate stream or bad CRC)."""
    data = bytearray(make_zip(source))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo(f"{DATASET}/ratings.csv")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for offset in range(start + info.compress_size // 2, start + info.compress_size // 2 + 64):
        data[offset] ^= 0xFF
    dest = tmp_path / "dest"
    with pytest.raises(CatalogError, match="checksum mismatch for ratings.csv.*not installed"):
        download(dest, url=serve("ml.zip", bytes(data)), timeout=10, progress=False)
    assert leftovers(dest) == []


def test_archive_missing_a_file(source, serve, tmp_path):
    url = serve("ml.zip", make_zip(source, drop=("links.csv",)))
    with pytest.raises(CatalogError, match=f"lacks {DATASET}/links.csv"):
        download(tmp_path / "dest", url=url, timeout=10, progress=False)
    assert leftovers(tmp_path / "dest") == []


def test_not_a_zip(serve, tmp_path):
    url = serve("page.html", b"<html>Please log in</html>")
    with pytest.raises(CatalogError, match="did not return a zip archive"):
        download(tmp_path / "dest", url=url, timeout=10, progress=False)
    assert leftovers(tmp_path / "dest") == []


@pytest.mark.parametrize("server_up", [False, True], ids=["connection-refused", "http-404"])
def test_unreachable_server_says_how_to_get_the_data(serve, tmp_path, server_up):
    if server_up:
        url = serve("other.zip", b"x").replace("other.zip", "missing.zip")
    else:
        url = f"http://127.0.0.1:{closed_port()}/ml-latest-small.zip"
    with pytest.raises(CatalogError) as info:
        download(tmp_path / "dest", url=url, timeout=5, progress=False)
    message = str(info.value)
    assert f"could not download {url}" in message
    assert "unzip it" in message and "data.movielens=DIR" in message and "H2PO_MOVIELENS=DIR" in message
    assert not (tmp_path / "dest" / DATASET).exists()


def test_locate_lists_where_it_looked(tmp_path, monkeypatch):
    """Nothing anywhere: the error names every candidate, in order, and `h2po data download`."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("H2PO_MOVIELENS", str(empty))
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    # pretend the repository lives in tmp_path, so ../shared/data beside it does not exist either
    monkeypatch.setattr(movielens, "__file__", str(tmp_path / "repo" / "catalog" / "movielens.py"))
    expected = [empty, Path.cwd().parent / "shared" / "data" / DATASET, tmp_path / "shared" / "data" / DATASET,
                tmp_path / "user-cache" / DATASET]
    assert movielens.candidates() == expected
    with pytest.raises(CatalogError) as info:
        locate()
    message = str(info.value)
    assert "not found. Looked in:" in message
    positions = [message.index(f"\n  {p}\n") for p in expected]
    assert positions == sorted(positions)
    assert "`h2po data download`" in message and str(tmp_path / "user-cache") in message


def test_locate_explicit_path_missing(tmp_path):
    with pytest.raises(CatalogError, match=r"nope is not an ml-latest-small directory \(missing README\.txt, "
                                           r"movies\.csv, ratings\.csv, tags\.csv\)"):
        locate(str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in REQUIRED[:2]:
        (partial / name).write_text("x")
    with pytest.raises(CatalogError, match=r"missing ratings\.csv, tags\.csv\)"):
        locate(str(partial))


def test_locate_order(source, tmp_path, monkeypatch):
    """An explicit path beats H2PO_MOVIELENS, which beats ../shared/data and the cache."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in REQUIRED:
        (copy / name).symlink_to(source / name)
    monkeypatch.setenv("H2PO_MOVIELENS", str(copy))
    assert locate() == copy
    assert locate(str(source)) == source
