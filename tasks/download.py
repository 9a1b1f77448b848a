"""Stage `download`: Common Crawl WARC (or WET) files into the lake.

Sources: a crawl id (its `warc.paths.gz` read from the base URL), explicit URLs, or local
files. Transfers run in parallel with retries (exponential backoff + jitter, Retry-After on
429/503), resume a dropped transfer with an HTTP Range request, and verify every file (its
sha256, each gzip member to its trailer, every record against its length) before it enters
the lake: in the same pass as the transfer, on the bytes as they arrive (`tasks.warc.WarcChecker`,
run in worker processes by `CheckerProcesses`: in the transfer threads the checks would take turns
for the GIL), so a damaged file is refused as soon as its damage arrives and no file is read twice.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urljoin, urlparse

import fsspec
import requests
from pydantic import Field, field_validator, model_validator

from tasks.lake import Lake, Manifest, Production
from tasks.cluster import ExecutorParams, ray_cluster, ray_map
from tasks.errors import StageError
from tasks.progress import Progress
from tasks.stage import StageParams, cache_dir, run_stage
from tasks.warc import (CheckerProcesses, RemoteChecker, WarcChecker, WarcError, WarcStats, copy_first_records,
                        verify_warc)

CODE_VERSION = "download/1"
DEFAULT_BASE_URL = "https://data.commoncrawl.org/"
_CRAWL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DownloadError(StageError):
    """A transfer or source that failed for good; the message names the URL or file."""


class DownloadParams(StageParams, ExecutorParams):
    """What to download. One source: `crawl`, `urls` or `files`; none given means the latest crawl."""

    crawl: str | None = Field(None, description="crawl id (CC-MAIN-2024-51) or 'latest' (the default when "
                              "no urls or files are given)")
    base_url: str = Field(DEFAULT_BASE_URL, description="Common Crawl root: https://, http://, file:// or s3://")
    format: Literal["warc", "wet"] = "warc"
    segments: int = Field(1, ge=1, le=100_000, description="files to pick from the crawl")
    seed: int = Field(0, ge=0, description="seed of the deterministic file selection")
    max_records: int | None = Field(None, ge=1, description="keep only the first N records of each file")
    urls: list[str] = Field(default_factory=list, description="explicit WARC URLs")
    files: list[str] = Field(default_factory=list, description="explicit local WARC files")
    # How, not what: these do not change the artifact, so they are not part of its version.
    concurrency: int = Field(4, ge=1, le=64)
    retries: int = Field(6, ge=0, le=50)
    timeout: float = Field(60.0, gt=0, le=3600, description="seconds without data before a retry")

    @field_validator("crawl")
    @classmethod
    def _crawl_id(cls, v: str | None) -> str | None:
        if v is not None and not _CRAWL_ID.match(v):
            raise ValueError(f"invalid crawl id {v!r}: expected e.g. CC-MAIN-2024-51 or 'latest'")
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        if scheme not in ("http", "https", "file", "s3"):
            raise ValueError(f"invalid base_url {v!r}: use http(s)://, file:// or s3://")
        return v if v.endswith("/") else v + "/"

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if urlparse(u).scheme not in ("http", "https", "file", "s3"):
                raise ValueError(f"invalid URL {u!r}: use http(s)://, file:// or s3://")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: list[str]) -> list[str]:
        for f in v:
            if not os.path.isfile(f):
                raise ValueError(f"{f}: no such file")
            if not os.access(f, os.R_OK):
                raise ValueError(f"{f}: not readable")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "DownloadParams":
        given = [n for n, v in (("crawl", self.crawl), ("urls", self.urls), ("files", self.files)) if v]
        if not given:
            self.crawl = "latest"
        elif len(given) > 1:
            raise ValueError(f"give one source: crawl, urls or files (got {', '.join(given)})")
        if self.files and self.executor == "ray":
            raise ValueError("files are on this machine, which Ray workers elsewhere cannot read: with executor "
                             "'ray' give urls or a crawl (or `ingest` the files)")
        names = [_file_name(u) for u in (self.urls or self.files)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two sources share the file name {dupes[0]!r}")
        return self


@dataclass
class Source:
    url: str    # where to fetch it (a URL or a local path)
    name: str   # its path inside the artifact


def _file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path) or "index.warc"


# --------------------------------------------------------------------------- sources


def _fetch_small(url: str, params: DownloadParams) -> bytes:
    """A listing or index (paths.gz, collinfo.json), with the same retry policy."""
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "listing")
        fetch(url, part, params.model_copy(update={"max_records": None}), check_warc=False)
        return Path(part).read_bytes()


def resolve_latest_crawl(params: DownloadParams) -> str:
    url = urljoin(params.base_url, "collinfo.json")
    try:
        crawls = json.loads(_fetch_small(url, params))
        return crawls[0]["id"]  # Common Crawl lists the newest first
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise DownloadError(f"{url}: not a Common Crawl crawl list: {e}") from None


def list_crawl_paths(params: DownloadParams, crawl: str) -> list[str]:
    url = urljoin(params.base_url, f"crawl-data/{crawl}/{params.format}.paths.gz")
    try:
        raw = _fetch_small(url, params)
    except DownloadError as e:
        if "404" in str(e) or "no such file" in str(e):
            raise DownloadError(f"unknown crawl {crawl!r}: {url} not found", bad_input=True) from None
        raise
    try:
        paths = [p.strip() for p in gzip.decompress(raw).decode().splitlines() if p.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DownloadError(f"{url}: not a gzipped path list: {e}") from None
    if not paths:
        raise DownloadError(f"{url}: empty path list")
    return paths


def select_spread(paths: list[str], n: int, seed: int) -> list[str]:
    """`n` paths spread across the whole crawl: one random pick from each of n equal strata
    (the crawl's segments are in time order, so the first n would all be from one day)."""
    if n >= len(paths):
        return list(paths)
    rng = random.Random(seed)
    picks = []
    for i in range(n):
        lo, hi = i * len(paths) // n, (i + 1) * len(paths) // n
        picks.append(paths[rng.randrange(lo, hi)])
    return picks


def plan(params: DownloadParams) -> tuple[dict, list[Source]]:
    """The recipe (what defines the version) and the sources to fetch."""
    base = {"format": params.format, "max_records": params.max_records}
    if params.files:
        from tasks.ingest import sha256_file

        content = sorted([_file_name(f), sha256_file(f)] for f in params.files)
        return ({**base, "source": "files", "files": content},
                [Source(f, _file_name(f)) for f in params.files])
    if params.urls:
        return ({**base, "source": "urls", "urls": list(params.urls)},
                [Source(u, _file_name(u)) for u in params.urls])
    crawl = resolve_latest_crawl(params) if params.crawl == "latest" else params.crawl
    return ({**base, "source": "crawl", "base_url": params.base_url, "crawl": crawl,
             "segments": params.segments, "seed": params.seed},
            [])  # the listing is read only when the version is not built yet


# --------------------------------------------------------------------------- transfer


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (a number or an HTTP date), by urllib3's own parser;
    None when absent or unreadable."""
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    if not value:
        return None
    try:
        return float(Retry.parse_retry_after(Retry(), value))
    except InvalidHeader:
        return None


def backoff(attempt: int, retry_after: float | None, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter; the server's Retry-After wins when it says more."""
    delay = random.uniform(0, min(cap, base * 2 ** attempt))
    return max(delay, min(retry_after, 300.0)) if retry_after is not None else delay


_session = threading.local()


def _http() -> requests.Session:
    if not hasattr(_session, "s"):
        s = requests.Session()
        s.trust_env = False  # no proxies from the environment: we only talk to the source given
        s.headers["User-Agent"] = "crawl2model/0.1 (+https://github.com/crawl2model)"
        _session.s = s
    return _session.s


class _Unchecked:
    """What a transfer that is not a WARC (a listing) is checked with: nothing."""

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        return None

    def close(self) -> None:
        pass


def _resumed_checker(part: str, name: str, append: bool, check_warc: bool,
                     checkers: CheckerProcesses | None) -> WarcChecker | RemoteChecker | _Unchecked:
    """The WARC check of a transfer (in a worker process of `checkers` when given), fed first
    with the bytes an earlier attempt left in `part` when this one appends to them (the only
    bytes read twice, and only on a resume). Close it when done: that gives its worker back."""
    if not check_warc:
        return _Unchecked()
    checker = checkers.checker(name) if checkers else WarcChecker(name)
    if append:
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                checker.feed(chunk)
    return checker


def _http_once(url: str, part: str, params: DownloadParams, on_bytes: Callable[[int], None],
               check_warc: bool, name: str, checkers: CheckerProcesses | None = None) -> WarcStats | None:
    """One HTTP attempt, appending to `part` from where it stopped (Range); every byte is checked
    as it is written (`WarcChecker`). Returns the file's check, or None for a cut (max_records)."""
    have = os.path.getsize(part) if os.path.exists(part) and not params.max_records else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        r = _http().get(url, headers=headers, stream=True, timeout=(10, params.timeout))
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retryable(f"{url}: {type(e).__name__}") from None
    with r:
        if r.status_code in (429, 500, 502, 503, 504):
            raise _Retryable(f"{url}: HTTP {r.status_code}", _retry_after(r.headers.get("Retry-After")))
        if r.status_code == 416 and have:
            return  # we already have every byte
        if r.status_code == 404:
            raise DownloadError(f"{url}: HTTP 404 not found")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
        append = r.status_code == 206 and have > 0
        if append:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise _Retryable(f"{url}: bad Content-Range {r.headers.get('Content-Range')!r}")
            total = None if m.group(3) == "*" else int(m.group(3))
        else:
            total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
            have = 0
        with open(part, "ab" if append else "wb") as out:
            if params.max_records:
                try:
                    copy_first_records(_RawReader(r, on_bytes), out, params.max_records, url)
                except (requests.RequestException, OSError) as e:
                    raise _Retryable(f"{url}: {type(e).__name__} mid-body") from None
                return None
            with contextlib.closing(_resumed_checker(part, name, append, check_warc, checkers)) as checker:
                try:
                    for chunk in r.iter_content(1 << 16):
                        out.write(chunk)
                        checker.feed(chunk)
                        on_bytes(len(chunk))
                except (requests.RequestException, OSError) as e:
                    raise _Retryable(f"{url}: connection lost after {out.tell()} bytes: "
                                     f"{type(e).__name__}") from None
                out.flush()
                size = os.path.getsize(part)
                if total is not None and size != total:
                    raise _Retryable(f"{url}: got {size} of {total} bytes")
                return checker.finish()


class _RawReader:
    """File-like view of a streamed HTTP body (undecoded bytes), for the record cutter."""

    def __init__(self, r: requests.Response, on_bytes: Callable[[int], None]):
        self.raw, self.on_bytes = r.raw, on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size and size > 0 else 1 << 16, decode_content=False)
        self.on_bytes(len(data))
        return data


