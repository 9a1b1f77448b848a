"""A lake writer in its own process, for the kill and race tests.

usage: python tests/lake_writer.py LAKE_URL KIND TAG N_FILES DELAY_S
Writes N files of 64 KiB slowly (printing `wrote i` after each), then commits. Prints
`built VERSION` if it produced the version, `cached VERSION` if another producer did.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tasks.lake import Lake  # noqa: E402


def main() -> None:
    url, kind, tag, n, delay = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    lake = Lake(url)
    with lake.produce(kind, {"tag": tag, "n": n}, [], "test/1", lease_ttl=30) as p:
        if p.cached:
            print("cached", p.version, flush=True)
            return
        print("leased", p.version, "resumed" if p.resumed else "fresh", flush=True)
        for i in range(n):
            payload = (f"{tag}:{i}:".encode() * 8192)[: 64 * 1024]
            with p.open(f"part-{i:04d}.bin") as f:
                f.write(payload)
            print("wrote", i, flush=True)
            time.sleep(delay)
        p.metrics["producer_pid"] = os.getpid()
    print("built", p.version, flush=True)


if __name__ == "__main__":
    main()
