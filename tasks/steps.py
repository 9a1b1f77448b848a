"""datatrove pipeline steps of our own, where the stock ones fall short (see issue 4):

- `WarcHtmlReader`: HTML responses only, charsets decoded robustly and the undecodable counted
  (datatrove's WarcReader silently drops mislabelled charsets), corrupt members skipped and
  counted, never fatal.
- `Extract`: trafilatura or resiliparse, deterministic: no wall-clock timeout and no
  cross-document state, so a rerun or a resume gives the same documents.
- `LanguageId`: fastText `lid.176` (FineWeb's model, tasks/lid.py).
- `CompactURLFilter`: datatrove's URLFilter with the 5M-domain blocklist held as a sorted array
  of 64-bit hashes (~40 MB) instead of a Python set (~825 MB), and tldextract kept offline.
- `Meter`: counts documents and bytes passing a point: the funnel.
- `RemovedSample`: a capped, deterministic sample of what a filter removed, with the reason.
- `FailFastExecutor`: datatrove's local executor, where a worker that dies (the out-of-memory
  killer) ends the stage with an error instead of hanging it, and workers die with the stage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tarfile
import zlib
from collections import Counter

import multiprocess
import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.pipeline.filters.url_filter import URLFilter
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers.parquet import ParquetWriter
from datatrove.utils.logging import logger
from multiprocess.connection import wait
from multiprocess.pool import RemoteTraceback

from common.process import how_it_ended, own_cpu_seconds, report_worker_cpu
from tasks.lid import top_language
from tasks.stage import TaskDied

MAX_HTML_BYTES = 4 << 20  # pages above this are counted and skipped: extraction time must stay bounded


# --------------------------------------------------------------------------- reading


_HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:]+)""", re.I)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([a-zA-Z0-9_\-:]+)", re.I)


