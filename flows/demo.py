"""`crawl2model demo`: the whole pipeline on the embedded defaults, offline (local lake,
Prefect's ephemeral server), on the demo mirror that stands in for Common Crawl, with the
tiny preset, then post-training: the model fine-tuned on generated conversations.

Its text comes from what every machine with the project installed has offline: the demo mirror
(Python's documentation as web pages, through download and the curation stages) and the prose of
the docstrings of the standard library and of permissively licensed pinned packages (an `ingest`
version that tokenizer, shard and conversations take as `extra`). It ends with the summary table,
what the base model writes and how English it is (the share of its words found in the training
text, validation bits per byte), and a two-turn chat with the fine-tuned model.
"""

from __future__ import annotations

import os
import re
import time

from prefect import flow
from rich.console import Console

from flows.pipeline import PipelineParams, pipeline, summary_rows, summary_table
from tasks.lake import Lake
from tasks.mirror import build_demo_text, build_mirror
from tasks.presets import demo_params

PROMPTS = ["The ", "A function", "Python is", "This method returns"]
CHAT = ["Who are you?", "What is 17 + 25?"]  # the two turns of the closing transcript


def demo(lake_url: str, mirror_dir: str = "demo-mirror") -> None:
    console = Console()
    if not os.path.exists(os.path.join(mirror_dir, "collinfo.json")):
        build_mirror(mirror_dir)
    text = os.path.join(mirror_dir, "text", "english.txt")
    if not os.path.exists(text):
        console.print(f"building the demo's English text ({text}): docstrings of the standard library and of "
                      "permissively licensed packages")
        build_demo_text(text)
    t0 = time.time()
    refs = demo_pipeline(lake_url, "file://" + os.path.abspath(mirror_dir) + "/", os.path.abspath(text))
    lake = Lake(lake_url)
    console.print(summary_table(f"crawl2model demo: lake {lake_url}, {time.time() - t0:.0f}s "
                                "(the demo mirror stands in for Common Crawl)", summary_rows(lake, refs)))
    from model.sample import generate_text

    base = lake.resolve(refs["pretrain"])
    final = lake.file_uri(base, "final")
    samples = []
    for i, prompt in enumerate(PROMPTS):
        sample = generate_text(final, prompt, max_new_tokens=48, temperature=0.8, top_k=40, seed=i)
        samples.append(sample)
        console.print(f"[bold]{prompt!r}[/] → {sample[len(prompt):]!r}")
    share = word_share(samples, training_words(lake, refs["shard"]))
    console.print(f"base model {base.ref}: {share:.0%} of the words it wrote occur in its training text; "
                  f"validation {base.metrics.get('val_bpb')} bits per byte")
    console.print(f"[bold]chat with {refs['sft']}[/] (crawl2model chat --model {refs['sft']}):")
    for user, reply in two_turns(lake.file_uri(lake.resolve(refs["sft"]), "final"), CHAT):
        console.print(f"  [bold]you:[/] {user}\n  [bold]assistant:[/] {reply}")


@flow(name="demo-pipeline", log_prints=True)
def demo_pipeline(lake_url: str, mirror_url: str, text_path: str) -> dict[str, str]:
    """The demo's English text into the lake (ingest), then the pipeline with it as extra text."""
    from flows.stages import FLOWS, outcome
    from tasks.ingest import IngestParams

    text = outcome(FLOWS["ingest"](IngestParams(files=[text_path]), lake_url=lake_url, return_state=True))
    return pipeline(PipelineParams(**demo_params(mirror_url, text)), lake_url=lake_url)


def training_words(lake: Lake, shard_ref: str) -> set[str]:
    """The lower-cased words of a shard version's training split (its tokens decoded)."""
    import json

    import pyarrow.parquet as pq

    from tasks.stage import local_file
    from tasks.tokenizer import load

    m = lake.resolve(shard_ref)
    sp = load(local_file(lake, m, "tokenizer.model"))
    meta = json.loads(lake.open(m, "meta.json").read())
    words: set[str] = set()
    for f in meta["splits"]["train"]["files"]:
        with lake.open(m, f) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["tokens"], batch_size=256):
                for tokens in batch.column("tokens").to_pylist():
                    words.update(w.lower() for w in WORD.findall(sp.decode(tokens[1:])))
    return words


WORD = re.compile(r"[A-Za-z]+")


def word_share(texts: list[str], vocabulary: set[str]) -> float:
    """The share of the words in `texts` that occur in `vocabulary` (lower-cased)."""
    words = [w.lower() for t in texts for w in WORD.findall(t)]
    return sum(w in vocabulary for w in words) / max(len(words), 1)


def two_turns(model_dir: str, questions: list[str], max_new_tokens: int = 60) -> list[tuple[str, str]]:
    """A conversation with a fine-tuned model: each question asked after the earlier turns, the
    replies greedy (the likeliest token each time: a tiny model's best, and the same every run)."""
    from model.chat import reply_text
    from model.sample import load

    model, _, sp = load(model_dir)
    messages, out = [], []
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        reply = reply_text(model, sp, messages, max_new_tokens, 0.0, None, None, i)
        messages.append({"role": "assistant", "content": reply})
        out.append((q, reply))
    return out
