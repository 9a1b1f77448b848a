"""The quality classifier's data, made from ../shared/data for the tests and the benchmark:

- `labelled_set`: the 300 rubric-labelled documents (tests/data/quality/labels.jsonl: ids, labels
  and reasons; RUBRIC.md says how they were made) joined with their text and URL from the
  CC-MAIN-2019-30 file, as the JSON lines `quality-model --labelled` reads.
- `reference_files`: the reference text (positives) as plain text files to ingest: WikiText-2
  (as it is: the stage undoes its ` @-@ ` joins), three public-domain books, the OpenStax
  textbook with its CNXML tags removed, and the extraction benchmark's gold article bodies.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

LABELS = Path(__file__).parent / "data" / "quality" / "labels.jsonl"
CC_2019 = "text/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"
BOOKS = ["project_gutenberg_frankenstein.txt", "project_gutenberg_pride_and_prejudice.txt", "botchan.txt"]


def training_inputs(lake, shared_data: Path, work: Path) -> tuple[list[str], str, Path]:
    """What the test and the benchmark train on, besides the crawl's filter version: the reference
    files ingested (positives), the unlabelled CC-MAIN-2019 text ingested (more negatives), and the
    labelled set's file: (positive refs, the negatives' ref, the labelled file)."""
    from tasks.ingest import IngestParams, ingest_files

    positives = [ingest_files(lake, IngestParams(files=[str(p)])).ref for p in reference_files(shared_data, work)]
    more = ingest_files(lake, IngestParams(files=[str(unlabelled_crawl_text(shared_data, work / "cc-2019.txt"))])).ref
    return positives, more, labelled_set(shared_data, work / "labelled.jsonl")


def _labels() -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, LABELS.read_text().splitlines())}


def labelled_set(shared_data: Path, dest: Path) -> Path:
    labels = _labels()
    rows = {}
    with gzip.open(shared_data / CC_2019, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["id"] in labels:
                rows[doc["id"]] = {"id": doc["id"], "url": doc["metadata"].get("warc_url", ""), "text": doc["text"],
                                   "label": labels[doc["id"]]["label"]}
    assert rows.keys() == labels.keys(), "a labelled id is missing from the CC-MAIN-2019 file"
    dest.write_text("".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in labels), encoding="utf-8")
    return dest


def unlabelled_crawl_text(shared_data: Path, dest: Path) -> Path:
    """The CC-MAIN-2019 documents that are not labelled, as text (blank-line separated): more crawl text."""
    labels = _labels()
    with gzip.open(shared_data / CC_2019, "rt", encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for line in f:
            doc = json.loads(line)
            if doc["id"] not in labels and doc["text"].strip():
                out.write(doc["text"].strip() + "\n\n")
    return dest


def reference_files(shared_data: Path, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    text = shared_data / "text"
    out = [text / "wikitext-2-raw-test.raw", *(text / b for b in BOOKS)]
    book = dest / "openstax-anatomy-physiology.txt"
    with open(book, "w", encoding="utf-8") as f:
        for module in sorted((text / "openstax-anatomy-physiology").glob("*.cnxml")):
            xml = module.read_text(encoding="utf-8")
            paras = re.findall(r"<para\b[^>]*>(.*?)</para>", xml, flags=re.S)
            for p in paras:
                p = " ".join(re.sub(r"<[^>]+>", " ", p).split())
                if len(p.split()) >= 8:
                    f.write(p + "\n\n")
    gold = dest / "extraction-benchmark-gold.txt"
    truth = json.loads((shared_data / "extraction-benchmark" / "ground-truth.json").read_text(encoding="utf-8"))
    gold.write_text("".join((v.get("articleBody") or "").strip() + "\n\n" for _, v in sorted(truth.items())),
                    encoding="utf-8")
    return [*out, book, gold]