def _fsspec_once(url: str, part: str, params: DownloadParams, on_bytes: Callable[[int], None],
                 check_warc: bool, name: str, checkers: CheckerProcesses | None = None) -> WarcStats | None:
    """file:// and s3:// sources (fsspec retries S3 itself), checked as they are copied."""
    try:
        src_cm = fsspec.open(url, "rb")
        with src_cm as src, open(part, "w+b" if params.max_records else "wb") as out:
            if params.max_records:
                copy_first_records(_Counting(src, on_bytes), out, params.max_records, url)
                return None
            with contextlib.closing(_resumed_checker(part, name, False, check_warc, checkers)) as checker:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    checker.feed(chunk)
                    on_bytes(len(chunk))
                return checker.finish()
    except FileNotFoundError:
        raise DownloadError(f"{url}: no such file") from None
    except PermissionError:
        raise DownloadError(f"{url}: permission denied") from None


class _Counting:
    def __init__(self, f, on_bytes):
        self.f, self.on_bytes = f, on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.on_bytes(len(data))
        return data


def fetch(url: str, part: str, params: DownloadParams, on_bytes: Callable[[int], None] = lambda n: None,
          log: Callable[[str], None] = lambda m: None, check_warc: bool = True,
          checkers: CheckerProcesses | None = None) -> WarcStats | None:
    """Fetch `url` into the local file `part`, retrying and resuming until it is whole, checking
    it as it arrives (a WARC, unless `check_warc` is false). Returns its check (None for a cut to
    max_records, whose cut file is checked after, or when not checked)."""
    local, name = urlparse(url).scheme in ("", "file", "s3"), url  # errors name what the user gave
    if urlparse(url).scheme == "":
        url = "file://" + os.path.abspath(url)
    for attempt in range(params.retries + 1):
        try:
            return (_fsspec_once if local else _http_once)(url, part, params, on_bytes, check_warc, name, checkers)
        except _Retryable as e:
            if attempt == params.retries:
                raise DownloadError(f"{e} (gave up after {params.retries + 1} attempts)") from None
            delay = backoff(attempt, e.retry_after)
            log(f"{e}; retry {attempt + 1}/{params.retries} in {delay:.1f}s")
            time.sleep(delay)


