"""`make bench`: every benchmark, one after the other, rows appended to RESULTS.md."""

import importlib
import sys

BENCHMARKS = ["benchmarks.bench_lake", "benchmarks.bench_download"]

if __name__ == "__main__":
    only = sys.argv[1:]
    for name in BENCHMARKS:
        if not only or any(o in name for o in only):
            print(f"== {name}", flush=True)
            importlib.import_module(name).run()
