"""What the stages tell the world while they work, without knowing who is listening.

tasks/ and the lake import no orchestrator: they report through `runtime()`, which is this
module's quiet default (a logger, nothing published) until the code that runs them installs
another. flows/ installs Prefect's (flows/runtime.py): the id of the flow run for manifests,
the run logger, markdown / table / progress artifacts in the UI, Secret blocks for credentials.
"""

from __future__ import annotations

import logging
from typing import Any


class Runtime:
    """Outside any orchestrator: logs to the `crawl2model` logger and publishes nothing."""

    def run_id(self) -> str | None:
        """The id of the orchestrator's run this work belongs to (recorded in manifests)."""
        return None

    def logger(self) -> logging.Logger | logging.LoggerAdapter:
        return logging.getLogger("crawl2model")

    def markdown(self, key: str, markdown: str, description: str) -> None:
        """A page of markdown shown with the run (a lineage, a report, a loss curve)."""

    def table(self, key: str, rows: list[dict], description: str) -> None:
        """A table shown with the run (a funnel, metrics)."""

    def progress(self, description: str, key: str | None = None) -> Any:
        """Start a progress indicator; returns a handle for `update_progress` (None: none shown)."""
        return None

    def update_progress(self, handle: Any, percent: float, description: str | None = None) -> None:
        pass

    def secret(self, name: str) -> Any:
        """The value of a named secret (a Prefect Secret block)."""
        raise LookupError(f"no secret store here to read {name!r} from (run through crawl2model or a Prefect flow)")


_runtime: Runtime = Runtime()


def runtime() -> Runtime:
    return _runtime


def set_runtime(r: Runtime) -> None:
    global _runtime
    _runtime = r
