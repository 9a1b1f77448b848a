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

GZIP_MAGIC = b"\x1f\x8b"


class WarcError(Exception):
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


def _check_gzip(f: BinaryIO, name: str) -> int:
    """Walk every gzip member to its end (zlib checks each CRC and length trailer).
    Bounded memory whatever the member sizes: output is discarded in 1 MiB steps."""
    members, d, in_member = 0, zlib.decompressobj(31), False
    while chunk := f.read(1 << 20):
        while chunk:
            try:
                d.decompress(chunk, 1 << 20)
            except zlib.error as e:
                raise WarcError(f"{name}: corrupt gzip data in member {members + 1}: {e}") from None
            in_member = True
            chunk = d.unconsumed_tail
            if d.eof:
                members += 1
                chunk, d, in_member = d.unused_data, zlib.decompressobj(31), False
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