# --------------------------------------------------------------------------- the stage


def _staging_dir(lake: Lake, version_dir: str) -> str:
    """Where partial files live while downloading. In a local lake: the version's own _work
    folder, so a killed run resumes from the bytes it had. On S3 (no appends): a local cache of
    the machine that downloads, per lake and version (the version's lease makes its producer in
    that lake the only one; two lakes may produce the same version at once)."""
    if not lake.is_local:
        return cache_dir("download", hashlib.sha256(lake.url.encode()).hexdigest()[:16], version_dir.rsplit("/", 1)[-1])
    d = f"{version_dir}/_work/download"
    os.makedirs(d, exist_ok=True)
    return d


class _Silent:
    """The progress of a download on a Ray worker: the stage's process counts it as results come back."""

    def advance_bytes(self, n: int) -> None:
        pass

    def advance_files(self, n: int) -> None:
        pass


def download_on_node(src: Source, lake: Lake, version_dir: str, params: DownloadParams) -> tuple[str | None, dict]:
    """One file, on a Ray worker: fetched and checked where the worker is, then into the lake. A
    local lake (every node sees it) keeps the file in the version's _work folder for the stage's
    process to move in, as the local executor does; an S3 lake gets it from the worker, and the
    stage adopts it (no local path comes back)."""
    done, info = download_one(src, _staging_dir(lake, version_dir), params, _Silent(), lambda m: None)
    if lake.is_local:
        return done, info
    sha256, size = lake.upload(done, f"{version_dir}/{src.name}", f"writing {src.name}")
    os.remove(done)
    if sha256 != info["sha256"]:
        raise DownloadError(f"{src.name}: changed while it was copied into the lake")
    return None, info


