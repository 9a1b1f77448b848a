"""The curated corpus: download -> filter -> dedup of every real WARC of ../shared/data/warc plus
planted duplicates, made once for the whole run (conftest's `curated_corpus`): the tests of
filter and dedup (test_curation.py) and of tokenizer and shard (test_tokens.py) read it."""

from __future__ import annotations

import io
import re
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator
from warcio.warcwriter import WARCWriter


def planted_warc(shared_data: Path, dest: Path) -> dict[str, str]:
    """Copies of real pages under new URLs: one verbatim, one with a changed header and
    footer. Returns {copy url: original url}."""
    originals = {}
    for name in ("wget-sample-0000.warc.gz", "wget-sample-0001.warc.gz"):
        with open(shared_data / "warc" / name, "rb") as f:
            for rec in ArchiveIterator(f):
                if rec.rec_type == "response" and rec.rec_headers.get_header("WARC-Target-URI") in (
                        "https://maria-antoniak.github.io/", "https://allenai.org/"):
                    originals[rec.rec_headers.get_header("WARC-Target-URI")] = rec.content_stream().read()
    assert len(originals) == 2
    planted = {}
    with open(dest, "wb") as out:
        w = WARCWriter(out, gzip=True)
        for i, (url, body) in enumerate(sorted(originals.items())):
            html = body.decode("utf-8")
            # a new first and last paragraph: they survive extraction, so the texts differ
            changed = re.sub(r"(<body[^>]*>)", r"\1<p>Welcome to the mirror of this site, "
                             r"updated every week by our volunteers.</p>", html, count=1)
            changed = changed.replace("</body>", "<p>Copyright the mirror team. All rights "
                                                 "reserved. Contact us for permissions.</p></body>")
            for kind, page in (("verbatim", html), ("changed", changed)):
                copy = f"https://mirror-{kind}-{i}.example.org/"
                planted[copy] = url
                from warcio.statusandheaders import StatusAndHeaders

                data = page.encode("utf-8")
                http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                        protocol="HTTP/1.1")
                w.write_record(w.create_warc_record(copy, "response", payload=io.BytesIO(data),
                                                    http_headers=http))
    return planted


def make_curated(shared_data: Path, work: Path) -> dict:
    """The stages in this process, one task each: {"lake": url, "download" / "filter" / "dedup": ref,
    "planted": {copy url: original url}} (plain values: it is shared between pytest workers)."""
    from tasks.dedup import DedupParams, dedup_documents
    from tasks.download import DownloadParams, download
    from tasks.filter import FilterParams, filter_documents
    from tasks.lake import Lake

    planted = planted_warc(shared_data, work / "zz-planted.warc.gz")
    lake = Lake(str(work / "lake"))
    files = sorted(str(p) for p in (shared_data / "warc").iterdir()) + [str(work / "zz-planted.warc.gz")]
    dl = download(lake, DownloadParams(files=files))
    flt = filter_documents(lake, FilterParams(input=dl.ref, tasks=1, workers=1), log=lambda m: None)
    dd = dedup_documents(lake, DedupParams(input=flt.ref, tasks=1, workers=1), log=lambda m: None)
    return {"lake": lake.url, "download": dl.ref, "filter": flt.ref, "dedup": dd.ref, "planted": planted}


def documents(lake, m) -> list[tuple[str, str]]:
    """(id, text) of every document of a filter or dedup version, sorted: what two versions that
    differ in their task count (so in their files) must agree on."""
    import pyarrow.parquet as pq

    from tasks.stage import document_files

    rows = []
    for path in document_files(m):
        with lake.open(m, path) as fh:
            rows += [(r["id"], r["text"]) for r in pq.read_table(fh, columns=["id", "text"]).to_pylist()]
    return sorted(rows)


def lake_with_curated_download(curated_corpus: dict, folder):
    """A new lake under `folder` holding a copy of the curated corpus's download version, for a
    stage to filter elsewhere: (the curated lake, its filter version, the new lake's path)."""
    from tasks.lake import Lake
    from tests.conftest import copy_version

    src, lake = Lake(curated_corpus["lake"]), folder / "lake"
    copy_version(src, Lake(str(lake)), curated_corpus["download"])
    return src, src.resolve(curated_corpus["filter"]), lake
