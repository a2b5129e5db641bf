"""Atomic, verified HTTP downloads with urllib only.

`download` streams into a temp file next to `dest`, checks the length (and a Range reply's
Content-Range, the sha256/md5 when given) and only then renames it into place, so `dest` is either
complete or absent. Every failure (offline, HTTP error, interrupted transfer, wrong slice, hash
mismatch) is a DataError; callers add which files to put where.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from metalearn.errors import DataError

CHUNK = 1 << 16
USER_AGENT = "metalearn-data/0.1"


def _open(url: str, byte_range: tuple[int, int] | None, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DataError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise DataError(f"could not reach {url} (offline or blocked?): {err}") from err


def _expected_length(response, url: str, byte_range: tuple[int, int] | None) -> int | None:
    """Bytes to read: Content-Length, clipped to the range when a server ignored the Range."""
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None else None
    if byte_range is None:
        return length
    if response.status == 206:
        return _check_content_range(response, url, byte_range, length)
    if byte_range[0] != 0:  # a 200 reply to a Range request carries the whole file
        raise DataError(f"{url}: the server ignored the Range header; cannot fetch a slice")
    wanted = byte_range[1] + 1
    return wanted if length is None else min(wanted, length)


def _check_content_range(response, url: str, byte_range: tuple[int, int], length: int | None):
    """A 206 reply's Content-Range (when sent) must start where asked, end no later, and agree
    with Content-Length; returns the byte count to read (a shorter slice is the caller's to judge).
    """
    header = response.headers.get("Content-Range")
    if header is None:
        return length
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    span = int(match[2]) - int(match[1]) + 1 if match else None
    if (
        match is None
        or int(match[1]) != byte_range[0]
        or int(match[2]) > byte_range[1]
        or (length is not None and length != span)
    ):
        raise DataError(
            f"{url}: asked for bytes {byte_range[0]}-{byte_range[1]}, the server replied with"
            f" Content-Range {header!r} and Content-Length {length}: not that slice. Try again"
            " later, or use another server"
        )
    return span


def _stream(url: str, out, byte_range, timeout: float) -> int:
    """Copy the response body to `out`; returns the byte count or raises DataError."""
    with _open(url, byte_range, timeout) as response:
        expected = _expected_length(response, url, byte_range)
        done = 0
        try:
            while expected is None or done < expected:
                want = CHUNK if expected is None else min(CHUNK, expected - done)
                chunk = response.read(want)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
        except (OSError, http.client.HTTPException) as err:
            raise DataError(f"download of {url} was interrupted after {done} bytes: {err}") from err
    if expected is not None and done != expected:
        raise DataError(
            f"download of {url} was interrupted: got {done} of {expected} bytes; try again"
        )
    return done


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    byte_range: tuple[int, int] | None = None,
    timeout: float = 60.0,
    md5: str | None = None,
) -> Path:
    """Fetch `url` (optionally only bytes byte_range[0]..byte_range[1], inclusive) into `dest`.

    If `sha256` (or a published `md5`) is given the content must match it. On any failure the
    temp file is removed and a DataError is raised; `dest` is only ever replaced by a complete,
    verified file.
    """
    dest = Path(dest)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            hasher = _HashingWriter(out)
            _stream(url, hasher, byte_range, timeout)
            out.flush()
            os.fsync(out.fileno())
        _check_hash(url, dest, "sha256", hasher.hexdigest(), sha256)
        _check_hash(url, dest, "md5", hasher.md5.hexdigest(), md5)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        for folder in created:  # deepest first: leave no folders behind that this call made
            folder.rmdir()
        raise
    return dest


def _check_hash(url: str, dest: Path, kind: str, got: str, want: str | None) -> None:
    if want is not None and got != want.lower():
        raise DataError(
            f"download of {url} has {kind} {got}, expected {want}: the file is truncated, corrupt"
            f" or not the expected one (changed upstream, or a bad mirror); nothing was written to"
            f" {dest}. Try again, or fetch {dest.name} from its official source"
        )


def read_url(url: str, byte_range: tuple[int, int] | None = None, timeout: float = 60.0) -> bytes:
    """The (partial) body of `url` in memory, with the same checks as `download`."""
    sink = _Buffer()
    _stream(url, sink, byte_range, timeout)
    return bytes(sink.data)


class _HashingWriter:
    def __init__(self, out):
        self.out, self.sha, self.md5 = out, hashlib.sha256(), hashlib.md5()

    def write(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.md5.update(chunk)
        self.out.write(chunk)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class _Buffer:
    def __init__(self):
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk
