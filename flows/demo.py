"""`crawl2model demo`: the whole pipeline on the embedded defaults, offline (local lake,
Prefect's ephemeral server), on the demo mirror that stands in for Common Crawl, with the
tiny preset. Ends with a summary table and a few sampled continuations."""

from __future__ import annotations

import os
import time

from rich.console import Console

from flows.pipeline import PipelineParams, pipeline, summary_rows, summary_table
from tasks.lake import Lake
from tasks.mirror import build_mirror
from tasks.presets import preset

PROMPTS = ["The ", "A function", "Python is"]


def demo(lake_url: str, mirror_dir: str = "demo-mirror") -> None:
    console = Console()
    if not os.path.exists(os.path.join(mirror_dir, "collinfo.json")):
        build_mirror(mirror_dir)
    params = PipelineParams(**preset("demo", "file://" + os.path.abspath(mirror_dir) + "/"))
    t0 = time.time()
    refs = pipeline(params, lake_url=lake_url)
    lake = Lake(lake_url)
    console.print(summary_table(f"crawl2model demo: lake {lake_url}, {time.time() - t0:.0f}s "
                                "(the demo mirror stands in for Common Crawl)", summary_rows(lake, refs)))
    from model.sample import generate_text

    final = lake.file_uri(lake.resolve(refs["pretrain"]), "final")
    for prompt in PROMPTS:
        text = generate_text(final, prompt, max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
        console.print(f"[bold]{prompt!r}[/] → {text[len(prompt):]!r}")
