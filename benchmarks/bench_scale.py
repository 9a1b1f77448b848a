"""Scale-out, measured on this machine (issue 15):

1. Ray against the local executor: the `filter` stage on the filter benchmark's real pages (a
   download version of 4 WARC files), tasks=4 on 2 CPUs both ways: the local executor's 2
   processes, and a one-node Ray cluster of 2 CPUs (`ray start --head`, loopback only) that the
   stage joins. Wall seconds of the stage call, median of alternating repeats (the join and the
   node probe included: the price of the engine); the cluster's own start-up is reported apart.
   Both must commit the same files.
2. `plan` against a measured run: the CPU seconds of download, filter, dedup and shard on the
   benchmark crawl (the same 4 WARC files laid out as a Common Crawl mirror), predicted from the
   demo preset's run (the demo mirror: Python's documentation as pages, a few dozen documents),
   and from runs of 1 and 2 of the crawl's own files (what a user runs before a whole crawl),
   against that crawl's own run.
"""

from __future__ import annotations

import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import record

REPEATS = int(os.environ.get("BENCH_SCALE_REPEATS", "3"))
RECORDS = int(os.environ.get("BENCH_SCALE_RECORDS", "2000"))
CRAWL = "CC-MAIN-BENCH"


def bench_mirror(folder: Path) -> Path:
    """The filter benchmark's input (real pages, per-record gzip WARCs) as a Common Crawl mirror."""
    os.environ["BENCH_FILTER_MIN_RECORDS"] = str(RECORDS)
    import importlib

    import benchmarks.bench_filter as bf

    importlib.reload(bf)  # MIN_RECORDS is read at import
    warc = folder / "warc"
    _, _, names = bf.build_input(warc)
    rels = []
    for i, name in enumerate(names):
        rel = f"crawl-data/{CRAWL}/segments/1700000000000.{i:02d}/warc/{name}"
        (folder / "mirror" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(warc / name, folder / "mirror" / rel)
        rels.append(rel)
    listing = folder / "mirror" / "crawl-data" / CRAWL / "warc.paths.gz"
    listing.write_bytes(gzip.compress(("\n".join(rels) + "\n").encode(), mtime=0))
    return folder / "mirror"


def start_local_ray(temp: Path) -> tuple[str, float]:
    """A one-node Ray cluster of 2 CPUs on loopback; (its address, seconds it took to start)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                    "--port=6390", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={temp}"], check=True, capture_output=True, env=env)
    return "127.0.0.1:6390", time.perf_counter() - t


def stop_local_ray(temp: Path) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    shutil.rmtree(temp, ignore_errors=True)


def demo_run(folder: Path):
    """The demo preset's data stages on the demo mirror: the measured runs `plan` scales from."""
    from tasks.lake import Lake
    from tasks.mirror import build_mirror
    from tasks.presets import preset
    from tasks.registry import stage

    build_mirror(str(folder / "demo-mirror"))
    lake = Lake(str(folder / "demo-lake"))
    for name, params in preset("demo", f"file://{folder / 'demo-mirror'}/").items():
        if name != "pretrain":
            stage(name).run(lake, params, log=lambda m: None)
    return lake


def sample_runs(lake, mirror: Path, segments: tuple[int, ...] = (1, 2)):
    """download -> filter -> dedup -> tokenizer -> shard of 1 and 2 of the benchmark crawl's files
    into `lake`: runs of two sizes, which `plan` fits a fixed part and a part per unit to."""
    from tasks.dedup import DedupParams
    from tasks.download import DownloadParams, download
    from tasks.filter import FilterParams, filter_documents
    from tasks.registry import stage
    from tasks.shard import ShardParams
    from tasks.tokenizer import TokenizerParams

    for n in segments:
        d = download(lake, DownloadParams(crawl=CRAWL, base_url=f"file://{mirror}/", segments=n), log=lambda m: None)
        f = filter_documents(lake, FilterParams(input=d.ref), log=lambda m: None)
        dd = stage("dedup").run(lake, DedupParams(input=f.ref), log=lambda m: None)
        t = stage("tokenizer").run(lake, TokenizerParams(input=dd.ref, vocab_size=4096), log=lambda m: None)
        stage("shard").run(lake, ShardParams(input=dd.ref, tokenizer=t.ref), log=lambda m: None)
    return lake


def run() -> None:
    from tasks.dedup import DedupParams
    from tasks.download import DownloadParams, download
    from tasks.filter import FilterParams, filter_documents
    from tasks.lake import Lake
    from tasks.plan import CURATION, PlanParams, plan
    from tasks.registry import stage
    from tasks.shard import ShardParams
    from tasks.tokenizer import TokenizerParams

    work = Path(tempfile.mkdtemp(prefix="c2m-bench-scale-"))
    temp = Path(f"/tmp/c2m-bench-ray-{os.getpid()}")
    os.environ.setdefault("CRAWL2MODEL_CACHE", str(work / "cache"))
    try:
        mirror = bench_mirror(work)
        lake = Lake(str(work / "lake"))
        dl = download(lake, DownloadParams(crawl=CRAWL, base_url=f"file://{mirror}/", segments=4), log=lambda m: None)
        print(f"input: {dl.metrics['records']} WARC records in {dl.metrics['files']} files", flush=True)

        # 1. Ray vs local
        address, startup = start_local_ray(temp)
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        local_cpu = []  # the local runs' own cpu_seconds: what part 2 compares the plan with
        files: dict[str, dict] = {}
        try:
            filter_documents(lake, FilterParams(tasks=4, executor="ray", ray_address=address), log=lambda m: None)
            for rep in range(REPEATS):
                for which in (["local", "ray"] if rep % 2 == 0 else ["ray", "local"]):
                    how = {"executor": "ray", "ray_address": address} if which == "ray" else {"workers": 2}
                    t = time.perf_counter()
                    m = filter_documents(lake, FilterParams(tasks=4, rebuild=True, **how), log=lambda m: None)
                    walls[which].append(time.perf_counter() - t)
                    files[which] = {f["path"]: f["sha256"] for f in m.files}
                    if which == "local":
                        local_cpu.append(m.metrics["cpu_seconds"])
                    print(f"  rep {rep} {which:<5}: {walls[which][-1]:.1f} s", flush=True)
        finally:
            stop_local_ray(temp)
        assert files["local"] == files["ray"], "the Ray run committed other files"
        med = {k: statistics.median(v) for k, v in walls.items()}
        record(f"filter stage on Ray vs the local executor ({dl.metrics['records']} WARC records, tasks=4, 2 CPUs, "
               f"median of {REPEATS}; the same files; cluster start-up apart: {startup:.1f} s)",
               f"Ray (one-node cluster, joined per run) {med['ray']:.1f} s",
               f"local executor (2 processes) {med['local']:.1f} s", med["ray"] / med["local"],
               "python -m benchmarks.run bench_scale")

        # 2. plan's prediction of the benchmark crawl's own run (4 files), from the demo preset's
        # run, and from sample runs of the crawl itself (1 and 2 files: a fixed part and a slope)
        cpu = {"download": dl.metrics["cpu_seconds"], "filter": statistics.median(local_cpu)}
        cpu["dedup"] = stage("dedup").run(lake, DedupParams(), log=lambda m: None).metrics["cpu_seconds"]
        stage("tokenizer").run(lake, TokenizerParams(vocab_size=4096), log=lambda m: None)
        cpu["shard"] = stage("shard").run(lake, ShardParams(), log=lambda m: None).metrics["cpu_seconds"]
        samples = sample_runs(Lake(str(work / "sample-lake")), mirror)
        for source, measured_lake in (("the demo preset's run", demo_run(work)),
                                      ("runs of 1 and 2 of its files", samples)):
            p = plan(measured_lake, PlanParams(crawl=CRAWL, base_url=f"file://{mirror}/", workers=2))
            ratios = {row["stage"]: row["cpu_hours"] * 3600 / cpu[row["stage"]] for row in p["stages"]}
            for row in p["stages"]:
                print(f"  from {source}: {row['stage']:<8} predicted {row['cpu_hours'] * 3600:.1f} CPU-s, "
                      f"measured {cpu[row['stage']]:.1f} CPU-s", flush=True)
            worst = max(ratios.values(), key=lambda r: abs(r - 1))
            record(f"plan from {source} vs the measured run of the benchmark crawl (4 files, "
                   f"{dl.metrics['records']} records): predicted / measured CPU-seconds per stage (the ratio: the "
                   "worst stage)", ", ".join(f"{k} {ratios[k]:.2f}" for k in CURATION),
                   "measured: " + ", ".join(f"{k} {cpu[k]:.1f} CPU-s" for k in CURATION), worst,
                   "python -m benchmarks.run bench_scale")
    finally:
        shutil.rmtree(work, ignore_errors=True)
