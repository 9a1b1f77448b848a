"""Stages `tokenizer` and `shard`, and the reader model/data.py, on the dedup output of the real
WARCs plus real text from ../shared/data/text."""

from __future__ import annotations

import collections
import json

import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from model.data import ShardLoader, shard_files
from tasks.ingest import IngestParams, ingest_files
from tasks.lake import Lake
import tasks.shard as shard_module
from tasks.shard import ShardParams, shard_documents
from tasks.tokenizer import (MIN_VOCAB, SPECIAL_TOKENS, TokenizerError, TokenizerParams, iter_documents, load,
                             tokenizer_path, train_tokenizer)
from tests.conftest import copy_version, run_cli

EXTRA = ["tinyshakespeare.txt", "project_gutenberg_pride_and_prejudice.txt", "botchan.txt"]


@pytest.fixture(scope="module")
def corpus(curated_corpus, shared_data, tmp_path_factory):
    """The curated corpus's dedup version (made once for the run: conftest), copied with its
    lineage into a lake of this module's own, plus real texts; a tokenizer and shards of both."""
    lake = Lake(str(tmp_path_factory.mktemp("tokens") / "lake"))
    dd = lake.resolve(copy_version(Lake(curated_corpus["lake"]), lake, curated_corpus["dedup"]))
    extra = ingest_files(lake, IngestParams(files=[str(shared_data / "text" / n) for n in EXTRA]))
    tok = train_tokenizer(lake, TokenizerParams(input=dd.ref, extra=[extra.ref], vocab_size=4096),
                          log=lambda m: None)
    sh = shard_documents(lake, ShardParams(input=dd.ref, tokenizer=tok.ref, val_fraction=0.2,
                                           shard_tokens=8000, row_group_tokens=2000), log=lambda m: None)
    return {"lake": lake, "dedup": dd, "extra": extra, "tokenizer": tok, "shard": sh}


def test_tokenizer_is_lossless_with_reserved_tokens(corpus, shared_data):
    lake, tok = corpus["lake"], corpus["tokenizer"]
    sp = load(tokenizer_path(lake, tok.ref))
    assert sp.get_piece_size() == 4096 and tok.inputs == [corpus["dedup"].ref, corpus["extra"].ref]
    assert tok.metrics["roundtrip_exact"] == 1.0 and tok.metrics["heldout_documents"] >= 5
    # every document of the corpus and every extra text round-trips exactly
    for doc in iter_documents(lake, corpus["dedup"]):
        assert sp.decode(sp.encode(doc["text"])) == doc["text"]
    for name in EXTRA:
        text = (shared_data / "text" / name).read_text()
        assert sp.decode(sp.encode(text)) == text
    tricky = "  leading spaces\n\n\ttabs, emoji 😀, CJK 世界, e\u0301 NFD, \r\n CRLF, trailing  "
    assert sp.decode(sp.encode(tricky)) == tricky
    # the reserved tokens: one token each, never produced by plain text
    special = tok.metrics.get("special_tokens") or json.loads(lake.open(tok, "eval.json").read())["special_tokens"]
    assert list(special) == SPECIAL_TOKENS and len(set(special.values())) == len(SPECIAL_TOKENS)
    for piece, i in special.items():
        assert sp.id_to_piece(i) == piece and sp.is_control(i)
        assert i not in sp.encode(f"a {piece} b {piece}")
    # bytes/token side by side with GPT-4's cl100k on the same held-out text
    assert 2.0 < tok.metrics["bytes_per_token"] < tok.metrics["cl100k_bytes_per_token"] < 6.0
    r = run_cli("--lake", lake.url, "tokenize", "--tokenizer", tok.ref, "Hello world")
    assert r.returncode == 0 and str(sp.encode("Hello world")) in r.stdout


