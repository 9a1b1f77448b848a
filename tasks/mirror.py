"""`crawl2model demo-mirror DIR`: a small stand-in for Common Crawl, built offline.

It has Common Crawl's layout (collinfo.json, crawl-data/<crawl>/warc.paths.gz and
wet.paths.gz, per-record-gzip WARC files under segments/) so the real download code path runs
against it. The pages are HTML made from text every Python install carries: the language
reference topics (pydoc_data) and the standard library's module documentation (pydoc). It
stands in for the real crawl; it is not web text.
"""

from __future__ import annotations

import datetime as dt
import gzip
import html
import io
import json
import os
import pkgutil
import pydoc
import uuid
import warnings
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

DEMO_CRAWL = "CC-MAIN-DEMO"
_SAFE_MODULES = [  # imported for pydoc: pure-Python modules with no side effects on import
    "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "heapq", "hmac", "html", "inspect", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "mimetypes", "numbers", "operator", "optparse",
    "pathlib", "pickle", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "statistics", "string", "struct",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "uuid", "warnings", "weakref", "zipfile",
]


def _topic_pages() -> list[tuple[str, str, str]]:
    from pydoc_data.topics import topics

    pages = []
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) < 400:
            continue
        paras = "".join(f"<p>{html.escape(p.strip())}</p>\n" for p in text.split("\n\n") if p.strip())
        body = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(name)} - Python language reference</title></head><body>"
                f"<nav><a href=\"/\">Home</a> | <a href=\"/reference/\">Reference</a></nav>"
                f"<main><article><h1>{html.escape(name)}</h1>\n{paras}</article></main>"
                f"<footer>Demo mirror page made from Python's pydoc topics.</footer></body></html>")
        pages.append((f"https://docs.demo.invalid/reference/{name}.html", body, text))
    return pages


def _module_pages() -> list[tuple[str, str, str]]:
    pages = []
    renderer = pydoc.HTMLDoc()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _SAFE_MODULES:
            try:
                module = __import__(name)
                body = renderer.page(f"Python: module {name}", renderer.document(module, name))
                text = pydoc.plain(pydoc.render_doc(module, renderer=pydoc.plaintext))
            except Exception:
                continue
            pages.append((f"https://docs.demo.invalid/library/{name}.html", body, text))
    return pages


def _write_warc(path: Path, pages, crawl: str, when: dt.datetime) -> None:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        info = w.create_warcinfo_record(path.name, {"software": "crawl2model demo-mirror",
                                                    "isPartOf": crawl, "format": "WARC File Format 1.1"})
        w.write_record(info)
        for i, (url, body, _) in enumerate(pages):
            date = (when + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            req = w.create_warc_record(url, "request", payload=io.BytesIO(
                f"GET {url.split('invalid', 1)[1]} HTTP/1.1\r\nHost: docs.demo.invalid\r\n\r\n".encode()),
                warc_headers_dict={"WARC-Date": date})
            data = body.encode("utf-8")
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(data)))], protocol="HTTP/1.1")
            resp = w.create_warc_record(url, "response", payload=io.BytesIO(data), http_headers=http,
                                        warc_headers_dict={"WARC-Date": date})
            w.write_record(req)
            w.write_record(resp)


def _write_wet(path: Path, pages, when: dt.datetime) -> None:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for i, (url, _, text) in enumerate(pages):
            date = (when + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            rec = w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode("utf-8")),
                                       warc_headers_dict={"WARC-Date": date, "Content-Type": "text/plain"})
            w.write_record(rec)


def build_mirror(root: str, files: int = 4, crawl: str = DEMO_CRAWL) -> dict:
    """Write the mirror under `root`; returns a summary. Deterministic apart from record ids."""
    out = Path(root)
    pages = _topic_pages() + _module_pages()
    if len(pages) < files:
        raise ValueError(f"only {len(pages)} pages available for {files} files")
    base = out / "crawl-data" / crawl
    when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    warc_paths, wet_paths = [], []
    for n in range(files):
        chunk = pages[n::files]
        seg = f"crawl-data/{crawl}/segments/1704067200000.{n:02d}"
        stem = f"{crawl}-20240101000000-{n:05d}"
        for kind, rel_list, writer in (("warc", warc_paths, _write_warc), ("wet", wet_paths, _write_wet)):
            rel = f"{seg}/{kind}/{stem}.warc{'.wet' if kind == 'wet' else ''}.gz"
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if kind == "warc":
                writer(dest, chunk, crawl, when)
            else:
                writer(dest, chunk, when)
            rel_list.append(rel)
    base.mkdir(parents=True, exist_ok=True)
    for kind, rels in (("warc", warc_paths), ("wet", wet_paths)):
        # mtime=0: the same listing bytes on every build
        with open(base / f"{kind}.paths.gz", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as g:
            g.write(("\n".join(rels) + "\n").encode())
    (out / "collinfo.json").write_text(json.dumps([{
        "id": crawl, "name": "crawl2model demo mirror (stands in for Common Crawl)",
        "timegate": "", "cdx-api": ""}], indent=2))
    (out / "README.txt").write_text(
        "A small Common Crawl-layout mirror built by `crawl2model demo-mirror` from Python's own\n"
        "documentation. It stands in for the real crawl in offline demos and tests.\n")
    return {"root": str(out), "crawl": crawl, "files": files, "pages": len(pages)}
