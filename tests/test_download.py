"""Downloads against a loopback HTTP server (127.0.0.1 only): hashes, truncation, Range fetches."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from metalearn.data import download as download_module
from metalearn.data.download import download, read_url
from metalearn.data.sources import omniglot
from metalearn.data.sources.omniglot import load_omniglot
from metalearn.data.sources.quickdraw import (
    CATEGORIES,
    fetch_bitmap_rows,
    load_quickdraw,
    read_bitmap_file,
)
from metalearn.errors import DataError


class LoopbackServer:
    """Serves `files` (path -> bytes) with Range support; `truncated` paths lie about length,
    `no_length` paths come without Content-Length; `max_range` cuts Range replies short and
    `range_from_zero` serves every slice from byte 0 (a broken server; Content-Range says so)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.no_length: set[str] = set()
        self.max_range: int | None = None
        self.range_from_zero = False
        self.ignore_range = False  # a server without Range support: 200 and the whole file
        self.flaky: dict[str, int] = {}  # path -> how many more replies to cut short
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                status, rng = 200, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                rng = None if server.ignore_range else rng
                headers = {}
                if rng:
                    start, end = int(rng[1]), min(int(rng[2]), len(body) - 1)
                    if server.max_range is not None:
                        end = min(end, start + server.max_range - 1)
                    start, end = (0, end - start) if server.range_from_zero else (start, end)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
                    status, body = 206, body[start : end + 1]
                self.send_response(status)
                if self.path not in server.no_length:
                    cut = self.path in server.truncated or server.flaky.get(self.path, 0) > 0
                    server.flaky[self.path] = server.flaky.get(self.path, 0) - 1
                    claimed = len(body) * 2 if cut else len(body)
                    headers["Content-Length"] = str(claimed)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
                server.bytes_sent += len(body)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_retries(monkeypatch):
    """Failures fail at once here (a real download retries a failed transfer RETRIES times,
    waiting a second or two in between): test_a_transfer_cut_short_is_tried_again."""
    monkeypatch.setattr(download_module, "RETRIES", 0)


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def leftovers(folder):
    """What a download left in ``folder`` (a failed one removes the folders it made)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_download_with_hash(server, tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    server.files["/blob.bin"] = payload
    dest = download(
        server.url + "/blob.bin", tmp_path / "blob.bin", hashlib.sha256(payload).hexdigest()
    )
    assert dest.read_bytes() == payload
    assert leftovers(tmp_path) == ["blob.bin"]


def test_wrong_hash_leaves_nothing(server, tmp_path):
    server.files["/blob.bin"] = b"x" * 1000
    with pytest.raises(DataError, match="sha256"):
        download(server.url + "/blob.bin", tmp_path / "blob.bin", sha256="0" * 64)
    assert leftovers(tmp_path) == []


def test_md5_is_checked_too(server, tmp_path):
    payload = b"y" * 1000
    server.files["/blob.bin"] = payload
    with pytest.raises(DataError, match="md5"):
        download(server.url + "/blob.bin", tmp_path / "blob.bin", md5="0" * 32)
    assert leftovers(tmp_path) == []
    good = hashlib.md5(payload).hexdigest()
    assert download(server.url + "/blob.bin", tmp_path / "blob.bin", md5=good).exists()


def test_interrupted_transfer_leaves_nothing(server, tmp_path):
    server.files["/cut.bin"] = b"y" * 5000
    server.truncated.add("/cut.bin")
    with pytest.raises(DataError, match="interrupted"):
        download(server.url + "/cut.bin", tmp_path / "cut.bin")
    assert leftovers(tmp_path) == []


def test_a_transfer_cut_short_is_tried_again(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "RETRIES", 1)
    payload = np.random.default_rng(3).bytes(50_000)
    server.files["/flaky.bin"] = payload
    server.flaky["/flaky.bin"] = 1  # the first reply is cut short, the second is whole
    dest = download(
        server.url + "/flaky.bin", tmp_path / "flaky.bin", md5=hashlib.md5(payload).hexdigest()
    )
    assert dest.read_bytes() == payload and len(server.requests) == 2
    assert leftovers(tmp_path) == ["flaky.bin"]


def test_http_error_and_unreachable(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download(server.url + "/missing.bin", tmp_path / "missing.bin")
    closed_port = server.url.rsplit(":", 1)[1]
    server.httpd.shutdown()
    server.httpd.server_close()
    with pytest.raises(DataError, match="could not reach"):
        read_url(f"http://127.0.0.1:{closed_port}/x", timeout=2)
    assert leftovers(tmp_path) == []


def test_bitmap_range_fetch_reads_only_needed_rows(server, tmp_path):
    rows = np.random.default_rng(1).integers(0, 256, (500, 784), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, rows)
    full = buffer.getvalue()
    server.files["/bitmap/ice%20cream.npy"] = full
    dest = tmp_path / "ice cream.npy"
    got = fetch_bitmap_rows(server.url + "/bitmap/ice%20cream.npy", dest, 20)
    np.testing.assert_array_equal(got, rows[:20])
    np.testing.assert_array_equal(read_bitmap_file(dest, 20), rows[:20])
    assert all(r is not None and r.startswith("bytes=") for _, r in server.requests)
    assert server.bytes_sent <= 20 * 784 + 4096 < len(full)
    assert leftovers(tmp_path) == ["ice cream.npy"]


def test_short_or_misplaced_range_reply_is_a_data_error(server, tmp_path):
    rows = np.random.default_rng(2).integers(0, 256, (500, 784), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, rows)
    server.files["/bitmap/ice%20cream.npy"] = buffer.getvalue()
    url, dest = server.url + "/bitmap/ice%20cream.npy", tmp_path / "ice cream.npy"
    server.max_range = 4096  # the header probe still fits; the rows come back short
    with pytest.raises(DataError, match=r"'ice cream'.*sent 4096 bytes.*expected 15680.*Try again"):
        fetch_bitmap_rows(url, dest, 20)
    server.max_range, server.range_from_zero = None, True  # right length, wrong bytes
    with pytest.raises(DataError, match=r"asked for bytes 128-15807.*Content-Range 'bytes 0-15679"):
        fetch_bitmap_rows(url, dest, 20)
    assert leftovers(tmp_path) == []


def test_a_server_that_ignores_range_is_refused_before_the_whole_file(server, tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2000, 784), np.uint8))
    server.files["/bitmap/cat.npy"] = buffer.getvalue()
    server.ignore_range = True
    with pytest.raises(DataError, match="ignored the Range header"):
        fetch_bitmap_rows(server.url + "/bitmap/cat.npy", tmp_path / "cat.npy", 20)
    assert len(server.requests) == 1  # refused at the header probe's reply, its body unread
    assert leftovers(tmp_path) == []


def test_quickdraw_numpy_bitmap_download(server, tmp_path):
    for i, name in enumerate(CATEGORIES):
        buffer = io.BytesIO()
        np.save(buffer, np.full((8, 784), i % 256, np.uint8))
        server.files["/qd/" + urllib.parse.quote(name) + ".npy"] = buffer.getvalue()
    options = dict(quickdraw_format="numpy_bitmap", quickdraw_rows=3)
    splits = load_quickdraw(tmp_path, quickdraw_url=server.url + "/qd/", **options)
    assert [c.images.shape for _, c in splits.items()] == [(n, 3, 28, 28) for n in (207, 69, 69)]
    name = splits.val.names[0]
    assert (splits.val.images[0] == CATEGORIES.index(name) % 256).all()
    assert (tmp_path / "quickdraw" / "numpy_bitmap" / f"{name}.npy").exists()
    requests = len(server.requests)
    load_quickdraw(tmp_path, quickdraw_url=server.url + "/qd/", **options)  # now local: no fetch
    assert len(server.requests) == requests


def _official_zip(part: str, alphabets: int, chars: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for a in range(alphabets):
            for c in range(1, chars + 1):
                for d in range(1, 3):
                    png = io.BytesIO()
                    Image.fromarray(np.full((105, 105), 255, np.uint8)).convert("1").save(
                        png, "PNG"
                    )
                    archive.writestr(
                        f"{part}/{part[7:]}{a}/character{c:02d}/0001_{d:02d}.png", png.getvalue()
                    )
    return buffer.getvalue()


def _fake_official_zips(monkeypatch) -> dict[str, bytes]:
    """Small stand-ins for the official zips, with their md5 and class counts patched in."""
    pytest.importorskip("PIL", reason="Pillow is needed to read the official Omniglot zips")
    zips = {
        "images_background.zip": _official_zip("images_background", 40, 4),
        "images_evaluation.zip": _official_zip("images_evaluation", 2, 3),
    }
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in zips.items()}
    monkeypatch.setattr(omniglot, "ZIP_MD5", md5)
    monkeypatch.setattr(
        omniglot, "PART_CLASSES", {"images_background": 160, "images_evaluation": 6}
    )
    return zips


def test_omniglot_download_verifies_hashes(server, tmp_path, monkeypatch):
    zips = _fake_official_zips(monkeypatch)
    for name, data in zips.items():
        server.files[f"/omni/{name}"] = data
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in zips.items()}
    bad = dict(hashes, **{"images_background.zip": "f" * 64})
    with pytest.raises(DataError, match="sha256"):
        load_omniglot(tmp_path, base_url=server.url + "/omni/", zip_sha256=bad)
    assert not (tmp_path / "omniglot" / "images_background.zip").exists()
    splits = load_omniglot(tmp_path, base_url=server.url + "/omni/", zip_sha256=hashes)
    assert splits.test.num_classes == 6 and splits.train.num_classes + splits.val.num_classes == 160
    assert leftovers(tmp_path / "omniglot") == sorted(zips)


def test_offline_omniglot_says_where_to_put_files(tmp_path):
    with pytest.raises(DataError, match=r"could not reach(.|\n)*put images_background_28\.npz"):
        load_omniglot(tmp_path, base_url="http://127.0.0.1:9/")  # discard port: refused


def test_omniglot_mirror_is_md5_checked(server, tmp_path, monkeypatch):
    pytest.importorskip("PIL", reason="Pillow is needed to read the official Omniglot zips")
    mirror, target = server.url + "/mirror/", tmp_path / "omniglot"
    server.files["/mirror/images_background.zip"] = _official_zip("images_background", 40, 4)
    with pytest.raises(DataError, match=rf"{mirror}images_background\.zip has md5 .*Try again"):
        load_omniglot(tmp_path, base_url=mirror)  # not the published zip: refused on any URL
    assert leftovers(target) == []
    zips = _fake_official_zips(monkeypatch)  # now the published md5 is that of these zips
    for name, data in zips.items():  # cut short, and no Content-Length to tell
        server.files["/mirror/" + name] = data[: len(data) // 2]
        server.no_length.add("/mirror/" + name)
    with pytest.raises(DataError, match=r"images_background\.zip has md5 .*nothing was written"):
        load_omniglot(tmp_path, base_url=mirror)
    assert leftovers(target) == []
    for name, data in zips.items():
        server.files["/mirror/" + name] = data
    assert load_omniglot(tmp_path, base_url=mirror).test.num_classes == 6
    assert leftovers(target) == sorted(zips)


def test_failed_download_leaves_no_new_folders(tmp_path):
    dest = tmp_path / "new" / "omniglot" / "images_background.zip"
    with pytest.raises(DataError):
        download("http://127.0.0.1:9/images_background.zip", dest, timeout=5)
    assert list(tmp_path.iterdir()) == []
