"""Batches of tokens from the Parquet shards of a `shard` artifact. Pure pyarrow + fsspec + torch.

The shard format (written by the `shard` stage):
    <root>/meta.json                      {"vocab_size", "bos_id", "dtype", "splits": {...}}
    <root>/<split>/shard-00000.parquet    one row per document, column `tokens`
                                          (list<uint16> or list<uint32>), first token = bos_id
Documents are already shuffled (with a seed) by the shard stage; the loader reads them in order.

`ShardLoader` streams (B, T+1) windows of the concatenated token stream for rank r of w.
Ranks read disjoint parts of the data: whole Parquet row groups dealt round-robin when that
gives every rank at least T+1 tokens, else (a small split: fewer row groups than ranks, or
very uneven ones) the split's token stream cut into w contiguous ranges, so any split of at
least w x (T+1) tokens trains on w ranks. `state_dict()` / `load_state_dict()` resume at the
exact next token. `Prefetcher` reads the next batches in a background thread.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Iterator, NamedTuple

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch


def read_meta(root: str) -> dict:
    with fsspec.open(f"{root.rstrip('/')}/meta.json", "rt") as f:
        return json.load(f)


def shard_files(root: str, split: str) -> list[str]:
    meta = read_meta(root)
    return [f"{root.rstrip('/')}/{p}" for p in meta["splits"][split]["files"]]


class Unit(NamedTuple):
    """A unit of work: a row group of a shard file, or the token range [start, stop) of its
    concatenated documents (stop None: to its end)."""
    file: str
    group: int
    start: int = 0
    stop: int | None = None


def row_groups(files: list[str]) -> list[tuple[str, int, int]]:
    """(file, row group, tokens) of every row group, from the Parquet footers alone."""
    out = []
    for f in files:
        with fsspec.open(f, "rb") as fh:
            md = pq.ParquetFile(fh).metadata
        col = next((i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == "tokens"), None)
        if col is None:
            raise ValueError(f"{f} has no `tokens` column")
        # a list column's leaf values: its tokens (shard rows are never empty: BOS comes first)
        out += [(f, g, md.row_group(g).column(col).num_values) for g in range(md.num_row_groups)]
    return out


def deal(groups: list[tuple[str, int, int]], world_size: int, min_tokens: int) -> list[list[Unit]]:
    """Every rank's units: whole row groups round-robin when that gives each rank at least
    min_tokens, else `world_size` contiguous, equal token ranges of the whole stream."""
    whole = [groups[r::world_size] for r in range(world_size)]
    if all(sum(n for _, _, n in part) >= min_tokens for part in whole):
        return [[Unit(f, g) for f, g, _ in part] for part in whole]
    total = sum(n for _, _, n in groups)
    cuts = [r * total // world_size for r in range(world_size + 1)]
    out: list[list[Unit]] = [[] for _ in range(world_size)]
    pos = 0
    for f, g, n in groups:
        for r in range(world_size):
            lo, hi = max(cuts[r], pos), min(cuts[r + 1], pos + n)
            if lo < hi:
                out[r].append(Unit(f, g, lo - pos, hi - pos))
        pos += n
    return out


class ShardLoader:
    """An endless stream of (x, y) int64 batches of shape (B, T) for one rank.

    Units of work (see `deal`) are row groups or token ranges of them; every rank reads a
    disjoint part of the data. Each epoch walks this rank's units in the same order; the
    position (epoch, unit, row, token offset) is the whole state.
    """

    def __init__(self, files: list[str], batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1):
        if not files:
            raise ValueError("no shard files to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        groups = row_groups(files)
        total = sum(n for _, _, n in groups)
        if total < world_size * (seq_len + 1):
            raise ValueError(f"{total:,} tokens in {len(files)} shard file(s) are too few for {world_size} "
                             f"rank(s) at seq_len {seq_len}: each rank needs at least seq_len + 1 = "
                             f"{seq_len + 1} tokens, {world_size * (seq_len + 1):,} in all; use fewer ranks, "
                             "a shorter seq_len or more data")
        self.units = deal(groups, world_size, seq_len + 1)[rank]
        self.epoch, self.unit, self.row, self.offset = 0, 0, 0, 0
        self._rows: list[np.ndarray] | None = None  # the current unit's documents (or parts of them)

    # -- position ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "row": self.row, "offset": self.offset,
                "rank": self.rank, "world_size": self.world, "units": len(self.units)}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"], state["units"]) != (self.rank, self.world, len(self.units)):
            raise ValueError("loader state is from a different data layout or world size "
                             f"({state['world_size']} ranks, {state['units']} units) than now "
                             f"({self.world} ranks, {len(self.units)} units)")
        self.epoch, self.unit, self.row, self.offset = (state["epoch"], state["unit"], state["row"],
                                                        state["offset"])
        self._rows = None

    def rewind(self) -> None:
        """Back to the start of this rank's data (an evaluation reads the same batches each time)."""
        self.epoch, self.unit, self.row, self.offset, self._rows = 0, 0, 0, 0, None

    # -- reading ----------------------------------------------------------------
    def _load_unit(self) -> None:
        path, group, start, stop = self.units[self.unit]
        with fsspec.open(path, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(group, columns=["tokens"])
        col = table.column("tokens").combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False)
        offsets = col.offsets.to_numpy()
        if start or stop is not None:  # a token range: documents cut at its ends (empty rows are skipped)
            first = offsets[0]
            offsets = np.clip(offsets, first + start, offsets[-1] if stop is None else first + stop)
        self._rows = [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    def _take(self, n: int) -> np.ndarray:
        """The next n tokens of this rank's stream, advancing the position."""
        out, need, idle = [], n, 0
        while need:
            if self._rows is None:
                self._load_unit()
            if self.row >= len(self._rows):
                self.unit, self.row, self.offset, self._rows = self.unit + 1, 0, 0, None
                if self.unit == len(self.units):
                    self.epoch, self.unit = self.epoch + 1, 0
                idle += 1
                if idle > len(self.units):  # a whole epoch without a token
                    raise ValueError(f"rank {self.rank} of {self.world} has no tokens to read")
                continue
            doc = self._rows[self.row]
            piece = doc[self.offset:self.offset + need]
            if len(piece):
                idle = 0
            out.append(piece)
            need -= len(piece)
            self.offset += len(piece)
            if self.offset >= len(doc):
                self.row, self.offset = self.row + 1, 0
        return np.concatenate(out).astype(np.int64)

    def _peek(self) -> int:
        """The next token, without moving."""
        saved = (self.epoch, self.unit, self.row, self.offset, self._rows)
        token = int(self._take(1)[0])
        self.epoch, self.unit, self.row, self.offset, self._rows = saved
        return token

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) with y = x shifted by one token. Consecutive batches tile the stream (the
        last target of one batch is the first input of the next), as in nanoGPT."""
        B, T = self.B, self.T
        buf = np.append(self._take(B * T), self._peek())
        t = torch.from_numpy(buf)
        return t[:-1].view(B, T), t[1:].view(B, T)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


class Prefetcher:
    """Reads the next batches in a background thread (pyarrow releases the GIL) and remembers
    the loader position after each batch, so a checkpoint records exactly what was consumed."""

    def __init__(self, loader: ShardLoader, pin: bool, depth: int = 2):
        self.loader, self.pin = loader, pin
        self.state = loader.state_dict()
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                x, y = self.loader.next_batch()
                if self.pin:
                    x, y = x.pin_memory(), y.pin_memory()
                self._put((x, y, self.loader.state_dict()))
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        x, y, self.state = item
        return x, y

    def state_dict(self) -> dict:
        return dict(self.state)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
