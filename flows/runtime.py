"""Prefect's side of tasks/report.py: run ids, the run logger, artifacts in the UI and Secret
blocks. Installed when flows/ is imported; every call works outside a run too (it then falls
back to the quiet default), and a UI update that fails never fails the work."""

from __future__ import annotations

import contextlib
from typing import Any

from tasks.report import Runtime


def in_run() -> bool:
    """True inside a Prefect flow or task run: only then are there artifacts to publish."""
    try:
        from prefect.context import get_run_context

        get_run_context()
        return True
    except Exception:
        return False


class PrefectRuntime(Runtime):
    def run_id(self) -> str | None:
        if not in_run():
            return None
        from prefect import runtime

        run_id = runtime.flow_run.id
        return str(run_id) if run_id else None

    def logger(self):
        if not in_run():
            return super().logger()
        from prefect.logging import get_run_logger

        return get_run_logger()

    def markdown(self, key: str, markdown: str, description: str) -> None:
        if in_run():
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(key=key, markdown=markdown, description=description)

    def table(self, key: str, rows: list[dict], description: str) -> None:
        if in_run():
            from prefect.artifacts import create_table_artifact

            create_table_artifact(key=key, table=rows, description=description)

    def progress(self, description: str, key: str | None = None) -> Any:
        if not in_run():
            return None
        from prefect.artifacts import create_progress_artifact

        try:
            return create_progress_artifact(0.0, key=key, description=description)
        except Exception:
            return None  # the UI missing a bar must never fail the work

    def update_progress(self, handle: Any, percent: float, description: str | None = None) -> None:
        if handle is None:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(handle, progress=percent, description=description)
        except Exception:
            pass

    def secret(self, name: str) -> Any:
        from prefect.blocks.system import Secret

        return Secret.load(name).get()


def end_flow_runs_without_waiting_for_heartbeats() -> None:
    """Prefect 3.9.1's sync flow engine joins its heartbeat thread when a flow run ends, and that
    thread sleeps in whole seconds: up to a second added to every flow run, 7 of them in a pipeline
    (measured: 0.94 s of a 1.18 s cache-hit `download` flow). Its async engine does not join: the
    thread is a daemon and stops itself within the second, having checked its stop event. The sync
    engine is made to do the same; heartbeats are sent as before (test_prefect_wiring.py). Called
    where the stage flows are made (flows/stages.py), which every flow of ours imports."""
    import prefect.flow_engine as engine

    join = engine._send_heartbeats
    if getattr(join, "without_join", False):
        return

    @contextlib.contextmanager
    def send_heartbeats(run_engine, join_on_exit: bool = True):
        with join(run_engine, join_on_exit=False):
            yield

    send_heartbeats.without_join = True
    engine._send_heartbeats = send_heartbeats


def ask_each_server_once_whether_it_uses_csrf_tokens() -> None:
    """Prefect 3.9.1's HTTP client asks the server for a CSRF token before its first change
    request, and learns that the server has CSRF protection off (Prefect's default: a 422) only
    for itself: every new client asks again, two per flow run, 14 of a demo pipeline's 125 API
    requests. The answer is kept per API URL for the whole process; a server with protection on
    is asked as before (tokens, and their renewal, are per client)."""
    from prefect.client import base

    if getattr(base.PrefectHttpxSyncClient._add_csrf_headers, "remembers", False):
        return
    without: set[str] = set()  # base URLs of servers that said they have no CSRF protection

    def sync_add(add):
        def _add_csrf_headers(self, request):
            url = str(self.base_url)
            if url in without:
                self.enable_csrf_support = False
                return
            add(self, request)
            if not self.enable_csrf_support:
                without.add(url)
        _add_csrf_headers.remembers = True
        return _add_csrf_headers

    def async_add(add):
        async def _add_csrf_headers(self, request):
            url = str(self.base_url)
            if url in without:
                self.enable_csrf_support = False
                return
            await add(self, request)
            if not self.enable_csrf_support:
                without.add(url)
        return _add_csrf_headers

    base.PrefectHttpxSyncClient._add_csrf_headers = sync_add(base.PrefectHttpxSyncClient._add_csrf_headers)
    base.PrefectHttpxAsyncClient._add_csrf_headers = async_add(base.PrefectHttpxAsyncClient._add_csrf_headers)