def test_shard_counts_add_up_and_every_document_is_there_once(corpus):
    lake, sh, dd = corpus["lake"], corpus["shard"], corpus["dedup"]
    sp = load(tokenizer_path(lake, corpus["tokenizer"].ref))
    expected = {d["id"]: len(sp.encode(d["text"])) + 1 for d in iter_documents(lake, dd)}
    meta = json.loads(lake.open(sh, "meta.json").read())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 4096 and meta["tokenizer"] == corpus["tokenizer"].ref
    assert sh.inputs == [dd.ref, corpus["tokenizer"].ref]
    seen = collections.Counter()
    totals = {}
    for split in ("train", "val"):
        total = 0
        for entry in meta["splits"][split]["shards"]:
            table = pq.read_table(lake.open(sh, entry["file"]))
            assert str(table.schema.field("tokens").type) == "list<element: uint16>"
            lengths = [len(t) for t in table.column("tokens").to_pylist()]
            assert sum(lengths) == entry["tokens"] and len(lengths) == entry["documents"]
            for doc_id, toks in zip(table.column("id").to_pylist(), table.column("tokens").to_pylist()):
                assert toks[0] == meta["bos_id"] and len(toks) == expected[doc_id]
                seen[doc_id] += 1
            total += entry["tokens"]
        assert total == meta["splits"][split]["tokens"] == sh.metrics[f"{split}_tokens"]
        totals[split] = total
    assert seen == collections.Counter(expected.keys())  # each document exactly once
    assert totals["train"] + totals["val"] == sum(expected.values())
    assert sh.metrics["val_documents"] >= 1 and len(meta["splits"]["train"]["files"]) >= 2


def test_tokenizer_and_shard_are_deterministic(corpus, tmp_path, monkeypatch):
    """Same inputs, same parameters: the same files, byte for byte, trained again elsewhere."""
    lake, sh, tok = corpus["lake"], corpus["shard"], corpus["tokenizer"]
    again = Lake(str(tmp_path / "again"))
    copy_version(lake, again, corpus["dedup"].ref)
    copy_version(lake, again, corpus["extra"].ref)
    tok2 = train_tokenizer(again, TokenizerParams(input=corpus["dedup"].ref, extra=[corpus["extra"].ref],
                                                  vocab_size=4096), log=lambda m: None)
    assert tok2.version == tok.version
    assert {f["path"]: f["sha256"] for f in tok2.files} == {f["path"]: f["sha256"] for f in tok.files}
    # one process here, three below (worker processes even for this small corpus, its row groups
    # spread over them): the same shards, byte for byte
    monkeypatch.setattr(shard_module, "MIN_DOCUMENTS_FOR_WORKERS", 0)
    sh2 = shard_documents(again, ShardParams(input="dedup", tokenizer="tokenizer", val_fraction=0.2,
                                             shard_tokens=8000, row_group_tokens=2000, threads=1), log=lambda m: None)
    assert {f["path"]: f["sha256"] for f in sh2.files} == {f["path"]: f["sha256"] for f in sh.files}
    sh3 = shard_documents(again, ShardParams(input="dedup", tokenizer="tokenizer", val_fraction=0.2, rebuild=True,
                                             shard_tokens=8000, row_group_tokens=2000, threads=3), log=lambda m: None)
    assert {f["path"]: f["sha256"] for f in sh3.files} == {f["path"]: f["sha256"] for f in sh.files}


