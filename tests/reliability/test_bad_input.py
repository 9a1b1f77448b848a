"""Generated garbage where WARC files belong, and hostile pages inside valid WARC files:
skipped and counted, or a clear error naming the file; memory stays under a stated bound."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tests.conftest import ROOT

DOWNLOAD_BOUND_MB = 600   # peak RSS of a download run on any of these inputs
FILTER_BOUND_MB = 1024    # peak RSS of a filter run (spaCy, lxml and trafilatura: ~0.65 GiB on any page)


def run_isolated(code: str, tmp_path: Path) -> tuple[int, str, float]:
    """Run `code` in a fresh interpreter; return (exit status, stderr, peak RSS in MB)."""
    wrapper = (f"import sys, json\nsys.path.insert(0, {str(ROOT)!r})\n"
               f"try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
               "    rc = 0\nexcept Exception as e:\n    print(f'error: {e}', file=sys.stderr)\n    rc = 1\n"
               # VmHWM, this process's own peak: ru_maxrss keeps the parent's across fork and exec
               "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
               "print(json.dumps({'rss_mb': int(hwm.split()[1]) / 1024}))\n"
               "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    rss = json.loads(r.stdout.strip().splitlines()[-1])["rss_mb"]
    return r.returncode, r.stderr, rss


def gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def gzip_bomb(expanded: int) -> bytes:
    """One gzip member of `expanded` zero bytes (about 1000:1)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    out = [c.compress(chunk) for _ in range(expanded >> 20)]
    return b"".join(out) + c.flush()


GARBAGE = {
    "empty.warc.gz": lambda: b"",
    "random.warc.gz": lambda: os.urandom(200_000),
    "page.warc.gz": lambda: b"<!DOCTYPE html><html><body><p>not a warc</p></body></html>\n" * 100,
    "claims-2gb.warc.gz": lambda: gzip_member(
        b"WARC/1.0\r\nWARC-Type: resource\r\nWARC-Record-ID: <urn:uuid:1>\r\n"
        b"Content-Length: 2147483648\r\n\r\nonly a few bytes follow"),
    "bomb.warc.gz": lambda: gzip_bomb(256 << 20),
    "bad-utf8-headers.warc.gz": lambda: gzip_member(b"WARC/1.0\r\nWARC-Type: \xff\xfe\xfd\r\nContent-Length: x\r\n\r\n"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_refused_by_download_with_bounded_memory(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(GARBAGE[name]())
    code = (f"from tasks.lake import Lake\nfrom tasks.download import DownloadParams, download\n"
            f"download(Lake('lake'), DownloadParams(files=[{str(path)!r}]))")
    rc, err, rss = run_isolated(code, tmp_path)
    assert rc == 1 and f"error: {path}" in err, err[-2000:]
    assert rss < DOWNLOAD_BOUND_MB, f"peak RSS {rss:.0f} MB"
    assert not (tmp_path / "lake" / "download").exists() or not any(
        (tmp_path / "lake" / "download").glob("*/_MANIFEST.json"))


def hostile_warc(path: Path) -> list[str]:
    """Valid WARC records whose pages are hostile: deep nesting, a 50 MB single line, invalid
    UTF-8, a mislabelled charset, plus one normal page that must survive extraction."""
    pages = {
        "https://deep.example.org/": b"<html><body>" + b"<div>" * 100_000 + b"deep" + b"</div>" * 100_000 + b"</body></html>",
        "https://huge.example.org/": b"<html><body><p>" + b"word " * 10_000_000 + b"</p></body></html>",
        "https://badutf8.example.org/": b"<html><body><p>" + bytes(range(128, 256)) * 200 + b"</p></body></html>",
        "https://latin1.example.org/": ("<html><head><meta charset='utf-8'></head><body><p>"
                                        + "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. " * 200 + "</p></body></html>").encode("latin-1"),
        "https://fine.example.org/": ("<html><body><article><p>"
                                      + "This is an ordinary paragraph of English text about gardens. " * 50
                                      + "</p></article></body></html>").encode(),
    }
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, body in pages.items():
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))
    return list(pages)


def test_hostile_pages_are_skipped_and_counted_with_bounded_memory(tmp_path):
    warc = tmp_path / "hostile.warc.gz"
    hostile_warc(warc)
    code = (f"from tasks.lake import Lake\nfrom tasks.download import DownloadParams, download\n"
            f"from tasks.filter import FilterParams, filter_documents, FilterError\n"
            f"lake = Lake('lake')\ndownload(lake, DownloadParams(files=[{str(warc)!r}]))\n"
            f"try:\n    filter_documents(lake, FilterParams(tasks=1, workers=1), log=lambda m: None)\n"
            f"except FilterError:\n    pass\n"
            f"import json\nprint(json.dumps(lake.resolve('download').metrics['records_by_type']))")
    rc, err, rss = run_isolated(code, tmp_path)
    assert rc == 0, err[-3000:]
    print(f"filter peak RSS on hostile pages: {rss:.0f} MB")
    assert rss < FILTER_BOUND_MB, f"peak RSS {rss:.0f} MB"
    logs = next((tmp_path / "lake" / "filter").glob("*/_work/logs/stats/00000.json"), None) or \
        next((tmp_path / "lake" / "filter").glob("*/stats.json"))
    stats = json.loads(logs.read_text())
    text = json.dumps(stats)
    assert '"too_large": 1' in text  # the 50 MB page: counted, not parsed
