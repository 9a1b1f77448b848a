"""WARC files: verify one completely, or keep only its first N records while streaming.

warcio parses records but forgives a truncated gzip member or a record shorter than its
Content-Length (it stops quietly). A download must not, so `verify_warc` also checks every
gzip member to its CRC trailer and every record block against its declared length.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

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


class _Hashing:
    """A read-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data


HEADER_LIMIT = 64 << 10  # a WARC (or ARC) header block must end within this many bytes


def _check_head(head: bytes, member: int, name: str) -> None:
    """The start of a gzip member must be a WARC/ARC header that ends in reasonable space:
    warcio reads header lines without a bound, so a member of 1 GB of zeros (a gzip bomb)
    would otherwise be read into memory whole."""
    if not head:
        return
    if not (head.startswith(b"WARC/") or head[:1].isalnum()):
        raise WarcError(f"{name}: gzip member {member} does not start with a WARC header")
    if head.startswith(b"WARC/") and b"\r\n\r\n" not in head and b"\n\n" not in head:
        raise WarcError(f"{name}: gzip member {member} has no end of WARC header in its first "
                        f"{HEADER_LIMIT // 1024} KiB")


def _check_gzip(f: BinaryIO, name: str) -> int:
    """Walk every gzip member to its end (zlib checks each CRC and length trailer), checking
    that each starts with a sane WARC header. Bounded memory whatever the member sizes:
    output is discarded in 1 MiB steps."""
    members, d, in_member, head, checked = 0, zlib.decompressobj(31), False, b"", False
    while chunk := f.read(1 << 20):
        while chunk:
            try:
                out = d.decompress(chunk, 1 << 20)
            except zlib.error as e:
                raise WarcError(f"{name}: corrupt gzip data in member {members + 1}: {e}") from None
            if not checked:
                head += out[:HEADER_LIMIT - len(head)]
                if len(head) >= HEADER_LIMIT:
                    _check_head(head, members + 1, name)
                    checked = True
            in_member = True
            chunk = d.unconsumed_tail
            if d.eof:
                members += 1
                if not checked:
                    _check_head(head, members, name)
                chunk, d, in_member, head, checked = d.unused_data, zlib.decompressobj(31), False, b"", False
                if chunk and not chunk.startswith(GZIP_MAGIC[: len(chunk)]):
                    raise WarcError(f"{name}: garbage after gzip member {members}")
    if in_member:
        raise WarcError(f"{name}: truncated: gzip member {members + 1} ends before its trailer")
    return members


def verify_warc(open_file, name: str) -> WarcStats:
    """Check a whole WARC (plain or per-record gzip); return its sha256, size and record
    counts by type. `open_file()` returns a fresh binary file object (it is read twice)."""
    stats = WarcStats()
    with open_file() as raw:
        hashing = _Hashing(raw)
        head = hashing.read(2)
        gzipped = head == GZIP_MAGIC
        if gzipped:
            rest = _Prefixed(head, hashing)
            stats.gzip_members = _check_gzip(rest, name)
        else:
            while hashing.read(1 << 20):
                pass
        stats.sha256, stats.bytes = hashing.h.hexdigest(), hashing.n
    if stats.bytes == 0:
        raise WarcError(f"{name}: empty file")
    with open_file() as raw:
        try:
            it = ArchiveIterator(raw, no_record_parse=True, check_digests=False)
            for rec in it:
                raw_length = rec.rec_headers.get_header("Content-Length") if rec.format != "arc" else "0"
                if raw_length is None or not raw_length.strip().isdigit():
                    raise WarcError(f"{name}: record {stats.records + 1} has an invalid Content-Length "
                                    f"{raw_length!r}")
                declared = rec.length
                got = 0
                while chunk := rec.raw_stream.read(1 << 20):
                    got += len(chunk)
                if declared is not None and got != declared:
                    raise WarcError(f"{name}: truncated: record {stats.records + 1} "
                                    f"({rec.rec_type}) has {got} of its {declared} bytes")
                stats.records += 1
                stats.by_type[rec.rec_type] = stats.by_type.get(rec.rec_type, 0) + 1
        except ArchiveLoadFailed as e:
            first = " ".join(str(e).split())[:160]
            raise WarcError(f"{name}: not a valid WARC (after {stats.records} records): {first}") from None
        except (zlib.error, EOFError, ValueError) as e:
            raise WarcError(f"{name}: unreadable after {stats.records} records: {e}") from None
    if stats.records == 0:
        raise WarcError(f"{name}: not a WARC file: no WARC records found")
    return stats


class _Prefixed:
    def __init__(self, prefix: bytes, f):
        self.prefix, self.f = prefix, f

    def read(self, size: int = -1) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return self.f.read(size)


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