def test_shard_takes_extra_text_as_documents(corpus, shared_data, tmp_path, monkeypatch):
    """`extra` ingest versions are cut into documents as the tokenizer cuts them (about 4 KB of
    paragraphs each) and sharded with the corpus: every document once, BOS + its tokens; the
    shards do not depend on how the files are split among workers."""
    from tasks.tokenizer import iter_extra_texts

    lake, dd, tok, extra = corpus["lake"], corpus["dedup"], corpus["tokenizer"], corpus["extra"]
    sp = load(tokenizer_path(lake, tok.ref))
    expected = {d["id"]: len(sp.encode(d["text"])) + 1
                for d in [*iter_documents(lake, dd), *iter_extra_texts(lake, extra)]}
    from_text = [i for i in expected if i.startswith(extra.ref)]
    assert len(from_text) > 3 * 50 and {i.split("#")[0] for i in from_text} == {f"{extra.ref}/{n}" for n in EXTRA}
    monkeypatch.setattr(shard_module, "TEXT_BLOCKS_PER_CALL", 50)  # many parts per file, in this process
    params = dict(input=dd.ref, tokenizer=tok.ref, extra=[extra.ref], val_fraction=0.2, shard_tokens=100_000,
                  row_group_tokens=5000)
    sh = shard_documents(lake, ShardParams(**params, threads=1), log=lambda m: None)
    assert sh.inputs == [dd.ref, tok.ref, extra.ref] and sh.version != corpus["shard"].version
    meta = json.loads(lake.open(sh, "meta.json").read())
    assert meta["extra"] == [extra.ref]
    seen = collections.Counter()
    for split in ("train", "val"):
        for entry in meta["splits"][split]["shards"]:
            table = pq.read_table(lake.open(sh, entry["file"]))
            for doc_id, toks in zip(table.column("id").to_pylist(), table.column("tokens").to_pylist()):
                assert toks[0] == meta["bos_id"] and len(toks) == expected[doc_id], doc_id
                seen[doc_id] += 1
    assert seen == collections.Counter(expected.keys())
    assert sh.metrics["train_tokens"] + sh.metrics["val_tokens"] == sum(expected.values())
    # the default parts (a whole file each here) on worker processes: the same bytes
    monkeypatch.setattr(shard_module, "TEXT_BLOCKS_PER_CALL", 1024)
    again = Lake(str(tmp_path / "again"))
    for ref in (dd.ref, tok.ref, extra.ref):
        copy_version(lake, again, ref)
    sh2 = shard_documents(again, ShardParams(**params, threads=2), log=lambda m: None)
    assert sh2.version == sh.version
    assert {f["path"]: f["sha256"] for f in sh2.files} == {f["path"]: f["sha256"] for f in sh.files}
    # a WARC given as extra text: refused, naming it, nothing committed
    warc = ingest_files(lake, IngestParams(files=[str(shared_data / "warc" / "whirlwind.warc.gz")]))
    before = len(lake.versions("shard"))
    with pytest.raises(TokenizerError, match=f"{warc.ref}/whirlwind.warc.gz is not UTF-8 text"):
        shard_documents(lake, ShardParams(**{**params, "extra": [warc.ref]}), log=lambda m: None)
    assert len(lake.versions("shard")) == before


def test_reader_resumes_exactly_and_ranks_are_disjoint(corpus):
    lake, sh = corpus["lake"], corpus["shard"]
    root = lake.path("shard", sh.version)
    files = shard_files(root, "train")
    a = ShardLoader(files, batch_size=16, seq_len=128)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    after = [a.next_batch() for _ in range(40)]  # crosses row groups, shards and an epoch
    assert a.state_dict()["epoch"] >= 1
    b = ShardLoader(files, batch_size=16, seq_len=128)
    b.load_state_dict(json.loads(json.dumps(state)))  # as it would travel in a checkpoint
    for (x1, y1), (x2, y2) in zip(after, (b.next_batch() for _ in range(40))):
        assert x1.equal(x2) and y1.equal(y2)
    x, y = after[0]
    assert x[0, 1:].equal(y[0, :-1])  # targets are inputs shifted by one
    # two ranks read disjoint row groups, together all of them
    r0, r1 = (ShardLoader(files, 4, 32, rank=r, world_size=2) for r in (0, 1))
    assert set(r0.units).isdisjoint(r1.units) and len(r0.units) + len(r1.units) == len(ShardLoader(files, 4, 32).units)
    assert not r0.next_batch()[0].equal(r1.next_batch()[0])
    with pytest.raises(ValueError, match="different data layout or world size"):
        r1.load_state_dict(state)