def _download_here(todo: list[Source], staging: str, params: DownloadParams, progress: Progress,
                   log: Callable[[str], None]) -> list[tuple[str, dict]]:
    """The local executor: transfers in threads, their checks in processes (every core checks)."""
    checks = min(params.concurrency, len(todo), os.cpu_count() or 1)
    with CheckerProcesses(checks) as checkers, ThreadPoolExecutor(max_workers=params.concurrency) as pool:
        futures = [pool.submit(download_one, s, staging, params, progress, log, checkers) for s in todo]
        try:
            return [fut.result() for fut in as_completed(futures)]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def download_one(src: Source, staging: str, params: DownloadParams, progress: Progress,
                 log: Callable[[str], None], checkers: CheckerProcesses | None = None) -> tuple[str, dict]:
    part = os.path.join(staging, src.name + ".part")
    done = os.path.join(staging, src.name)
    fetched = 0

    def on_bytes(n: int) -> None:
        nonlocal fetched
        fetched += n
        progress.advance_bytes(n)

    stats = None
    try:
        if not os.path.exists(done):
            stats = fetch(src.url, part, params, on_bytes, log, checkers=checkers)
            os.replace(part, done)
        if stats is None:  # a cut to max_records, or a file an interrupted run fetched whole
            stats = verify_warc(lambda: open(done, "rb"), src.url)
    except WarcError:
        for path in (part, done):  # a bad file is never kept for the next run to trust
            if os.path.exists(path):
                os.remove(path)
        raise
    progress.advance_files(1)
    return done, {"name": src.name, "url": src.url, "sha256": stats.sha256, "bytes": stats.bytes,
                  "records": stats.records, "records_by_type": stats.by_type,
                  "gzip_members": stats.gzip_members, "bytes_fetched": fetched}


def download(lake: Lake, params: DownloadParams, log: Callable[[str], None] | None = None) -> Manifest:
    recipe, sources = plan(params)
    log = log or (lambda m: None)

    def build(prod: Production) -> None:
        todo = sources
        if recipe["source"] == "crawl":
            paths = list_crawl_paths(params, recipe["crawl"])
            picked = select_spread(paths, params.segments, params.seed)
            todo = [Source(urljoin(params.base_url, p), _file_name(p)) for p in picked]
            prod.metrics["crawl_files"] = len(paths)
        staging = _staging_dir(lake, prod.dir)
        with Progress(f"download {prod.ref}", files=len(todo)) as progress, ray_cluster(params, lake) as on_ray:
            try:
                if on_ray:
                    results = []
                    calls = ((s, lake, prod.dir, params) for s in todo)
                    for local, info in ray_map(download_on_node, calls, f"download {prod.ref}"):
                        progress.advance_bytes(info["bytes_fetched"])
                        progress.advance_files(1)
                        results.append((local, info))
                else:
                    results = _download_here(todo, staging, params, progress, log)
            except WarcError as e:
                if params.files:  # a damaged file the user gave is bad input; a transfer's damage is not
                    e.exit_status = 2
                raise
        for local, info in sorted(results, key=lambda r: r[1]["name"]):
            if local is None:  # put into the lake by a Ray worker
                prod.adopt(info["name"], info["sha256"], info["bytes"])
            else:
                prod.add_file(local, info["name"], info["sha256"], move=lake.is_local)
        files = [info for _, info in sorted(results, key=lambda r: r[1]["name"])]
        prod.metrics.update({
            "files": len(files), "bytes": sum(f["bytes"] for f in files),
            "records": sum(f["records"] for f in files),
            "records_by_type": _sum_counts(f["records_by_type"] for f in files),
            "sources": files,
        })
        if not lake.is_local:
            shutil.rmtree(staging, ignore_errors=True)

    return run_stage(lake, "download", recipe, [], CODE_VERSION, build, rebuild=params.rebuild)


def _sum_counts(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return f"{x['files']} WARC files, {x['records']} records ({x['records_by_type'].get('response', 0)} responses)"
