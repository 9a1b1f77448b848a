"""Prefect's overhead: the demo pipeline through the Prefect flows against calling the same
stage functions directly, each in a fresh lake, alternating (goal: <= 1.05x).

What is counted: from the pipeline's call to its return; every flow run (the pipeline and its six
stage subflows), its API calls, logs and artifacts. Not counted: the start-up of Prefect's
temporary server (made by a throw-away flow before the timing, and reported apart), as a user's
`make server` or Prefect Cloud is already up."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from benchmarks.common import alternating_medians, record
from tasks.mirror import build_mirror
from tasks.presets import preset

STEPS = 50  # pretrain steps: the stages' own work stays the same on both sides


def params(base_url: str) -> dict:
    p = preset("demo", base_url)
    p["pretrain"] = p["pretrain"].model_copy(update={"max_steps": STEPS, "sample_every": 0, "eval_every": 25,
                                                     "checkpoint_every": 25})
    return p


def direct(lake_url: str, p: dict) -> None:
    from tasks.dedup import dedup_documents
    from tasks.download import download
    from tasks.filter import filter_documents
    from tasks.lake import Lake
    from tasks.pretrain import pretrain
    from tasks.shard import shard_documents
    from tasks.tokenizer import train_tokenizer

    lake, quiet = Lake(lake_url), (lambda m: None)
    d = download(lake, p["download"])
    f = filter_documents(lake, p["filter"].model_copy(update={"input": d.ref}), log=quiet)
    dd = dedup_documents(lake, p["dedup"].model_copy(update={"input": f.ref}), log=quiet)
    t = train_tokenizer(lake, p["tokenizer"].model_copy(update={"input": dd.ref}), log=quiet)
    s = shard_documents(lake, p["shard"].model_copy(update={"input": dd.ref, "tokenizer": t.ref}), log=quiet)
    pretrain(lake, p["pretrain"].model_copy(update={"input": s.ref}), log=quiet)


def through_prefect(lake_url: str, p: dict) -> None:
    from flows.pipeline import PipelineParams, pipeline

    pipeline(PipelineParams(**p), lake_url=lake_url)


def run(repeats: int = 3) -> None:
    from prefect import flow

    from flows.cli import prefect_api

    work = tempfile.mkdtemp(prefix="c2m-bench-prefect-")
    try:
        build_mirror(os.path.join(work, "mirror"))
        p = params(f"file://{work}/mirror/")
        t = time.perf_counter()
        prefect_api()  # the temporary server as `crawl2model` starts it (its analytics off: offline)
        flow(name="bench-warm-up")(lambda: None)()
        server_s = time.perf_counter() - t
        lakes = iter(range(1_000_000))
        medians = alternating_medians({
            "direct": lambda: direct(os.path.join(work, f"lake-{next(lakes)}"), p),
            "prefect": lambda: through_prefect(os.path.join(work, f"lake-{next(lakes)}"), p)}, repeats)
        ours, peer = medians["prefect"], medians["direct"]
        record(f"demo pipeline ({STEPS} training steps): seconds through Prefect vs direct calls "
               f"(temporary server's start-up apart: {server_s:.1f} s)",
               f"Prefect flows {ours:.1f} s", f"direct stage calls {peer:.1f} s", ours / peer, "make bench")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