def decode_html(body: bytes, content_type: str | None) -> tuple[str | None, str]:
    """Decode page bytes: the declared charset (HTTP header, then <meta>), then UTF-8, then a
    detector. Returns (text or None, how)."""
    candidates = []
    if content_type and (m := _HEADER_CHARSET.search(content_type)):
        candidates.append(m.group(1))
    if m := _META_CHARSET.search(body[:4096]):
        candidates.append(m.group(1).decode("ascii", "ignore"))
    candidates.append("utf-8")
    for cs in candidates:
        try:
            return body.decode(cs), cs.lower()
        except (LookupError, UnicodeDecodeError):
            continue
    try:
        from resiliparse.parse.encoding import detect_encoding

        cs = detect_encoding(body)
        return body.decode(cs), f"detected:{cs.lower()}"
    except (LookupError, UnicodeDecodeError, ImportError):
        pass
    text = body.decode("utf-8", errors="replace")
    if text.count("\ufffd") <= max(10, len(text) // 100):  # mostly fine: keep it
        return text, "utf-8-replace"
    return None, "undecodable"


class ListedFiles:
    """For datatrove readers: the files to read given as a list (`paths=`), which travels with the
    pipeline to a worker on any machine; a `paths_file` is on one machine's disk. Each task writes
    the list to a temporary paths file of its own and datatrove shards it as usual (file i to
    task i mod tasks)."""

    def __init__(self, *args, paths: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths = None if paths is None else list(paths)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import tempfile

        if self.paths is None:  # datatrove's own listing (a folder, a glob, a paths file)
            yield from super().run(data, rank, world_size)
            return

        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write("".join(p + "\n" for p in self.paths))
            f.flush()
            self.paths_file = f.name
            yield from super().run(data, rank, world_size)


class ListedParquetReader(ListedFiles, ParquetReader):
    """datatrove's ParquetReader over a list of files."""


class WarcHtmlReader(ListedFiles, BaseDiskReader):
    """HTML responses (and WET text conversions) from WARC files, one document each."""

    name = "🕷 WARC html"

    def read_file(self, filepath: str):
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        with self.data_folder.open(filepath, "rb") as f:
            it = iter(ArchiveIterator(f, arc2warc=True))  # old ARC files read as WARC
            i = 0
            while True:
                try:
                    record = next(it)
                    data = self._record(record)
                except StopIteration:
                    return
                except (ArchiveLoadFailed, zlib.error, EOFError, OSError, ValueError) as e:
                    # A corrupt member ends what we can read of this file: count it, move on.
                    self.stat_update("corrupt_files")
                    from datatrove.utils.logging import logger

                    logger.warning(f"{filepath}: corrupt after record {i}, rest skipped: {e}")
                    return
                i += 1
                if data is None:
                    continue
                doc = self.get_document_from_dict(data, filepath, i)
                if doc:
                    yield doc

    def _record(self, record) -> dict | None:
        self.stat_update("records")
        if record.rec_type == "conversion":  # WET: Common Crawl already extracted the text
            text = record.content_stream().read().decode("utf-8", errors="replace")
            return self._doc(record, text, "wet")
        if record.rec_type != "response":
            return None
        http = record.http_headers
        status = http.get_statuscode() if http else None
        if status and status != "200":
            self.stat_update("not_200")
            return None
        declared = record.rec_headers.get_header("WARC-Identified-Payload-Type")
        content_type = http.get_header("Content-Type") if http else None
        kind = (declared or content_type or "").split(";")[0].strip().lower()
        body = record.content_stream().read(MAX_HTML_BYTES + 1)
        if kind and kind not in _HTML_TYPES:
            self.stat_update("not_html")
            return None
        if not kind and b"<html" not in body[:2048].lower():
            self.stat_update("not_html")
            return None
        if len(body) > MAX_HTML_BYTES:
            self.stat_update("too_large")
            return None
        text, how = decode_html(body, content_type)
        if text is None:
            self.stat_update("undecodable")
            return None
        if how.startswith(("detected", "utf-8-replace")):
            self.stat_update(f"charset_{how.split(':')[0]}")
        return self._doc(record, text, "html")

    @staticmethod
    def _doc(record, text: str, content: str) -> dict:
        h = record.rec_headers
        return {"text": text, "id": h.get_header("WARC-Record-ID") or "",
                "url": h.get_header("WARC-Target-URI") or "", "date": h.get_header("WARC-Date") or "",
                "content": content}


# --------------------------------------------------------------------------- extraction


class Prescreen(BaseFilter):
    """Drops a page before trafilatura runs when a cheap extraction of it (resiliparse's text of
    the whole page, ~1/20 of trafilatura's CPU) already fails a rule its real text fails too:

    - another language with confidence: the top language is not a kept one and has probability
      >= the language threshold (the language filter would drop it either way);
    - on large pages (>= `ngram_screen_bytes` of HTML, where trafilatura costs most), one phrase
      repeated over the text: a 2-, 3- or 4-word n-gram whose repeats cover more of the text than
      Gopher's top-n-gram rule allows (listings, tag clouds, navigation pages).

    Trafilatura's CPU is spread unevenly: on the filter bench the ten costliest pages took 45% of
    it, all pages the filters drop in the end. Measured on the bench's 332 distinct pages: none of
    the 168 documents the stage keeps is screened out (issue 14)."""

    name = "🔭 Prescreen"

    def __init__(self, languages: list[str], language_threshold: float, top_n_grams=(), words=None,
                 exclusion_writer=None, ngram_screen_bytes: int = 64 << 10, language_chars: int = 5_000,
                 identifier: str = "lid.176"):
        super().__init__(exclusion_writer)
        self.languages, self.language_threshold, self.identifier = set(languages), language_threshold, identifier
        self.top_n_grams, self.words = tuple(tuple(x) for x in top_n_grams), words
        self.ngram_screen_bytes, self.language_chars = ngram_screen_bytes, language_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("content") == "wet":
            return True
        from resiliparse.extract.html2text import extract_plain_text

        # the whole page's text: resiliparse's main-content pass is quadratic in the depth of the
        # DOM (minutes on a page of 100,000 nested <div>), this one is linear
        text = extract_plain_text(doc.text, main_content=False, alt_texts=False, links=False,
                                  list_bullets=True, noscript=False, comments=False).strip()
        if not text:
            return True  # nothing to judge by: trafilatura decides
        lang, score = top_language(text, self.language_chars, self.identifier)
        if lang not in self.languages and score >= self.language_threshold:
            return False, f"language_{lang}"
        if self.top_n_grams and len(doc.text) >= self.ngram_screen_bytes:
            words = self.words.word_tokenize(text)
            for n, n_frac in self.top_n_grams:
                if top_ngram_chars(words, n) / len(text) > n_frac:
                    return False, f"top_{n}_gram"
        return True


def top_ngram_chars(words: list[str], n: int) -> int:
    """Gopher's top-n-gram measure (datatrove's `find_top_duplicate(get_n_grams(words, n))`: the
    characters of the most frequent n-gram, joined by spaces, times its count), counting tuples
    instead of building every joined string."""
    if len(words) < n:
        return 0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = max(counts.items(), key=lambda kv: kv[1])  # the first of the most frequent, as most_common(1)
    return (sum(map(len, gram)) + n - 1) * count


def duplicate_ngram_chars(joined: str, offsets: list[int], n: int) -> int:
    """datatrove's `find_all_duplicate(words, n)` (characters in n-grams seen before, an n-gram
    being its words joined without a separator), each n-gram a slice of the words joined once
    (`joined`, `offsets[i]` where word i starts) instead of a join per position."""
    unique: set[str] = set()
    repeated, idx, last = 0, 0, len(offsets) - 1 - n + 1
    while idx < last:
        gram = joined[offsets[idx]:offsets[idx + n]]
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


class FastGopherRepetition(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter (0.10.1), the same decision for every document with less
    CPU: top n-grams counted as tuples (`top_ngram_chars`), repeated n-grams as slices of one
    string (`duplicate_ngram_chars`). Its rules and thresholds are the parent's; this `filter` is
    the parent's with those two measures swapped in (tests/test_curation.py compares them)."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
        from datatrove.utils.text import split_into_words

        text = doc.text
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        paragraphs_duplicates, char_duplicates = find_duplicates(paragraphs)
        if self.dup_para_frac and paragraphs_duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_duplicates / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        line_duplicates, char_duplicates = find_duplicates(lines)
        if self.dup_line_frac and line_duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_duplicates / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = split_into_words(text, self.language)
        for n, n_frac in self.top_n_grams:
            if len(words) >= n and top_ngram_chars(words, n) / len(text) > n_frac:
                return False, f"top_{n}_gram"
        if self.dup_n_grams:
            joined, offsets = "".join(words), [0]
            for w in words:
                offsets.append(offsets[-1] + len(w))
            for n, n_frac in self.dup_n_grams:
                if duplicate_ngram_chars(joined, offsets, n) / len(text) > n_frac:
                    return False, f"duplicated_{n}_n_grams"
        return True


class Extract(PipelineStep):
    """HTML -> main text. Deterministic: same HTML, same text, whatever the machine load."""

    type = "🛢 - EXTRAC"

    def __init__(self, extractor: str = "trafilatura", favour_precision: bool = True, boilerplate: bool = False):
        if extractor not in ("trafilatura", "resiliparse"):
            raise ValueError(f"unknown extractor {extractor!r}")
        self.name = f"⛏ {extractor}"  # before super().__init__(): it names the stats
        super().__init__()
        self.extractor, self.favour_precision, self.boilerplate = extractor, favour_precision, boilerplate

    def extract(self, html: str) -> str:
        text = self._extract(html)
        if self.boilerplate and text:
            from tasks.boilerplate import strip_boilerplate

            text = strip_boilerplate(text)  # the lines of page furniture the extractor let through
        return text

    def _extract(self, html: str) -> str:
        if self.extractor == "trafilatura":
            import trafilatura

            from tasks.xpaths import install

            install()  # its discard XPaths in Python: the same text for a third less CPU
            # deduplicate=False: trafilatura's dedup cache carries state across documents.
            return trafilatura.extract(html, favor_precision=self.favour_precision,
                                       include_comments=False, deduplicate=False) or ""
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(html, main_content=True, alt_texts=False, links=False,
                                  list_bullets=True, noscript=False, comments=False)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            if doc.metadata.get("content") == "wet":
                doc.metadata["extractor"] = "wet"
                yield doc
                continue
            with self.track_time():
                try:
                    text = self.extract(doc.text).strip()
                except Exception:  # a page that breaks the parser is one page, not the run
                    self.stat_update("extract_error")
                    continue
            if not text:
                self.stat_update("empty")
                continue
            doc.text = text
            doc.metadata["extractor"] = self.extractor
            self.stat_update("forwarded")
            yield doc


# --------------------------------------------------------------------------- filters


class LanguageId(BaseFilter):
    """Keeps documents in `languages` whose top language has probability >= threshold, by
    fastText `lid.176` (FineWeb's model and threshold; its compressed `.ftz` form ships with
    crawl2model, so nothing is downloaded) or py3langid (`identifier`)."""

    name = "🌍 Language ID"

    def __init__(self, languages: list[str], threshold: float = 0.65, exclusion_writer=None,
                 max_chars: int = 20_000, identifier: str = "lid.176"):
        super().__init__(exclusion_writer)
        self.languages, self.threshold, self.max_chars = set(languages), threshold, max_chars
        self.identifier = identifier

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        # top-1 only: the document is kept when a kept language is the top one with p >= threshold
        lang, score = top_language(doc.text, self.max_chars, self.identifier)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.threshold:
            return False, "low_confidence"
        return True


def _domain_hash(domain: str) -> int:
    return int.from_bytes(hashlib.blake2b(domain.encode(), digest_size=8).digest(), "little")


def compact_blocklist() -> np.ndarray:
    """datatrove's domain blocklist as a sorted uint64 array of hashes, built once from the
    archive inside the datatrove wheel and cached (no network, no 123 MB extraction)."""
    from datatrove.utils._import_utils import ASSETS_PATH

    from tasks.stage import cache_dir

    path = os.path.join(cache_dir(), "url-blocklist-v0_3_0.u64.npy")
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    with tarfile.open(os.path.join(ASSETS_PATH, "url_filterblacklistsv0_3_0.tar.gz"), "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.rsplit("/", 1)[-1] == "domains")
        f = tar.extractfile(member)
        hashes = np.fromiter((_domain_hash(line.strip().decode("utf-8", "ignore")) for line in f
                              if line.strip() and not line.startswith(b"#")), dtype=np.uint64)
    hashes = np.unique(hashes)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, hashes)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


class QualityClassifier(BaseFilter):
    """A quality model's score (tasks/quality.py) in each document's metadata (`quality_score`);
    documents scored below `threshold` are removed. The model is loaded once per process."""

    name = "🎓 quality classifier"

    def __init__(self, model_path: str, threshold: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.model_path, self.threshold = model_path, threshold

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from tasks.quality import load_model, score

        s = round(score(load_model(self.model_path), doc.text), 4)
        doc.metadata["quality_score"] = s
        return True if s >= self.threshold else (False, f"quality_score {s} < {self.threshold:.4f}")


class CompactURLFilter(URLFilter):
    name = "😈 URL filter"

    def __init__(self, exclusion_writer=None):
        super().__init__(exclusion_writer=exclusion_writer)
        from tldextract import TLDExtract

        # suffix_list_urls=(): the suffix list snapshot inside tldextract, never publicsuffix.org
        self.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)
        self._domains = None

    def download_data(self):
        if self._downloaded:
            return
        self._domains = compact_blocklist()
        url_lists = self.block_listed_url
        from datatrove.utils._import_utils import ASSETS_PATH

        with tarfile.open(os.path.join(ASSETS_PATH, "url_filterblacklistsv0_3_0.tar.gz"), "r:gz") as tar:
            member = next(m for m in tar.getmembers() if m.name.rsplit("/", 1)[-1] == "urls")
            self.block_listed_url = url_lists | {l.strip().decode("utf-8", "ignore")
                                                 for l in tar.extractfile(member) if l.strip()}
        from datatrove.pipeline.filters.url_filter import get_list

        self.banned_words = get_list(ASSETS_PATH, "banned_words.txt", self.banned_words)
        self.banned_subwords = get_list(ASSETS_PATH, "banned_subwords.txt", self.banned_subwords)
        self.soft_banned_words = get_list(ASSETS_PATH, "soft_banned_words.txt", self.soft_banned_words)
        for word in self.banned_subwords:
            self.banned_subwords_automaton.add_word(word, len(self.banned_subwords_automaton))
        self.banned_subwords_automaton.make_automaton()
        self._downloaded = True

    def _blocked(self, domain: str) -> bool:
        if not domain:
            return False
        h = np.uint64(_domain_hash(domain))
        i = int(np.searchsorted(self._domains, h))
        return i < len(self._domains) and self._domains[i] == h

    def filter(self, document: Document) -> bool | tuple[bool, str]:
        """The stock filter's checks, with the domain lookups against the compact array (and
        any extra domains given), one tldextract call per document."""
        from datatrove.pipeline.filters.url_filter import normalize, normalizer

        self.download_data()
        url = document.metadata.get("url") or ""
        if not url:
            self.stat_update("no_url")
            return True  # nothing to judge (e.g. a resource record without a target URI)
        info = self.tldextractor(url)
        if self._blocked(info.registered_domain) or info.registered_domain in self.block_listed_domains:
            return False, "domain"
        if self._blocked(info.fqdn) or info.fqdn in self.block_listed_domains:
            return False, "subdomain"
        if url in self.block_listed_url:
            return False, "url"
        url_words = set(normalizer.split(url))
        if any(word in url_words for word in self.banned_words):
            return False, "hard_blacklisted"
        if sum(word in url_words for word in self.soft_banned_words) >= self.soft_word_threshold:
            return False, "soft_blacklisted"
        if self.banned_subwords and next(self.banned_subwords_automaton.iter(normalize(url)), False):
            return False, "blacklisted_subword"
        return True


# --------------------------------------------------------------------------- accounting


class Meter(PipelineStep):
    """Counts documents and UTF-8 bytes passing this point of the pipeline."""

    type = "📏 - METER"

    def __init__(self, point: str):
        self.name = f"meter:{point}"  # before super().__init__(): it names the stats
        super().__init__()
        self.point = point

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("docs")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            yield doc


class RemovedSample(ParquetWriter):
    """What a filter removed: at most `cap` documents per task, chosen by a hash of the id
    (deterministic, spread over the input), each with the filter's reason."""

    def __init__(self, output_folder, filter_name: str, cap: int = 100, rate: float = 0.25):
        super().__init__(output_folder, output_filename=f"{filter_name}/${{rank}}.parquet",
                         adapter=_removed_adapter, compression="zstd")
        self.cap, self.rate, self.kept = cap, rate, 0

    def write(self, document: Document, rank: int = 0, **kwargs):
        if self.kept >= self.cap:
            return
        if int(hashlib.md5(document.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF >= self.rate:
            return
        self.kept += 1
        super().write(document, rank, **kwargs)


def _removed_adapter(self, doc: Document) -> dict:
    return {"id": doc.id, "url": doc.metadata.get("url", ""), "reason": doc.metadata.get("filter_reason", ""),
            "cluster_id": int(doc.metadata.get("minhash_cluster_id", -1)), "text": doc.text[:20_000]}


def document_adapter(self, doc: Document) -> dict:
    """The columns of the filter and dedup outputs."""
    m = doc.metadata
    return {"id": doc.id, "text": doc.text, "url": m.get("url", ""), "crawl": m.get("crawl", ""),
            "date": m.get("date", ""), "language": m.get("language", ""),
            "language_score": float(m.get("language_score", 0.0)), "extractor": m.get("extractor", ""),
            **({"quality_score": float(m["quality_score"])} if "quality_score" in m else {})}


# -- running a pipeline ----------------------------------------------------------------

def _worker(executor, slot: int, stage, alive) -> None:
    """A process that runs the datatrove tasks the stage sends it (ranks over `stage`, a socket),
    one at a time, answering the task's CPU seconds when it is done or (exception, traceback)
    when it failed.
    `alive` closes when the stage dies, and then this process dies too instead of writing on
    beside a rerun (its parent is the forkserver, which lives as long as any of its clients, so
    PR_SET_PDEATHSIG would not fire)."""
    import signal
    import threading
    import traceback
    from copy import deepcopy

    def die_with_stage() -> None:
        alive.poll(None)  # the stage never writes to it: this returns when its end closes
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=die_with_stage, name="die-with-stage", daemon=True).start()
    pipeline = executor.pipeline
    while (rank := stage.recv()) is not None:
        executor.pipeline = deepcopy(pipeline)  # no step state carried from one task to the next
        cpu = own_cpu_seconds()
        try:
            executor._run_for_rank(rank, slot)
        except BaseException as e:
            tb = "".join(traceback.format_exception(e))[-20_000:]
            try:
                stage.send((e, tb))
            except Exception:  # an exception that does not pickle: its text is enough
                stage.send((RuntimeError(f"{type(e).__name__}: {e}"), tb))
            os._exit(1)
        stage.send(own_cpu_seconds() - cpu)  # done: the task's CPU seconds, for the stage's manifest


# datatrove.utils.{word_tokenizers,text}: a step module that imports one of these splits words with spaCy
_WORD_SPLITTERS = ("load_word_tokenizer", "split_into_words", "split_into_parts")


def preload_modules(pipeline: list) -> list[str]:
    """The modules a worker of `pipeline` imports: its steps' modules, their declared dependencies
    and spaCy for a step that splits words with it (one given a language code rather than
    `tasks.words.SpacyEnglishSplitter`; datatrove imports spaCy lazily, ~4 s of CPU). The
    forkserver imports them once and every worker it forks has them; without this each worker
    (two per datatrove run, six runs in `dedup`) imported them itself."""
    mods = ["__main__", __name__]  # __main__: multiprocessing's own default
    for step in pipeline:
        module = type(step).__module__
        mods.append(module)
        for cls in type(step).mro():
            for dep in vars(cls).get("_requires_dependencies", []):
                mods.append(dep[0] if isinstance(dep, tuple) else dep)
        if isinstance(getattr(step, "language", None), str) \
                and any(hasattr(sys.modules.get(module), f) for f in _WORD_SPLITTERS):
            mods.append("spacy")
    return [m for m in dict.fromkeys(mods) if m == "__main__" or importlib.util.find_spec(m) is not None]


class FailFastExecutor(LocalPipelineExecutor):
    """datatrove's local executor, with worker processes of our own instead of a multiprocessing
    Pool. A Pool whose worker is killed (the out-of-memory killer) waits forever for that
    worker's task, so the stage hung; here the death ends the stage at once with an error naming
    the task, and a rerun redoes only the unfinished tasks. No Manager process either, and the
    workers die with the stage: nothing is left behind when the stage itself is killed."""

    def run(self):
        ranks = self.get_incomplete_ranks(range(self.tasks))
        if not ranks:
            logger.info(f"Not doing anything as all {self.tasks} tasks have already been completed.")
            return
        self.save_executor_as_json()
        done = self.tasks - len(ranks)
        if done:
            logger.info(f"Skipping {done} already completed tasks")
        ctx = multiprocess.get_context(self.start_method)
        if self.start_method == "forkserver":  # used when this process starts its forkserver
            ctx.set_forkserver_preload(preload_modules(self.pipeline))
        alive, alive_for_workers = ctx.Pipe()
        running = {}  # socket to a worker -> [process, the rank it runs]
        try:
            # slot: datatrove's local_rank; only slot 0 logs to the console
            for slot in range(min(self.workers, len(ranks))):
                stage, worker_end = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(self, slot, worker_end, alive_for_workers),
                                   name=f"datatrove-worker-{slot}", daemon=True)
                proc.start()
                worker_end.close()
                rank = ranks.pop(0)
                stage.send(rank)
                running[stage] = [proc, rank]
            alive_for_workers.close()
            while running:
                # read answers and deaths alike: an exception's report can exceed a pipe's buffer
                ready = set(wait([*running, *(p.sentinel for p, _ in running.values())]))
                for stage in [c for c, (p, _) in running.items() if c in ready or p.sentinel in ready]:
                    proc, rank = running[stage]
                    try:
                        answer = stage.recv() if stage.poll() else "died"
                    except (EOFError, OSError):  # closed, or reset by a process killed mid-write
                        answer = "died"
                    if isinstance(answer, float):  # done (its CPU seconds): the next task, or the end
                        report_worker_cpu(answer)
                        done += 1
                        logger.info(f"{done}/{self.tasks} tasks completed.")
                        rank = running[stage][1] = ranks.pop(0) if ranks else None
                        try:
                            stage.send(rank)
                        except OSError:  # killed between two tasks
                            answer = "died"
                        else:
                            if rank is not None:
                                continue
                    proc.join()
                    del running[stage]
                    stage.close()
                    if isinstance(answer, tuple):
                        exc, tb = answer
                        raise exc from RemoteTraceback(tb)
                    if rank is not None and answer == "died":
                        raise TaskDied(f"datatrove task {rank} of {self.tasks} {how_it_ended(proc.exitcode)}; "
                                       "the tasks that finished are kept, rerun to resume")
        finally:
            alive.close()
            for stage, (proc, _) in running.items():
                proc.kill()
                proc.join()
                stage.close()
