"""A fault-injecting HTTP proxy on loopback in front of an S3 API server (moto_server).

Every request is forwarded to the upstream server, except that a seeded random share of them
gets one of these faults instead:

  500        the proxy answers 500 InternalError (the request never reaches S3)
  503        the proxy answers 503 SlowDown (S3's throttling reply)
  reset      the connection is closed before the request is forwarded
  lost-reply the request IS forwarded and takes effect, then the connection is closed
             without the reply (the client cannot tell it succeeded: retries must be safe)
  cut        the reply's headers and half its body are sent, then the connection is closed
  stall      the reply is held back for `stall_s` seconds, then sent

In "transient" mode a request that was just faulted passes on its next attempt (the same
method, path, query and Range), so every operation succeeds once the client retries: a run
must then give exactly what a clean run gives. In "outage" mode every request fails with the
chosen faults, for as long as the outage lasts.

Control (JSON over HTTP, on a path no bucket can have):
  GET  /__faults__   -> {"config": ..., "counts": {fault: n, "forwarded": n}} since the last POST
  POST /__faults__   <- {"rate": 0.1, "kinds": [...], "mode": "transient", "seed": 1, "stall_s": 1}

Run: python -m tests.s3faults UPSTREAM_URL PORT
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "reset", "lost-reply", "cut", "stall")
CONTROL = "/__faults__"
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, port: int = 0):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.config = {"rate": 0.0, "kinds": list(KINDS), "mode": "transient", "seed": 0, "stall_s": 1.0}
        self.counts: Counter = Counter()
        self._rng = random.Random(0)
        self._last_faulted: set[str] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def configure(self, **cfg) -> None:
        with self._lock:
            unknown = set(cfg) - set(self.config)
            if unknown or not set(cfg.get("kinds", KINDS)) <= set(KINDS):
                raise ValueError(f"unknown fault setting {sorted(unknown) or cfg.get('kinds')}")
            self.config.update(cfg)
            self.counts.clear()  # each setting counts its own faults
            self._rng = random.Random(self.config["seed"])
            self._last_faulted.clear()

    def _choose(self, key: str) -> str | None:
        with self._lock:
            cfg = self.config
            if cfg["mode"] == "transient" and key in self._last_faulted:
                self._last_faulted.discard(key)  # a retry of a faulted request passes
                return None
            if not cfg["kinds"] or self._rng.random() >= cfg["rate"]:
                return None
            kind = self._rng.choice(cfg["kinds"])
            self._last_faulted.add(key)
            self.counts[kind] += 1
            return kind

    # -- one request -------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        if h.path.startswith(CONTROL):
            if h.command == "POST":
                try:
                    self.configure(**json.loads(body or b"{}"))
                except (ValueError, TypeError) as e:
                    return self._reply(h, 400, {}, str(e).encode())
            with self._lock:
                state = {"config": self.config, "counts": dict(self.counts)}
            return self._reply(h, 200, {"Content-Type": "application/json"}, json.dumps(state).encode())

        key = f"{h.command} {h.path} {h.headers.get('Range', '')}"
        fault = self._choose(key)
        if fault == "500":
            return self._reply(h, 500, {"Content-Type": "application/xml"}, _error("InternalError",
                               "We encountered an internal error. Please try again."))
        if fault == "503":
            return self._reply(h, 503, {"Content-Type": "application/xml"}, _error("SlowDown",
                               "Please reduce your request rate."))
        if fault == "reset":
            return self._drop(h)
        status, headers, payload = self._forward(h, body)
        with self._lock:
            self.counts["forwarded"] += 1
        if fault == "lost-reply":
            return self._drop(h)
        if fault == "stall":
            time.sleep(float(self.config["stall_s"]))
        if fault == "cut" and h.command != "HEAD" and len(payload) > 1:
            h.send_response(status)
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(payload)))  # promised in full, half sent
            h.end_headers()
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            return self._drop(h)
        self._reply(h, status, headers, payload, head=h.command == "HEAD")

    @staticmethod
    def _read_body(h) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _forward(self, h, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body or None, headers=headers)
            r = conn.getresponse()
            payload = r.read()
            out = [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP and k.lower() != "content-length"]
            if h.command == "HEAD":
                out.append(("Content-Length", r.getheader("Content-Length", "0")))
            return r.status, out, payload
        finally:
            conn.close()

    @staticmethod
    def _reply(h, status: int, headers, payload: bytes, head: bool = False) -> None:
        h.send_response(status)
        items = headers.items() if isinstance(headers, dict) else headers
        for k, v in items:
            h.send_header(k, v)
        if not head:
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if not head and payload:
            h.wfile.write(payload)

    @staticmethod
    def _drop(h) -> None:
        h.close_connection = True
        try:
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> "FaultProxy":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>c2m-fault</RequestId></Error>").encode()


def control(endpoint: str, **cfg) -> dict:
    """Read (no cfg) or change the proxy's settings; returns its state."""
    u = urlsplit(endpoint)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        if cfg:
            conn.request("POST", CONTROL, body=json.dumps(cfg), headers={"Content-Type": "application/json"})
        else:
            conn.request("GET", CONTROL)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise ValueError(data.decode())
        return json.loads(data)
    finally:
        conn.close()


if __name__ == "__main__":
    proxy = FaultProxy(sys.argv[1], int(sys.argv[2]))
    proxy.serve_forever()
