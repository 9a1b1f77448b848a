"""Pipeline presets: every stage's parameters for a whole run, by name."""

from __future__ import annotations

from tasks.conversations import ConversationsParams
from tasks.dedup import DedupParams
from tasks.download import DownloadParams
from tasks.filter import FilterParams
from tasks.mirror import DEMO_CRAWL
from tasks.pretrain import PretrainParams
from tasks.sft import SftParams
from tasks.shard import ShardParams
from tasks.tokenizer import TokenizerParams


def preset(name: str, demo_base_url: str | None = None) -> dict:
    if name == "demo":  # the demo mirror, a tiny tokenizer and model: minutes on 2 CPU cores
        return {"download": DownloadParams(crawl=DEMO_CRAWL, base_url=demo_base_url or "file://./demo-mirror/",
                                           segments=4),
                "filter": FilterParams(), "dedup": DedupParams(),
                "tokenizer": TokenizerParams(vocab_size=1024, holdout_fraction=0.1),
                "shard": ShardParams(val_fraction=0.1, shard_tokens=8192, row_group_tokens=2048),
                "pretrain": PretrainParams(preset="tiny", max_steps=300, batch_size=8, seq_len=128,
                                           eval_every=50, sample_every=100, checkpoint_every=100,
                                           nproc_per_node=2),
                "conversations": ConversationsParams(),
                "sft": SftParams(max_steps=30, batch_size=4, seq_len=256, eval_every=15, checkpoint_every=15,
                                 nproc_per_node=2)}
    if name == "small":  # one real crawl file sample: an hour-scale run on one GPU
        return {"download": DownloadParams(crawl="latest", segments=2, max_records=20_000),
                "filter": FilterParams(tasks=8, workers=8), "dedup": DedupParams(tasks=8, workers=8),
                "tokenizer": TokenizerParams(vocab_size=16384), "shard": ShardParams(),
                "pretrain": PretrainParams(preset="mini", max_steps=2000, batch_size=32, seq_len=256),
                "conversations": ConversationsParams(), "sft": SftParams(max_steps=300, batch_size=16)}
    if name == "gpt2":  # GPT-2 small on a real crawl slice: a multi-GPU job
        return {"download": DownloadParams(crawl="latest", segments=100),
                "filter": FilterParams(tasks=64, workers=32), "dedup": DedupParams(tasks=64, workers=32),
                "tokenizer": TokenizerParams(vocab_size=32768), "shard": ShardParams(),
                "pretrain": PretrainParams(preset="gpt2-small", max_steps=20_000, batch_size=16, seq_len=1024,
                                           tokens_per_step=524_288, nproc_per_node=8, eval_every=250,
                                           sample_every=1000, checkpoint_every=1000),
                "conversations": ConversationsParams(arithmetic=20_000, corpus_questions=50_000, identity=1000),
                "sft": SftParams(max_steps=2000, batch_size=16, nproc_per_node=8, checkpoint_every=500)}
    raise ValueError(f"unknown preset {name!r}: demo, small or gpt2")


def demo_params(mirror_url: str, text_ref: str) -> dict:
    """`crawl2model demo`: the demo preset with the demo's English text (an ingest version) as
    extra text for the tokenizer, the shards and the corpus questions, and the training long
    enough to use it: about four minutes on 2 CPU cores."""
    p = preset("demo", mirror_url)

    def changed(name: str, **update):
        return type(p[name]).model_validate({**p[name].model_dump(), **update})

    return {**p, "tokenizer": changed("tokenizer", extra=[text_ref], vocab_size=2048),
            "shard": changed("shard", extra=[text_ref], val_fraction=0.02, shard_tokens=1 << 20,
                             row_group_tokens=1 << 16),
            "pretrain": changed("pretrain", max_steps=400, seq_len=256, lr=3e-3, warmup_steps=20, eval_every=100,
                                eval_steps=8, sample_every=0, checkpoint_every=200),
            "conversations": changed("conversations", extra=[text_ref]),
            "sft": changed("sft", max_steps=220, batch_size=8, seq_len=256, lr=3e-3, eval_every=110,
                           checkpoint_every=110)}
