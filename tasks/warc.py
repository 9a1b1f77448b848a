"""WARC files: verify one completely, or keep only its first N records while streaming.

warcio parses records but forgives a truncated gzip member or a record shorter than its
Content-Length (it stops quietly). A download must not, so `verify_warc` also checks every
gzip member to its CRC trailer and every record block against its declared length.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from common.process import own_cpu_seconds, report_worker_cpu
from tasks.errors import StageError

GZIP_MAGIC = b"\x1f\x8b"


class WarcError(StageError):
    """A file that is not a complete, parseable WARC. The message names the file."""


@dataclass
class WarcStats:
    sha256: str = ""
    bytes: int = 0
    gzip_members: int = 0
    records: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


# A Content-Length or WARC-Type line of an ASCII header: the key and the value as str.strip()
# and str.lower() would see them (ASCII whitespace is " \t\n\r\x0b\x0c\x1c-\x1f" to str.strip())
_WS = rb"[ \t\r\x0b\x0c\x1c-\x1f]*"
_FIELD = re.compile(rb"^" + _WS + rb"(content-length|warc-type)" + _WS + rb":([^\n]*)", re.I | re.M)
HEADER_LIMIT = 64 << 10  # a WARC (or ARC) header block must end within this many bytes


def _check_member_start(head: bytes, member: int, name: str) -> None:
    """A gzip member must start with a WARC or ARC header, checked on its first bytes before its
    records are read (how far a header may run is bounded by the record reader, HEADER_LIMIT)."""
    if head and not (head.startswith(b"WARC/"[: len(head)]) or head[:1].isalnum()):
        raise WarcError(f"{name}: gzip member {member} does not start with a WARC header")


def _header_end(buf: bytes, start: int, search_from: int | None = None) -> int:
    """Where the record header starting at buf[start] ends (the index after it), or -1 if not
    within buf. WARC: after the first blank line; ARC: after its one line."""
    frm = start if search_from is None else search_from
    if buf[start:start + 5] == b"WARC/"[: len(buf[start:start + 5])]:
        ends = [i + 4 for i in (buf.find(b"\r\n\r\n", frm),) if i >= 0] + \
               [i + 2 for i in (buf.find(b"\n\n", frm),) if i >= 0]
        return min(ends) if ends else -1
    i = buf.find(b"\n", frm)
    return -1 if i < 0 else i + 1


class WarcChecker:
    """Checks a WARC (plain or gzip, per-record gzip as Common Crawl writes it; WARC 0.17 to 1.1,
    and ARC) as its bytes arrive, in one pass: `feed(chunk)` each chunk in order, then `finish()`.

    - the sha256 and size of the file;
    - every gzip member inflated once, to its CRC and length trailer (zlib checks them), each
      starting with a sane WARC header, nothing but gzip members after the first;
    - every record: a header that ends within 64 KiB, a valid Content-Length, and a block of
      that many bytes (warcio forgives a truncated gzip member or a short record; a download
      must not).

    Memory stays bounded whatever the file: output is inflated in 1 MiB steps and a record's
    block is counted, not kept. A download feeds it the bytes it writes, so the check costs no
    second read of the file and overlaps the transfer."""

    def __init__(self, name: str):
        self.name, self.stats = name, WarcStats()
        self._sha = hashlib.sha256()
        self._gzipped: bool | None = None
        self._first = b""  # the first bytes, until we know whether the file is gzip
        self._inflate = None  # zlib.decompressobj of the current member
        self._member_head, self._head_checked = b"", False  # a member's first 5 bytes
        self._header = bytearray()  # the record header being read
        self._block_left = 0  # bytes of the current record's block still to come
        self._record = ""  # its type, for messages
        self._declared = 0
        self._records_in_member = 0  # records begun in the current gzip member

    # -- the file's bytes

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self._sha.update(data)
        self.stats.bytes += len(data)
        if self._gzipped is None:
            self._first += data
            if len(self._first) < 2:
                return
            self._gzipped, data, self._first = self._first[:2] == GZIP_MAGIC, self._first, b""
        if self._gzipped:
            self._feed_gzip(data)
        else:
            self._feed_records(data)

    def _feed_gzip(self, chunk: bytes) -> None:
        while chunk:
            if self._inflate is None:
                if not chunk.startswith(GZIP_MAGIC[: len(chunk)]):
                    raise WarcError(f"{self.name}: garbage after gzip member {self.stats.gzip_members}")
                self._inflate = zlib.decompressobj(31)
            d = self._inflate
            while chunk:
                try:
                    out = d.decompress(chunk, 1 << 20)
                except zlib.error as e:
                    raise WarcError(f"{self.name}: corrupt gzip data in member {self.stats.gzip_members + 1}: "
                                    f"{e}") from None
                if not self._head_checked:
                    self._member_head += out[:5 - len(self._member_head)]
                    if len(self._member_head) == 5:  # the start, before its records are read
                        _check_member_start(self._member_head, self.stats.gzip_members + 1, self.name)
                        self._head_checked = True
                self._feed_records(out)
                chunk = d.unconsumed_tail
                if d.eof:
                    break
            if d.eof:
                self.stats.gzip_members += 1
                self._records_in_member = 0
                if not self._head_checked:  # a member of fewer than 5 bytes
                    _check_member_start(self._member_head, self.stats.gzip_members, self.name)
                chunk, self._inflate, self._member_head, self._head_checked = d.unused_data, None, b"", False

    # -- the records, in the inflated bytes

    def _feed_records(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._block_left:  # inside a record's block: count it
                take = min(self._block_left, n - pos)
                self._block_left -= take
                pos += take
                continue
            if self._header:  # a header that began in an earlier chunk
                joined = bytes(self._header) + data[:HEADER_LIMIT]
                end = _header_end(joined, 0, max(0, len(self._header) - 3))
                if end < 0:
                    self._header += data
                    self._check_header_size()
                    return
                pos, header, self._header = end - len(self._header), joined[:end], bytearray()
                self._start_record(header)
                continue
            while pos < n and data[pos] in b"\r\n":  # the blank lines that end the previous record
                pos += 1
            if pos == n:
                return
            end = _header_end(data, pos)
            if end < 0:
                self._header = bytearray(data[pos:])
                self._check_header_size()
                return
            self._start_record(data[pos:end])
            pos = end

    def _check_header_size(self) -> None:
        if len(self._header) > HEADER_LIMIT:
            raise WarcError(f"{self.name}: not a valid WARC (after {self.stats.records} records): "
                            f"no end of record header in {HEADER_LIMIT // 1024} KiB")

    def _start_record(self, header: bytes) -> None:
        number = self.stats.records + 1
        if self._gzipped:
            self._records_in_member += 1
            if self._records_in_member > 1:  # as warcio, and so every reader downstream, refuses
                raise WarcError(f"{self.name}: not a valid WARC (after {self.stats.records} records): gzip member "
                                f"{self.stats.gzip_members + 1} holds more than one record (a WARC is gzipped "
                                "record by record)")
        if header.startswith(b"WARC/") and header.isascii():  # the common case, without a dict per record
            raw_length, kind = None, "unknown"
            for m in _FIELD.finditer(header):  # the last of each wins, as in the dict below
                if m[1].lower() == b"content-length":
                    raw_length = m[2].decode().strip()
                else:
                    kind = m[2].decode().strip()
            self._begin_block(number, raw_length, kind)
            return
        lines = header.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
        if lines[0].startswith("WARC/"):
            fields = {}
            for line in lines[1:]:
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip().lower()] = value.strip()
            raw_length = fields.get("content-length")
            kind = fields.get("warc-type", "unknown")
        else:  # ARC: "URL IP date mime length" (v1) or more fields; the length is the last
            parts = lines[0].split()
            if len(parts) < 5 or not parts[0] or "/" not in parts[0] + parts[3]:
                raise WarcError(f"{self.name}: not a valid WARC (after {self.stats.records} records): "
                                f"{' '.join(lines[0].split())[:160]!r} is not a record header")
            raw_length, kind = parts[-1], ("warcinfo" if parts[0].startswith("filedesc:") else "response")
        self._begin_block(number, raw_length, kind)

    def _begin_block(self, number: int, raw_length: str | None, kind: str) -> None:
        if raw_length is None or not raw_length.isdigit():
            raise WarcError(f"{self.name}: record {number} has an invalid Content-Length {raw_length!r}")
        self._block_left = self._declared = int(raw_length)
        self._record = kind
        self.stats.records = number
        self.stats.by_type[kind] = self.stats.by_type.get(kind, 0) + 1

    # -- the end

    def close(self) -> None:
        """Nothing to give back (a `RemoteChecker` gives back its worker)."""

    def finish(self) -> WarcStats:
        if self._gzipped is None and self._first:  # a 1-byte file
            self._gzipped = False
            self._feed_records(self._first)
        if self.stats.bytes == 0:
            raise WarcError(f"{self.name}: empty file")
        if self._inflate is not None:
            raise WarcError(f"{self.name}: truncated: gzip member {self.stats.gzip_members + 1} ends before its trailer")
        if self._block_left:
            got = self._declared - self._block_left
            raise WarcError(f"{self.name}: truncated: record {self.stats.records} ({self._record}) has {got} "
                            f"of its {self._declared} bytes")
        if self._header.strip():
            raise WarcError(f"{self.name}: not a valid WARC (after {self.stats.records} records): "
                            "the file ends inside a record header")
        if self.stats.records == 0:
            raise WarcError(f"{self.name}: not a WARC file: no WARC records found")
        self.stats.sha256 = self._sha.hexdigest()
        return self.stats


def verify_warc(open_file, name: str) -> WarcStats:
    """Check a whole WARC file in one read (see `WarcChecker`); return its sha256, size and
    record counts by type. `open_file()` returns a binary file object."""
    checker = WarcChecker(name)
    with open_file() as f:
        while chunk := f.read(1 << 20):
            checker.feed(chunk)
    return checker.finish()


class _Tee:
    """Reads from `src`, copying every byte read into `dst`."""

    def __init__(self, src: BinaryIO, dst: BinaryIO):
        self.src, self.dst = src, dst

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        self.dst.write(data)
        return data


def copy_first_records(src: BinaryIO, dst: BinaryIO, max_records: int, name: str) -> int:
    """Copy the first `max_records` records of a WARC stream to `dst`, byte for byte, and stop
    reading the source there: a quick run does not fetch a 1 GB file. The cut falls on a record
    boundary, which for Common Crawl's per-record gzip is a whole gzip member. `dst` must be
    seekable (it is truncated to the cut). Returns the bytes kept."""
    it = ArchiveIterator(_Tee(src, dst), no_record_parse=True, check_digests=False)
    end, n = 0, 0
    try:
        for rec in it:
            it.read_to_end(rec)
            end = it.get_record_offset() + it.get_record_length()
            n += 1
            if n >= max_records:
                break
    except ArchiveLoadFailed as e:
        first = " ".join(str(e).split())[:160]
        raise WarcError(f"{name}: not a valid WARC (after {n} records): {first}") from None
    if n == 0:
        raise WarcError(f"{name}: not a WARC file: no WARC records found")
    dst.flush()
    dst.truncate(end)
    return end


# --------------------------------------------------------------------------- checks in processes


class CheckerProcesses:
    """`WarcChecker`s run in worker processes, one file at a time each, fed through a pipe.

    A download moves bytes in threads, but a check is mostly Python per gzip member and record
    (a Common Crawl WARC gzips each record on its own: ~40,000 members per GB), so in threads
    the checks take turns for the GIL: 4 parallel downloads of 24 WARCs took as long as one at
    a time (1.2 s for 1.2 CPU-s on 2 cores). In processes they use every core, and the
    download's threads only receive, write and pass the bytes on.

    The workers come from the standard library's forkserver with only this module preloaded
    (not the command's `__main__`), so starting them costs an interpreter start, not the CLI's
    imports, and nothing is forked from a process whose other threads may hold locks."""

    def __init__(self, processes: int):
        import multiprocessing
        import queue

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self._free: queue.Queue = queue.Queue()
        self._workers = []
        for _ in range(max(1, processes)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_check_files, args=(child,), daemon=True, name="warc-check")
            proc.start()
            child.close()
            self._workers.append((proc, parent))
            self._free.put(parent)

    def checker(self, name: str) -> "RemoteChecker":
        """A checker for one file; blocks while every worker is checking another one."""
        return RemoteChecker(self, self._free.get(), name)

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send_bytes(b"Q")
            except OSError:
                pass
            conn.close()
        for proc, _ in self._workers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> "CheckerProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteChecker:
    """`WarcChecker`'s feed/finish, computed by a worker of `CheckerProcesses`; `close()` gives
    the worker back (abandoning the check, when a transfer attempt failed before `finish`). A
    damaged file is reported as soon as the worker finds it, as the in-process check would."""

    def __init__(self, pool: CheckerProcesses, conn, name: str):
        self._pool, self._conn, self.name = pool, conn, name
        conn.send_bytes(b"S" + name.encode("utf-8", "replace"))

    def feed(self, data: bytes) -> None:
        if data:
            self._conn.send_bytes(b"D" + data)
            if self._conn.poll():  # the worker only speaks first when the file is bad
                self._result(self._receive())

    def finish(self) -> WarcStats:
        self._conn.send_bytes(b"F")
        stats = self._result(self._receive())
        conn, self._conn = self._conn, None
        self._pool._free.put(conn)
        return stats

    def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            conn.send_bytes(b"A")
            while conn.recv()[0] != "aborted":  # an error reply nobody read
                pass
        except (OSError, EOFError):
            return  # a dead worker is not given back
        self._pool._free.put(conn)

    def _receive(self):
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the WARC check of {self.name} died") from None

    def _result(self, reply) -> WarcStats:
        outcome, value = reply
        if outcome == "error":
            raise WarcError(value)
        if outcome == "bug":
            raise RuntimeError(f"the WARC check of {self.name} failed:\n{value}")
        report_worker_cpu(value.pop("cpu_seconds"))
        return WarcStats(**value)


def _check_files(conn) -> None:
    """A worker of `CheckerProcesses`. Messages: S<name> starts a file, D<bytes> feeds it, F
    finishes it (reply: ("ok", stats) or the error), A abandons it (reply: ("aborted", None)),
    Q ends the worker. An error found while feeding is sent at once, and is the file's reply."""
    import traceback

    checker, replied, started = None, False, 0.0

    def reply(outcome) -> None:
        nonlocal replied
        conn.send(outcome)
        replied = True

    def guarded(step):
        """step()'s result; None once its error was sent, as the file's reply."""
        try:
            return step()
        except WarcError as e:
            reply(("error", str(e)))
        except Exception:
            reply(("bug", traceback.format_exc()))
        return None

    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            return
        kind, body = msg[:1], msg[1:]
        if kind == b"D":
            if checker is not None and not replied:
                guarded(lambda: checker.feed(body))
        elif kind == b"S":
            checker, replied = WarcChecker(body.decode("utf-8", "replace")), False
            started = own_cpu_seconds()
        elif kind == b"F":
            if not replied and (stats := guarded(checker.finish)) is not None:
                reply(("ok", {**asdict(stats), "cpu_seconds": own_cpu_seconds() - started}))
            checker = None
        elif kind == b"A":
            checker = None
            conn.send(("aborted", None))
        elif kind == b"Q":
            return
