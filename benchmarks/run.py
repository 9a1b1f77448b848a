"""`make bench`: every benchmark, one after the other, rows appended to RESULTS.md.
`python -m benchmarks.run NAME…` runs those whose module name contains NAME."""

import importlib
import sys

BENCHMARKS = [
    "benchmarks.bench_lake",        # lake commit vs plain fsspec write
    "benchmarks.bench_download",    # download vs curl, verification cost
    "benchmarks.bench_extraction",  # extraction F1 on 181 gold pages, per extractor
    "benchmarks.bench_quality",     # language id lid.176 vs py3langid; the quality classifier vs FineWeb heuristics
    "benchmarks.bench_filter",      # filter CPU-s / 1,000 records and peak RSS vs datatrove's stock FineWeb
    "benchmarks.bench_tokens",      # sentencepiece vs HF tokenizers, encode vs tiktoken, loader vs nanoGPT
    "benchmarks.bench_shard",       # the shard stage on every core vs on one
    "benchmarks.bench_train",       # trainer tokens/s vs a minimal nanoGPT loop
    "benchmarks.bench_prefect",     # the demo pipeline through Prefect vs direct calls
    "benchmarks.bench_scale",       # filter on Ray vs the local executor; plan vs a measured run
]

if __name__ == "__main__":
    only = sys.argv[1:]
    for name in BENCHMARKS:
        if not only or any(o in name for o in only):
            print(f"== {name}", flush=True)
            importlib.import_module(name).run()
