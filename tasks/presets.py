"""Pipeline presets: every stage's parameters for a whole run, by name."""

from __future__ import annotations

from tasks.dedup import DedupParams
from tasks.download import DownloadParams
from tasks.filter import FilterParams
from tasks.mirror import DEMO_CRAWL
from tasks.pretrain import PretrainParams
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
                                           nproc_per_node=2)}
    if name == "small":  # one real crawl file sample: an hour-scale run on one GPU
        return {"download": DownloadParams(crawl="latest", segments=2, max_records=20_000),
                "filter": FilterParams(tasks=8, workers=8), "dedup": DedupParams(tasks=8, workers=8),
                "tokenizer": TokenizerParams(vocab_size=16384), "shard": ShardParams(),
                "pretrain": PretrainParams(preset="mini", max_steps=2000, batch_size=32, seq_len=256)}
    if name == "gpt2":  # GPT-2 small on a real crawl slice: a multi-GPU job
        return {"download": DownloadParams(crawl="latest", segments=100),
                "filter": FilterParams(tasks=64, workers=32), "dedup": DedupParams(tasks=64, workers=32),
                "tokenizer": TokenizerParams(vocab_size=32768), "shard": ShardParams(),
                "pretrain": PretrainParams(preset="gpt2-small", max_steps=20_000, batch_size=16, seq_len=1024,
                                           tokens_per_step=524_288, nproc_per_node=8, eval_every=250,
                                           sample_every=1000, checkpoint_every=1000)}
    raise ValueError(f"unknown preset {name!r}: demo, small or gpt2")
