"""Stage `shard`: every document tokenised into Parquet token shards (the format model/data.py
reads; see its docstring).

Streaming in two passes, so memory stays flat as the corpus grows:
1. tokenise batch by batch, split train/val by a hash of the document id, and scatter rows into
   buckets by a seeded hash (the shuffle);
2. each bucket (about one shard of tokens) is read back, ordered by its shuffle key and
   written as a zstd Parquet shard.
Both passes run on `threads` processes (one per core): a row group of the input is read and
tokenised, and a bucket sorted and compressed, by a worker; the stage process writes their
results in input order, so the shards are the same bytes whatever the number of processes
(threads of sentencepiece alone left most of the work, Python's and Arrow's, on one core).
With executor `ray`, pass 1 (the tokenising: most of the CPU) runs as Ray tasks on the cluster;
pass 2 reads the buckets pass 1 left on this machine's disk, so it stays on its processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from tasks.cluster import ExecutorParams, ray_cluster, ray_map
from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, document_files, input_ref, resolve_inputs, run_stage
from tasks.tokenizer import (BLOCK_CHARS, BOS, TokenizerError, check_special_tokens, check_text, load, text_blocks,
                             tokenizer_path)

CODE_VERSION = "shard/2"  # 2: at least one validation document whenever there can be one


class ShardParams(StageParams, ExecutorParams):
    """The `shard` stage."""

    input: str = input_ref("dedup", "filter")
    tokenizer: str = input_ref("tokenizer")
    extra: list[str] = input_ref("ingest", many=True, description="ingest refs of extra text files (UTF-8), cut "
                                 "into documents of about 4 KB and sharded with the corpus")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="documents held out for validation")
    shard_tokens: int = Field(16 * 2**20, ge=1024, description="target tokens per shard")
    seed: int = Field(0, ge=0, description="seed of the document shuffle")
    row_group_tokens: int = Field(1 << 20, ge=256, description="target tokens per Parquet row group")
    threads: int = Field(2, ge=1, le=1024, description="processes that tokenise and write shards "
                         "(not part of the version: the shards are the same bytes)")

    def recipe(self) -> dict:
        return self.model_dump(mode="json", exclude={"input", "rebuild", "tokenizer", "extra", "threads",
                                                     *self.NOT_IN_VERSION})


MIN_DOCUMENTS_FOR_WORKERS = 1000  # fewer: one process (workers cost about a second to start)


def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


_model = functools.cache(load)  # a worker loads the tokenizer once


def _schema(dtype) -> pa.Schema:
    return pa.schema([("key", pa.float64()), ("id", pa.string()), ("tokens", pa.list_(dtype))])


_FS = None  # the lake's filesystem in this process (a worker gets it pickled, credentials and all)


def _use_fs(fs) -> None:
    global _FS
    _FS = fs


TEXT_BLOCKS_PER_CALL = 1024  # documents of an extra text file tokenised per call (a Parquet row group's worth)


def _documents(path: str, part) -> list[dict]:
    """One unit of pass 1: a row group of a filter/dedup version's Parquet file (`part` its
    index), or TEXT_BLOCKS_PER_CALL documents of an extra text file (`part`: (id prefix, byte
    offset, paragraph index) of the first, from `text_parts`); their id and text."""
    with _FS.open(path, "rb") as fh:
        if isinstance(part, int):
            return pq.ParquetFile(fh).read_row_group(part, columns=["id", "text"]).to_pylist()
        prefix, offset, paragraph = part
        fh.seek(offset)
        return [doc for doc, _, _ in text_blocks(fh, prefix, paragraph, TEXT_BLOCKS_PER_CALL)]


def text_parts(fh, prefix: str) -> Iterator[tuple[str, int, int]]:
    """Where each TEXT_BLOCKS_PER_CALL-document part of an extra text file starts (a streaming
    pass that cuts without tokenising: cheap beside the tokenising)."""
    yield prefix, 0, 0
    for k, (_, offset, paragraph) in enumerate(text_blocks(fh, prefix), 1):
        if k % TEXT_BLOCKS_PER_CALL == 0:
            yield prefix, offset, paragraph


def tokenise_batch(source: tuple, model_path: str, bos: int, dtype_name: str, val_fraction: float,
                   seed: int, buckets: dict[str, int]) -> tuple[dict[tuple[str, int], pa.Table], tuple[float, str]]:
    """Pass 1 on one row group of the input (`source`: (path, row group) in the lake's filesystem;
    the worker reads it itself): each document's tokens (BOS first), its split and shuffle key, as one table per
    (split, bucket); and the (validation hash, id) of its document likeliest to go to validation."""
    batch = _documents(*source)
    dtype = pa.uint16() if dtype_name == "uint16" else pa.uint32()
    ids = _model(model_path).encode([d["text"] for d in batch], num_threads=1)  # one core per process
    rows: dict[tuple[str, int], list] = {}
    first = (2.0, "")
    for d, toks in zip(batch, ids):
        h = _unit(f"val:{d['id']}")
        first = min(first, (h, d["id"]))
        split = "val" if h < val_fraction else "train"
        key = _unit(f"{seed}:{d['id']}")
        rows.setdefault((split, _bucket(buckets, split, key)), []).append((key, d["id"], [bos, *toks]))
    tables = {}
    for where, rs in rows.items():
        keys, doc_ids, toks = zip(*rs)
        tables[where] = pa.table({"key": list(keys), "id": list(doc_ids), "tokens": pa.array(toks, type=pa.list_(dtype))},
                                 schema=_schema(dtype))
    return tables, first


def tokenise_on_node(lake: Lake, tokenizer: str, source: tuple, *rest) -> tuple:
    """Pass 1 on a Ray worker: `tokenise_batch` with the lake's filesystem and the tokenizer as
    that machine sees them (an S3 lake's tokenizer is copied to its cache once)."""
    _use_fs(lake.fs)
    return tokenise_batch(source, tokenizer_path(lake, tokenizer), *rest)


def _bucket(buckets: dict[str, int], split: str, key: float) -> int:
    return min(int(key * buckets[split]), buckets[split] - 1)


def write_shard(bucket_path: str, out: str, row_group_tokens: int) -> tuple[int, int]:
    """Pass 2 on one bucket: its rows in shuffle order, written as a zstd Parquet shard.
    Returns (documents, tokens)."""
    table = pq.read_table(bucket_path).sort_by("key")
    tokens = int(pc.list_value_length(table.column("tokens")).to_numpy().sum())
    rows_per_group = max(1, int(len(table) * row_group_tokens / max(tokens, 1)))
    pq.write_table(table.select(["id", "tokens"]), out, compression="zstd", row_group_size=rows_per_group)
    return len(table), tokens


class _InOrder:
    """Runs calls on `processes` worker processes (in this one when 1), each set up by
    `initializer(*initargs)`, and yields their results in the order of the calls, holding at most
    two calls per process in flight."""

    def __init__(self, processes: int, initializer, initargs: tuple):
        self.processes, self.pool = processes, None
        if processes > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("forkserver")  # the stage may run in a thread: no fork
            ctx.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=initializer, initargs=initargs)
        else:
            initializer(*initargs)

    def map(self, fn, calls):
        if self.pool is None:
            for args in calls:
                yield fn(*args)
            return
        from collections import deque

        pending: deque = deque()
        for args in calls:
            pending.append(self.pool.submit(fn, *args))
            if len(pending) >= 2 * self.processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def shard_documents(lake: Lake, params: ShardParams, log: Callable[[str], None] = print) -> Manifest:
    inputs = resolve_inputs(lake, params)
    source, tok, extras = inputs["input"], inputs["tokenizer"], inputs["extra"]
    sp = load(tokenizer_path(lake, tok.ref))
    special = check_special_tokens(sp)  # before any work: the model's life depends on them
    vocab = sp.get_piece_size()
    dtype = pa.uint16() if vocab <= 65536 else pa.uint32()
    if not source.metrics.get("documents") and not extras:
        raise TokenizerError(f"{source.ref} holds no documents: nothing to shard")
    bpt = tok.metrics.get("bytes_per_token") or 3.0
    extra_bytes = sum(e.metrics.get("bytes", 0) for e in extras)
    est_tokens = max(1, int((source.metrics.get("bytes", 0) + extra_bytes) / bpt))
    est_documents = source.metrics.get("documents", 0) + extra_bytes // BLOCK_CHARS

    def build(prod: Production) -> None:
        buckets = {"train": max(1, math.ceil(est_tokens * (1 - params.val_fraction) / params.shard_tokens)),
                   "val": max(1, math.ceil(est_tokens * params.val_fraction / params.shard_tokens))}
        model_path = tokenizer_path(lake, tok.ref)
        dtype_name = "uint16" if dtype == pa.uint16() else "uint32"
        # worker processes only when there is more than one batch to share (their start-up costs
        # about a second); the bytes are the same either way
        processes = params.threads if est_documents > MIN_DOCUMENTS_FOR_WORKERS else 1
        with tempfile.TemporaryDirectory() as tmp, _InOrder(processes, _use_fs, (lake.fs,)) as workers, \
                ray_cluster(params, lake) as on_ray:
            writers: dict[tuple[str, int], pq.ParquetWriter] = {}
            docs = {"train": 0, "val": 0}
            first = (2.0, "")  # (val hash, id) of the document likeliest to go to validation

            def row_groups():  # the units of pass 1; each worker reads its own
                for path in document_files(source):
                    with lake.open(source, path) as fh:
                        groups = pq.ParquetFile(fh).num_row_groups
                    for g in range(groups):
                        yield ((lake.path(source.kind, source.version, path), g), model_path, special[BOS],
                               dtype_name, params.val_fraction, params.seed, buckets)
                for e in extras:  # the extra texts, cut into documents as the tokenizer cut them
                    for f in e.files:
                        with lake.open(e, f["path"]) as fh:
                            check_text(fh, f"{e.ref}/{f['path']}")
                            for part in text_parts(fh, f"{e.ref}/{f['path']}"):
                                yield ((lake.path(e.kind, e.version, f["path"]), part), model_path, special[BOS],
                                       dtype_name, params.val_fraction, params.seed, buckets)

            if on_ray:  # the same calls, but the tokenizer as each node sees it
                batches = ray_map(tokenise_on_node, ((lake, tok.ref, call[0], *call[2:]) for call in row_groups()),
                                  f"shard {prod.ref}: tokenising")
            else:
                batches = workers.map(tokenise_batch, row_groups())
            for tables, batch_first in batches:
                first = min(first, batch_first)
                for (split, b), table in tables.items():
                    if (split, b) not in writers:
                        writers[(split, b)] = pq.ParquetWriter(os.path.join(tmp, f"{split}-{b}.parquet"), table.schema)
                    writers[(split, b)].write_table(table)
                    docs[split] += len(table)
            for w in writers.values():
                w.close()
            if params.val_fraction > 0 and docs["val"] == 0 and docs["train"] >= 2:
                # a small corpus where the hash sent nothing to validation: move the document
                # closest to it there, so there is always something to validate on
                doc_id = first[1]
                key = _unit(f"{params.seed}:{doc_id}")
                path = os.path.join(tmp, f"train-{_bucket(buckets, 'train', key)}.parquet")
                table = pq.read_table(path)
                moved = pc.equal(table.column("id"), doc_id)
                rest = table.filter(pc.invert(moved))
                if len(rest):
                    pq.write_table(rest, path)
                else:
                    os.remove(path)
                pq.write_table(table.filter(moved), os.path.join(tmp, f"val-{_bucket(buckets, 'val', key)}.parquet"))
                docs["train"], docs["val"] = docs["train"] - 1, 1

            splits = {}
            for split in ("train", "val"):
                present = [os.path.join(tmp, f"{split}-{b}.parquet") for b in range(buckets[split])]
                present = [p for p in present if os.path.exists(p)]
                names = [f"{split}/shard-{n:05d}.parquet" for n in range(len(present))]
                calls = [(p, f"{p}.shard", params.row_group_tokens) for p in present]
                counts = []
                for (bucket_path, out, _), name, (n_docs, tokens) in zip(calls, names,
                                                                         workers.map(write_shard, calls)):
                    prod.put_file(out, name)
                    os.remove(out)
                    counts.append({"file": name, "documents": n_docs, "tokens": tokens})
                splits[split] = {"files": names, "documents": docs[split],
                                 "tokens": int(sum(c["tokens"] for c in counts)), "shards": counts}
        if splits["train"]["tokens"] == 0:
            raise TokenizerError(f"no training tokens: every document of {source.ref} went to validation")
        meta = {"vocab_size": vocab, "bos_id": special[BOS], "special_tokens": special,
                "dtype": "uint16" if dtype == pa.uint16() else "uint32", "tokenizer": tok.ref,
                **({"extra": [e.ref for e in extras]} if extras else {}),
                "bytes_per_token": bpt, "splits": splits}
        prod.write_bytes("meta.json", json.dumps(meta, indent=2).encode())
        prod.put_file(tokenizer_path(lake, tok.ref), "tokenizer.model")  # the shards travel with it
        prod.metrics.update({"vocab_size": vocab, "dtype": meta["dtype"],
                             "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
                             "train_documents": docs["train"], "val_documents": docs["val"],
                             "shards": {s: splits[s]["shards"] for s in splits}})
        log(f"shard: {docs['train']} train / {docs['val']} val documents, "
            f"{splits['train']['tokens']:,} / {splits['val']['tokens']:,} tokens in "
            f"{len(splits['train']['files'])} + {len(splits['val']['files'])} shards")
        publish(splits, prod.ref)

    return run_stage(lake, "shard", params.recipe(), [source.ref, tok.ref, *(e.ref for e in extras)], CODE_VERSION,
                     build, rebuild=params.rebuild)


def publish(splits: dict, ref: str) -> None:
    rows = [{"split": s, **c} for s in splits for c in splits[s]["shards"]]
    runtime().table("shard-counts", rows, f"{ref}: documents and tokens per shard")


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return f"{x['train_tokens']:,} train / {x['val_tokens']:,} val tokens"
