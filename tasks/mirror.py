"""`crawl2model demo-mirror DIR`: a small stand-in for Common Crawl, built offline.

It has Common Crawl's layout (collinfo.json, crawl-data/<crawl>/warc.paths.gz and
wet.paths.gz, per-record-gzip WARC files under segments/) so the real download code path runs
against it. The pages are HTML made from text every Python install carries: the language
reference topics (pydoc_data) and the standard library's module documentation (pydoc). It
stands in for the real crawl; it is not web text.
"""

from __future__ import annotations

import ast
import datetime as dt
import gzip
import html
import io
import json
import os
import re
import sysconfig
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


def _prose(text: str) -> list[str]:
    """The prose paragraphs of a documentation text: no indented code blocks, no doctests,
    mostly alphabetic words (the web-quality filters would drop code anyway)."""
    out = []
    for para in text.split("\n\n"):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or lines[0].startswith((" ", "\t")) or ">>>" in para:
            continue
        words = " ".join(ln.strip() for ln in lines).split()
        alpha = sum(any(c.isalpha() for c in w) for w in words)
        if len(words) >= 12 and alpha / len(words) >= 0.9:
            out.append(" ".join(words))
    return out


def _page(title: str, section: str, sections: list[tuple[str, list[str]]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n" * bool(h) + "".join(f"<p>{html.escape(p)}</p>\n" for p in ps)
                   for h, ps in sections)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)} - Python {section}</title></head><body>"
            f"<nav><a href=\"/\">Home</a> | <a href=\"/{section}/\">{section.title()}</a></nav>"
            f"<main><article><h1>{html.escape(title)}</h1>\n{body}</article></main>"
            f"<footer>Demo mirror page made from Python's own documentation.</footer></body></html>")


def _topic_pages() -> list[tuple[str, str, str]]:
    from pydoc_data.topics import topics

    pages = []
    for name in sorted(topics):
        paras = _prose(topics[name])
        if len(paras) >= 3:
            pages.append((f"https://docs.demo.invalid/reference/{name}.html",
                          _page(name, "reference", [("", paras)]), "\n\n".join(paras)))
    return pages


def _module_pages() -> list[tuple[str, str, str]]:
    import inspect

    pages = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _SAFE_MODULES:
            try:
                module = __import__(name)
            except Exception:
                continue
            sections = [("", _prose(inspect.getdoc(module) or ""))]
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                paras = _prose(inspect.getdoc(obj) or "")
                if paras:
                    sections.append((attr, paras))
            text = [p for _, ps in sections for p in ps]
            if len(text) >= 3:
                pages.append((f"https://docs.demo.invalid/library/{name}.html",
                              _page(f"{name} module", "library", sections), "\n\n".join(text)))
    return pages


def _record_id(*parts: str) -> str:
    """A WARC-Record-ID from the record's identity, not a random one: the same mirror bytes on
    every build, so document ids (and everything keyed by them, like the tokenizer's held-out
    split) are the same in every demo."""
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, ' '.join(parts))}>"


def _write_warc(path: Path, pages, crawl: str, when: dt.datetime) -> None:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        info = w.create_warcinfo_record(path.name, {"software": "crawl2model demo-mirror",
                                                    "isPartOf": crawl, "format": "WARC File Format 1.1"})
        info.rec_headers.replace_header("WARC-Record-ID", _record_id("warcinfo", crawl, path.name))
        info.rec_headers.replace_header("WARC-Date", when.strftime("%Y-%m-%dT%H:%M:%SZ"))
        w.write_record(info)
        for i, (url, body, _) in enumerate(pages):
            date = (when + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            req = w.create_warc_record(url, "request", payload=io.BytesIO(
                f"GET {url.split('invalid', 1)[1]} HTTP/1.1\r\nHost: docs.demo.invalid\r\n\r\n".encode()),
                warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": _record_id("request", url)})
            data = body.encode("utf-8")
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(data)))], protocol="HTTP/1.1")
            resp = w.create_warc_record(url, "response", payload=io.BytesIO(data), http_headers=http,
                                        warc_headers_dict={"WARC-Date": date,
                                                           "WARC-Record-ID": _record_id("response", url)})
            w.write_record(req)
            w.write_record(resp)


