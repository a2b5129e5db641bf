"""Verified HTTP downloads: whole files with pooch, byte ranges with fsspec.

`download` fetches a whole file (the Omniglot zips) through pooch, which streams it into a temp
file beside `dest` (with a progress bar on a terminal), retries a failed transfer and only then
moves it into place, so `dest` is either complete and verified or absent. Every hash given (the
published md5, a sha256) is checked before that move.

`read_url` reads one byte range (Quick Draw's .npy header, then only the rows needed) through
fsspec's HTTP filesystem. fsspec does not look at what a server answers to a Range request (a
200 with the whole file, or a 206 with another slice, would pass), so each reply's status and
Content-Range are checked as its headers arrive, before any of its body is read.

Every failure (offline, HTTP error, interrupted transfer, wrong slice, hash mismatch) is a
DataError; callers add which files to put where.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

from metalearn.errors import DataError

USER_AGENT = "metalearn-data/0.1"
RETRIES = 2  # a failed whole-file download (cut short, wrong bytes) is tried this often again


class _HashMismatch(ValueError):
    """Raised inside pooch's download loop: pooch retries it and removes the temp file."""


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    retries: int | None = None,
) -> Path:
    """Fetch `url` into `dest`. If `sha256` (or a published `md5`) is given the content must
    match it. On any failure nothing is left behind (not even folders this call made) and a
    DataError is raised; `dest` is only ever replaced by a complete, verified file."""
    import pooch

    dest = Path(dest)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    wanted = {"sha256": sha256, "md5": md5}

    def fetch_and_verify(url: str, tmp: str, cache) -> None:
        progress = sys.stderr.isatty()  # a bar on a terminal, no bar lines in a job's log
        fetch = pooch.HTTPDownloader(progress, timeout=timeout, headers={"User-Agent": USER_AGENT})
        fetch(url, tmp, cache)
        for kind, want in wanted.items():
            got = pooch.file_hash(tmp, alg=kind) if want is not None else None
            if got is not None and got != want.lower():
                raise _HashMismatch(_hash_message(url, dest, kind, got, want))

    files = pooch.create(
        path=dest.parent,
        base_url="",
        registry={dest.name: None},  # hashes: checked by fetch_and_verify, all of them
        urls={dest.name: url},
        retry_if_failed=RETRIES if retries is None else retries,
    )
    try:
        files.fetch(dest.name, downloader=fetch_and_verify)
    except BaseException as err:
        for folder in created:  # deepest first: leave no folders behind that this call made
            if folder.exists():
                folder.rmdir()
        error = _data_error(url, err)
        if error is None:
            raise
        raise error from err
    return dest


def _hash_message(url: str, dest: Path, kind: str, got: str, want: str) -> str:
    return (
        f"download of {url} has {kind} {got}, expected {want}: the file is truncated, corrupt"
        f" or not the expected one (changed upstream, or a bad mirror); nothing was written to"
        f" {dest}. Try again, or fetch {dest.name} from its official source"
    )


def _data_error(url: str, err: BaseException) -> DataError | None:
    """The DataError for what went wrong in a transfer (None: not a transfer's failure)."""
    import requests

    if isinstance(err, DataError):
        return err
    if isinstance(err, _HashMismatch):
        return DataError(str(err))
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return DataError(
            f"download of {url} failed: HTTP {err.response.status_code} {err.response.reason}"
        )
    if isinstance(
        err, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
    ):
        return DataError(f"download of {url} was interrupted ({err}); try again")
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return DataError(f"could not reach {url} (offline or blocked?): {err}")
    if isinstance(err, requests.RequestException):
        return DataError(f"download of {url} failed: {err}")
    return None


# ---- byte ranges (fsspec) --------------------------------------------------------------------
def read_url(url: str, byte_range: tuple[int, int] | None = None, timeout: float = 60.0) -> bytes:
    """The body of `url`, or only bytes byte_range[0]..byte_range[1] (inclusive), in memory."""
    import aiohttp

    start, end = (None, None) if byte_range is None else (byte_range[0], byte_range[1] + 1)
    try:  # timeout: fsspec's, for the whole call
        return _http().cat_file(url, start=start, end=end, timeout=timeout)
    except DataError:
        raise
    except FileNotFoundError as err:  # fsspec's answer to a 404
        raise DataError(f"download of {url} failed: HTTP 404 Not Found") from err
    except aiohttp.ClientResponseError as err:
        raise DataError(f"download of {url} failed: HTTP {err.status} {err.message}") from err
    except aiohttp.ClientPayloadError as err:
        raise DataError(f"download of {url} was interrupted ({err}); try again") from err
    except (aiohttp.ClientError, TimeoutError, OSError) as err:
        raise DataError(f"could not reach {url} (offline or blocked?): {err}") from err


@functools.cache
def _http():
    """fsspec's HTTP filesystem, every reply checked by `_check_reply` before its body."""
    import aiohttp
    import fsspec

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_check_reply)
    return fsspec.filesystem(
        "http",
        headers={"User-Agent": USER_AGENT},
        # trust_env: the HTTP(S)_PROXY settings a cluster needs, as urllib and requests read them
        client_kwargs={"trace_configs": [trace], "trust_env": True},
    )


async def _check_reply(session, context, params) -> None:
    """A reply to a Range request must be that slice: a 206 whose Content-Range (when sent)
    starts where asked, ends no later and agrees with Content-Length (a shorter slice is the
    caller's to judge). Raising here ends the request before its body is read."""
    asked = re.fullmatch(r"bytes=(\d+)-(\d+)", params.headers.get("Range", ""))
    response = params.response
    if asked is None or response.status >= 400:
        return
    url, start, end = str(params.url), int(asked[1]), int(asked[2])
    if response.status != 206:  # a 200 carries the whole file: never read it into memory
        raise DataError(f"{url}: the server ignored the Range header; cannot fetch a slice")
    header = response.headers.get("Content-Range")
    if header is None:
        return
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None else None
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    span = int(match[2]) - int(match[1]) + 1 if match else None
    if (
        match is None
        or int(match[1]) != start
        or int(match[2]) > end
        or (length is not None and length != span)
    ):
        raise DataError(
            f"{url}: asked for bytes {start}-{end}, the server replied with"
            f" Content-Range {header!r} and Content-Length {length}: not that slice. Try again"
            " later, or use another server"
        )