def test_bad_input_is_refused_before_work(corpus, tmp_path):
    lake = corpus["lake"]
    r = run_cli("--lake", lake.url, "stage", "tokenizer", "--vocab-size", "100")
    assert r.returncode == 2 and "invalid vocab-size" in r.stderr and f"greater than or equal to {MIN_VOCAB}" in r.stderr
    with pytest.raises(TokenizerError, match="vocab-size 60000 is too large for the"):
        train_tokenizer(lake, TokenizerParams(input=corpus["dedup"].ref, extra=[corpus["extra"].ref],
                                                  vocab_size=60000), log=lambda m: None)
    # a tokenizer without the reserved tokens cannot shard
    plain = tmp_path / "plain"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 200 + ["the quick brown fox"] * 200),
                                   model_prefix=str(plain), vocab_size=40, model_type="bpe", minloglevel=2)
    with lake.produce("tokenizer", {"plain": True}, [], "test/1") as p:
        p.put_file(str(plain) + ".model", "tokenizer.model")
    with pytest.raises(TokenizerError, match="lacks the reserved token '<\\|bos\\|>'"):
        shard_documents(lake, ShardParams(input=corpus["dedup"].ref, tokenizer=p.ref), log=lambda m: None)
    assert not [m for m in lake.versions("shard") if corpus["tokenizer"].ref not in m.inputs]
    # an empty corpus
    with lake.produce("dedup", {"empty": True}, [], "test/1") as e:
        e.metrics["documents"] = 0
    with pytest.raises(TokenizerError, match="holds no documents"):
        train_tokenizer(lake, TokenizerParams(input=e.ref, vocab_size=4096), log=lambda m: None)


# -- a small corpus: the five WARCs of shared/data/warc ------------------------------------

def warc_record_ids(paths) -> set[str]:
    from warcio.archiveiterator import ArchiveIterator

    ids = set()
    for path in paths:
        with open(path, "rb") as f:
            ids.update(r.rec_headers.get_header("WARC-Record-ID") for r in ArchiveIterator(f))
    return ids


def dedup_version(lake: Lake, rows: list[dict], name: str):
    """A `dedup` version holding these documents (id, text), as the dedup stage writes them."""
    import io

    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "text": r["text"]} for r in rows]), buf)
    with lake.produce("dedup", {"test": name}, [], "test/1") as p:
        if not p.cached:
            p.write_bytes("data/000_00000.parquet", buf.getvalue())
            p.metrics.update({"documents": len(rows), "bytes": sum(len(r["text"].encode()) for r in rows)})
    return lake.resolve(p.ref)


@pytest.fixture(scope="module")
def small(corpus, shared_data, tmp_path_factory):
    """The documents that the five WARCs (*.warc.gz) of shared/data/warc give after filter +
    dedup: 34 (30 before the boilerplate lines were cut: fewer pages then passed the
    quality filters). The curated corpus ran the real stages on those five plus three more files and
    planted copies; filtering is per document, so its dedup output restricted to the five files'
    records is the same 34 documents (checked against the stages run on the five alone), at no extra cost; in
    a lake of its own, so its tokenizers and shards do not mix with the corpus's."""
    ids = warc_record_ids(sorted((shared_data / "warc").glob("*.warc.gz")))
    rows = [d for d in iter_documents(corpus["lake"], corpus["dedup"]) if d["id"] in ids]
    lake = Lake(str(tmp_path_factory.mktemp("small") / "lake"))
    return {"lake": lake, "dedup": dedup_version(lake, rows, "five warcs")}


def test_small_corpus_tokenizer_holds_out_a_document(small):
    """34 documents and the default holdout_fraction 0.05: the hash alone holds out none of them,
    and the stage used to fail (`no held-out documents for evaluation`)."""
    lake, dd = small["lake"], small["dedup"]
    assert dd.metrics["documents"] == 34
    tok = train_tokenizer(lake, TokenizerParams(input=dd.ref, vocab_size=1024), log=lambda m: None)
    assert tok.metrics["heldout_documents"] >= 1 and tok.metrics["sample_documents"] <= 33
    assert tok.metrics["roundtrip_exact"] == 1.0 and 1.0 < tok.metrics["bytes_per_token"] < 8.0
    report = json.loads(lake.open(tok, "eval.json").read())
    assert report["heldout_documents"] == tok.metrics["heldout_documents"] and report["cl100k_bytes_per_token"] > 1