def _write_wet(path: Path, pages, when: dt.datetime) -> None:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for i, (url, _, text) in enumerate(pages):
            date = (when + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            rec = w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode("utf-8")),
                                       warc_headers_dict={"WARC-Date": date, "Content-Type": "text/plain",
                                                          "WARC-Record-ID": _record_id("conversion", url)})
            w.write_record(rec)


def build_mirror(root: str, files: int = 4, crawl: str = DEMO_CRAWL) -> dict:
    """Write the mirror under `root`; returns a summary. Deterministic: the same bytes on every
    build with the same Python (its documentation is the text)."""
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


# The packages whose docstrings join the standard library's in the demo text, and the licenses
# that allow it (the installed distribution's metadata must name one of them, or it is left out).
DEMO_TEXT_PACKAGES = [("numpy", "numpy"), ("pandas", "pandas"), ("pydantic", "pydantic"), ("prefect", "prefect"),
                      ("click", "click"), ("jinja2", "jinja2"), ("rich", "rich"), ("fsspec", "fsspec")]
PERMISSIVE = ("MIT", "BSD", "Apache", "PSF", "0BSD", "Zlib", "CC0", "ISC")
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "site-packages", "lib2to3", "turtledemo", "vendored", "_vendor",
              "vendor", "__pycache__"}
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` -> name
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`_?")
_HEADING = re.compile(r"\b[A-Z][a-z]+(?: [A-Za-z]+)? -{3,}\s*")  # numpydoc's "Returns -------"


def _license(dist: str) -> str | None:
    from importlib import metadata

    try:
        meta = metadata.metadata(dist)
    except metadata.PackageNotFoundError:
        return None
    named = meta.get("License-Expression") or meta.get("License") or " ".join(
        c for c in meta.get_all("Classifier") or [] if c.startswith("License ::"))
    return named.splitlines()[0] if named and any(p in named for p in PERMISSIVE) else None


def _docstrings(path: str) -> list[str]:
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError):
        return []
    return [d for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                              ast.AsyncFunctionDef))
            if (d := ast.get_docstring(node))]


def _package_prose(root: str, seen: set[str]) -> list[str]:
    """The prose paragraphs of every docstring under `root`, markup removed, each once."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            for doc in _docstrings(os.path.join(folder, name)):
                for para in _prose(doc):
                    para = _LITERAL.sub(lambda m: m.group(1) or m.group(2), _ROLE.sub(r"\1", para))
                    para = _HEADING.sub("", para)
                    if para not in seen:
                        seen.add(para)
                        out.append(para)
    return out


def build_demo_text(path: str) -> dict:
    """Write the demo's extra English text to `path` (paragraphs, blank-line separated) and a
    `<path>.sources.json` beside it saying where it came from; returns that summary.
    Deterministic: the same bytes with the same Python and package versions."""
    import importlib.util
    import platform
    from importlib import metadata

    seen: set[str] = set()
    parts, sources = [], []
    stdlib = _package_prose(sysconfig.get_paths()["stdlib"], seen)
    parts.append(stdlib)
    sources.append({"source": f"Python {platform.python_version()} standard library", "license": "PSF-2.0",
                    "paragraphs": len(stdlib)})
    for dist, package in DEMO_TEXT_PACKAGES:
        license_ = _license(dist)
        spec = importlib.util.find_spec(package) if license_ else None
        if spec is None or not spec.submodule_search_locations:
            continue
        prose = _package_prose(list(spec.submodule_search_locations)[0], seen)
        parts.append(prose)
        sources.append({"source": f"{dist} {metadata.version(dist)}", "license": license_, "paragraphs": len(prose)})
    text = "\n\n".join(p for part in parts for p in part) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    summary = {"path": path, "bytes": len(text.encode()), "paragraphs": sum(len(p) for p in parts), "sources": sources}
    Path(path + ".sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
