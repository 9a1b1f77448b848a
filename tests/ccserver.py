"""A loopback HTTP server in Common Crawl's layout, with fault injection, for the download tests.

`make_cc_layout(dst, files, crawl)` lays real WARC files out as Common Crawl does
(collinfo.json, crawl-data/<crawl>/warc.paths.gz, the files under segments/). `CCServer`
serves a folder with Range support; `faults` maps a file name to the faults its successive
requests get: "503" (with Retry-After), "429", "500", "drop" (half the body, then the
connection closes), "slow" (the body trickles), "longlen" (a Content-Length 1000 bytes more than
is sent, then the connection closes), "shortlen" (1000 bytes fewer sent, and claimed: a silent
truncation), "ok".

Also runnable: python tests/ccserver.py DIR PORT  (used under `unshare -n`).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_cc_layout(dst: Path, files: list[Path], crawl: str = "CC-MAIN-TEST") -> list[str]:
    rels = []
    for i, f in enumerate(files):
        rel = f"crawl-data/{crawl}/segments/17000000{i:05d}.{i:02d}/warc/{f.name}"
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)
        rels.append(rel)
    with gzip.open(dst / "crawl-data" / crawl / "warc.paths.gz", "wt") as g:
        g.write("\n".join(rels) + "\n")
    (dst / "collinfo.json").write_text(json.dumps([{"id": crawl, "name": "test crawl"},
                                                   {"id": "CC-MAIN-OLDER", "name": "older"}]))
    return rels


class CCServer:
    def __init__(self, root: Path, faults: dict[str, list[str]] | None = None,
                 retry_after: str = "1", slow_delay: float = 0.02):
        self.root, self.faults = Path(root), {k: list(v) for k, v in (faults or {}).items()}
        self.retry_after, self.slow_delay = retry_after, slow_delay
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range, status)
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> "CCServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, path: str) -> str:
        name = path.rsplit("/", 1)[-1]
        with self._lock:
            queue = self.faults.get(name)
            return queue.pop(0) if queue else "ok"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        rng = h.headers.get("Range")
        target = (self.root / path.lstrip("/")).resolve()
        fault = self._next_fault(path)

        def status(code: int, headers: dict | None = None, body: bytes = b"") -> None:
            with self._lock:
                self.requests.append((path, rng, code))
            h.send_response(code)
            for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)

        if fault in ("503", "429", "500"):
            return status(int(fault), {"Retry-After": self.retry_after} if fault != "500" else {})
        if not str(target).startswith(str(self.root.resolve())) or not target.is_file():
            return status(404, body=b"not found")
        data = target.read_bytes()
        start, code, headers = 0, 200, {}
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                return status(416, {"Content-Range": f"bytes */{len(data)}"})
            code = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        with self._lock:
            self.requests.append((path, rng, code))
        claimed = len(body)
        if fault == "longlen":  # claims more than it sends, then closes
            claimed = len(body) + 1000
        elif fault == "shortlen":  # claims (and sends) less than the file: a silent truncation
            body = body[: max(1, len(body) - 1000)]
            claimed = len(body)
        h.send_response(code)
        for k, v in {**headers, "Content-Length": str(claimed), "Accept-Ranges": "bytes",
                     "Content-Type": "application/octet-stream"}.items():
            h.send_header(k, v)
        h.end_headers()
        try:
            if fault == "drop":
                half = body[: len(body) // 2]
                h.wfile.write(half)
                h.wfile.flush()
                self.bytes_sent[path] += len(half)
                h.close_connection = True
                h.connection.shutdown(2)
                return
            step = 4096 if fault == "slow" else 1 << 16
            for i in range(0, len(body), step):
                h.wfile.write(body[i:i + step])
                with self._lock:
                    self.bytes_sent[path] += len(body[i:i + step])
                if fault == "slow":
                    time.sleep(self.slow_delay)
            if fault == "longlen":
                h.close_connection = True
                h.connection.shutdown(2)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (e.g. --max-records): fine


if __name__ == "__main__":
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    srv = CCServer(root)
    srv.httpd.server_close()
    srv.httpd = ThreadingHTTPServer(("127.0.0.1", port), srv.httpd.RequestHandlerClass)
    print(f"serving {root} on 127.0.0.1:{port}", flush=True)
    srv.httpd.serve_forever()
