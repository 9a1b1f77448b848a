"""Progress of long work, in both places a user looks: a rich bar in the terminal and a
progress artifact in the UI (through the runtime: Prefect's inside a flow). Thread-safe; updates are throttled."""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, TextColumn,
                           TimeElapsedColumn, TransferSpeedColumn)
from rich.progress import Progress as RichProgress

from tasks.report import runtime


class Progress:
    def __init__(self, title: str, files: int, every: float = 1.0, unit: str = "files"):
        self.title, self.files_total, self.every = title, max(files, 0), every
        self.files = self.bytes = 0
        self._lock = threading.Lock()
        self._last_bar = self._last_artifact = 0.0  # the terminal redraws 10x as often as the UI is told
        self._artifact_id = None
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), *([DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit == "files" else []),
            TimeElapsedColumn(), console=Console(file=sys.stderr),
            disable=not sys.stderr.isatty())
        self._task = self._bar.add_task(title, total=self.files_total or None)

    def __enter__(self) -> "Progress":
        self._bar.start()
        self._artifact_id = runtime().progress(self.title)  # None outside Prefect: the bar is enough
        return self

    def advance_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self._update()

    def advance_files(self, n: int = 1) -> None:
        with self._lock:
            self.files += n
        self._update(force=self.files >= self.files_total)

    def _update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_bar < self.every / 10:
            return
        self._last_bar = now
        self._bar.update(self._task, completed=self.files,
                         description=f"{self.title} {self.bytes / 2**20:.1f} MiB" if self.bytes else self.title)
        if self._artifact_id is not None and (force or now - self._last_artifact >= self.every):
            self._last_artifact = now
            runtime().update_progress(self._artifact_id, 100.0 * self.files / self.files_total if self.files_total else 0.0)

    def __exit__(self, *exc) -> None:
        self._update(force=True)
        self._bar.stop()
