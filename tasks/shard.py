"""Stage `shard`: every document tokenised into Parquet token shards (the format model/data.py
reads; see its docstring).

Streaming in two passes, so memory stays flat as the corpus grows:
1. tokenise batch by batch (sentencepiece on all cores), split train/val by a hash of the
   document id, and scatter rows into buckets by a seeded hash (the shuffle);
2. each bucket (about one shard of tokens) is read back, ordered by its shuffle key and
   written as a zstd Parquet shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage
from tasks.tokenizer import BOS, TokenizerError, check_special_tokens, iter_documents, load, tokenizer_path

CODE_VERSION = "shard/2"  # 2: at least one validation document whenever there can be one


class ShardParams(StageParams):
    """The `shard` stage."""

    input: str = input_ref("dedup", "filter")
    tokenizer: str = input_ref("tokenizer")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="documents held out for validation")
    shard_tokens: int = Field(16 * 2**20, ge=1024, description="target tokens per shard")
    seed: int = Field(0, ge=0, description="seed of the document shuffle")
    row_group_tokens: int = Field(1 << 20, ge=256, description="target tokens per Parquet row group")
    threads: int = Field(2, ge=1, le=1024, description="tokenising threads (not part of the version)")

    def recipe(self) -> dict:
        return self.model_dump(mode="json", exclude={"input", "rebuild", "tokenizer", "threads"})


def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def shard_documents(lake: Lake, params: ShardParams, log: Callable[[str], None] = print) -> Manifest:
    inputs = resolve_inputs(lake, params)
    source, tok = inputs["input"], inputs["tokenizer"]
    sp = load(tokenizer_path(lake, tok.ref))
    special = check_special_tokens(sp)  # before any work: the model's life depends on them
    vocab = sp.get_piece_size()
    dtype = pa.uint16() if vocab <= 65536 else pa.uint32()
    if not source.metrics.get("documents"):
        raise TokenizerError(f"{source.ref} holds no documents: nothing to shard")
    bpt = tok.metrics.get("bytes_per_token") or 3.0
    est_tokens = max(1, int(source.metrics.get("bytes", 0) / bpt))

    def build(prod: Production) -> None:
        buckets = {"train": max(1, math.ceil(est_tokens * (1 - params.val_fraction) / params.shard_tokens)),
                   "val": max(1, math.ceil(est_tokens * params.val_fraction / params.shard_tokens))}
        schema = pa.schema([("key", pa.float64()), ("id", pa.string()), ("tokens", pa.list_(dtype))])
        with tempfile.TemporaryDirectory() as tmp:
            writers: dict[tuple[str, int], pq.ParquetWriter] = {}

            def writer(split: str, b: int) -> pq.ParquetWriter:
                if (split, b) not in writers:
                    writers[(split, b)] = pq.ParquetWriter(os.path.join(tmp, f"{split}-{b}.parquet"), schema)
                return writers[(split, b)]

            docs = {"train": 0, "val": 0}
            batch: list[dict] = []
            first = [(2.0, "")]  # (val hash, id) of the document likeliest to go to validation

            def bucket(split: str, key: float) -> int:
                return min(int(key * buckets[split]), buckets[split] - 1)

            def flush() -> None:
                ids = sp.encode([d["text"] for d in batch], num_threads=params.threads)
                rows: dict[tuple[str, int], list] = {}
                for d, toks in zip(batch, ids):
                    h = _unit(f"val:{d['id']}")
                    first[0] = min(first[0], (h, d["id"]))
                    split = "val" if h < params.val_fraction else "train"
                    key = _unit(f"{params.seed}:{d['id']}")
                    b = bucket(split, key)
                    rows.setdefault((split, b), []).append((key, d["id"], [special[BOS], *toks]))
                    docs[split] += 1
                for (split, b), rs in rows.items():
                    keys, doc_ids, toks = zip(*rs)
                    writer(split, b).write_table(pa.table({"key": list(keys), "id": list(doc_ids),
                                                           "tokens": pa.array(toks, type=pa.list_(dtype))},
                                                          schema=schema))
                batch.clear()

            for doc in iter_documents(lake, source):
                batch.append(doc)
                if len(batch) >= 512:
                    flush()
            if batch:
                flush()
            for w in writers.values():
                w.close()
            if params.val_fraction > 0 and docs["val"] == 0 and docs["train"] >= 2:
                # a small corpus where the hash sent nothing to validation: move the document
                # closest to it there, so there is always something to validate on
                doc_id = first[0][1]
                key = _unit(f"{params.seed}:{doc_id}")
                path = os.path.join(tmp, f"train-{bucket('train', key)}.parquet")
                table = pq.read_table(path)
                moved = pc.equal(table.column("id"), doc_id)
                rest = table.filter(pc.invert(moved))
                if len(rest):
                    pq.write_table(rest, path)
                else:
                    os.remove(path)
                pq.write_table(table.filter(moved), os.path.join(tmp, f"val-{bucket('val', key)}.parquet"))
                docs["train"], docs["val"] = docs["train"] - 1, 1

            splits = {}
            for split in ("train", "val"):
                files, counts = [], []
                n = 0
                for b in range(buckets[split]):
                    path = os.path.join(tmp, f"{split}-{b}.parquet")
                    if not os.path.exists(path):
                        continue
                    table = pq.read_table(path).sort_by("key")  # one bucket: about one shard
                    name = f"{split}/shard-{n:05d}.parquet"
                    tokens = pc.list_value_length(table.column("tokens")).to_numpy().sum()
                    rows_per_group = max(1, int(len(table) * params.row_group_tokens / max(tokens, 1)))
                    out = os.path.join(tmp, "out.parquet")
                    pq.write_table(table.select(["id", "tokens"]), out, compression="zstd",
                                   row_group_size=rows_per_group)
                    prod.put_file(out, name)
                    files.append(name)
                    counts.append({"file": name, "documents": len(table), "tokens": int(tokens)})
                    n += 1
                splits[split] = {"files": files, "documents": docs[split],
                                 "tokens": int(sum(c["tokens"] for c in counts)), "shards": counts}
        if splits["train"]["tokens"] == 0:
            raise TokenizerError(f"no training tokens: every document of {source.ref} went to validation")
        meta = {"vocab_size": vocab, "bos_id": special[BOS], "special_tokens": special,
                "dtype": "uint16" if dtype == pa.uint16() else "uint32", "tokenizer": tok.ref,
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

    return run_stage(lake, "shard", params.recipe(), [source.ref, tok.ref], CODE_VERSION, build, rebuild=params.rebuild)


def publish(splits: dict, ref: str) -> None:
    rows = [{"split": s, **c} for s in splits for c in splits[s]["shards"]]
    runtime().table("shard-counts", rows, f"{ref}: documents and tokens per shard")


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return f"{x['train_tokens']:,} train / {x['val_tokens']:,} val tokens"