def test_one_document_trains_and_says_no_evaluation(small, shared_data):
    lake = small["lake"]
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()[:20_000]
    one = dedup_version(lake, [{"id": "only", "text": text}], "one document")
    tok = train_tokenizer(lake, TokenizerParams(input=one.ref, vocab_size=512), log=lambda m: None)
    assert tok.metrics["heldout_documents"] == 0 and tok.metrics["sample_documents"] == 1
    assert "no" in tok.metrics["evaluation"] and tok.metrics["bytes_per_token"] is None
    sp = load(tokenizer_path(lake, tok.ref))
    assert sp.decode(sp.encode(text)) == text


def test_small_corpus_shard_has_a_validation_document(small):
    """A val_fraction below every document's hash sent none of them to validation."""
    from tasks.shard import _unit

    lake, dd = small["lake"], small["dedup"]
    tok = train_tokenizer(lake, TokenizerParams(input=dd.ref, vocab_size=1024), log=lambda m: None)
    fraction = min(_unit(f"val:{d['id']}") for d in iter_documents(lake, dd)) / 2
    sh = shard_documents(lake, ShardParams(input=dd.ref, tokenizer=tok.ref, val_fraction=fraction),
                         log=lambda m: None)
    assert (sh.metrics["train_documents"], sh.metrics["val_documents"]) == (33, 1) and sh.metrics["val_tokens"] > 1
    meta = json.loads(lake.open(sh, "meta.json").read())
    ids = [i for f in meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"]
           for i in pq.read_table(lake.open(sh, f)).column("id").to_pylist()]
    assert sorted(ids) == sorted(d["id"] for d in iter_documents(lake, dd))  # each document once
    # without a val fraction, no validation split
    none = shard_documents(lake, ShardParams(input=dd.ref, tokenizer=tok.ref, val_fraction=0), log=lambda m: None)
    assert (none.metrics["train_documents"], none.metrics["val_documents"]) == (34, 0)


def test_ranks_share_one_row_group_by_token_ranges(small):
    """The small corpus's shard is one row group: 2 to 8 ranks each read their own contiguous
    token range of it, together all of it, and resume exactly; too few tokens is a clear error."""
    import numpy as np

    lake, dd = small["lake"], small["dedup"]
    tok = train_tokenizer(lake, TokenizerParams(input=dd.ref, vocab_size=1024), log=lambda m: None)
    sh = shard_documents(lake, ShardParams(input=dd.ref, tokenizer=tok.ref), log=lambda m: None)
    files = shard_files(lake.path("shard", sh.version), "train")
    assert len(files) == 1 and pq.ParquetFile(files[0]).metadata.num_row_groups == 1
    stream = np.concatenate(pq.read_table(files[0]).column("tokens").to_pylist())
    total = len(stream)
    assert total == sh.metrics["train_tokens"] > 30_000
    T = 64
    for world in (2, 3, 8):
        loaders = [ShardLoader(files, 2, T, rank=r, world_size=world) for r in range(world)]
        ranges = [(u.start, u.stop) for ld in loaders for u in ld.units]
        assert ranges == [(r * total // world, (r + 1) * total // world) for r in range(world)]
        for r, ld in enumerate(loaders):  # each rank starts reading where its range does
            x, y = ld.next_batch()
            start = r * total // world
            assert x.flatten().tolist() == stream[start:start + 2 * T].tolist()
            assert y.flatten().tolist() == stream[start + 1:start + 2 * T + 1].tolist()
    # exact resume within a token range, across its end (an epoch)
    a = ShardLoader(files, 16, 128, rank=1, world_size=2)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    after = [a.next_batch() for _ in range(15)]
    assert a.state_dict()["epoch"] >= 1
    b = ShardLoader(files, 16, 128, rank=1, world_size=2)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert all(x1.equal(x2) and y1.equal(y2) for (x1, y1), (x2, y2) in zip(after, (b.next_batch() for _ in range(15))))
    # fewer tokens than ranks x (seq_len + 1): refused, naming the numbers
    T = total // 2
    with pytest.raises(ValueError, match=f"{total:,} tokens in 1 shard file.* too few for 2 rank.*seq_len {T}"):
        ShardLoader(files, 1, T, rank=0, world_size=2)
    ShardLoader(files, 1, T, rank=0, world_size=1)  # one rank: enough
