"""The pieces connect: a Prefect flow writes and commits an artifact through the lake, and the
Prefect API knows the flow run and its artifact."""

from __future__ import annotations

import hashlib

import pytest

from tasks.lake import Lake


def test_ingest_flow_commits_through_the_lake(prefect_harness, shared_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.stages import ingest
    from tasks.ingest import IngestParams

    files = [str(shared_data / "text" / "botchan.txt"), str(shared_data / "text" / "tinyshakespeare.txt")]
    lake_url = str(tmp_path / "lake")
    ref = ingest(IngestParams(files=files), lake_url=lake_url)
    lake = Lake(lake_url)
    m = lake.resolve(ref)
    assert ref == lake.resolve("ingest").ref
    assert {f["path"]: f["sha256"] for f in m.files} == {
        p.rsplit("/", 1)[-1]: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in files}
    assert m.metrics["files"] == 2 and m.flow_run_id

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(m.flow_run_id)
        assert run.name and run.state.is_completed()
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["ingest-version"])))
        assert any(m.ref in (a.description or "") and m.version in a.data for a in arts)

    # The same files again: a cache hit, same ref, nothing rewritten.
    assert ingest(IngestParams(files=list(reversed(files))), lake_url=lake_url) == ref
    assert lake.resolve(ref).created_at == m.created_at


def test_ingest_rejects_bad_parameters_before_work(tmp_path):
    from pydantic import ValidationError

    from tasks.ingest import IngestParams

    with pytest.raises(ValidationError, match="nosuchfile.txt: no such file"):
        IngestParams(files=[str(tmp_path / "nosuchfile.txt")])
    with pytest.raises(ValidationError, match="at least 1 item"):
        IngestParams(files=[])


def test_flows_refuse_bad_parameters_before_a_run_starts(prefect_harness, tmp_path):
    """A flow called with a plain dict (as a deployment or a script would) has it validated
    against the stage's pydantic model before any task runs: nothing is created."""
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import pipeline
    from flows.stages import tokenizer

    lake_url = str(tmp_path / "lake")
    for flow, params, field in [(tokenizer, {"vocab_size": 3}, "vocab_size"),
                                (tokenizer, {"vocab_sise": 4096}, "vocab_sise"),
                                (pipeline, {"from_stage": "nosuchstage"}, "from_stage"),
                                (pipeline, {"pretrain": {"max_steps": 0}}, "max_steps")]:
        with pytest.raises(ParameterTypeError, match=field):
            flow(params=params, lake_url=lake_url)
    assert not (tmp_path / "lake").exists()


def test_a_flow_run_sends_its_heartbeat_and_ends_without_waiting_for_it(prefect_harness):
    """flows/runtime.py stops Prefect's sync engine from joining the heartbeat thread at the end of
    each flow run (up to a second each): the heartbeat must still reach the server, and the thread
    must still stop by itself. Timing-free: the flow waits until its heartbeat was sent (a starved
    thread that first runs after the run ended sends none), and joins are recorded, not inferred."""
    import json
    import threading
    import time
    import urllib.request
    from unittest import mock

    import flows.stages  # noqa: F401  (installs the change)
    from prefect import flow
    from prefect.flow_engine import FlowRunEngine

    sent, release = threading.Event(), threading.Event()
    emit = FlowRunEngine._emit_flow_run_heartbeat

    def emit_and_hold(self, *args, **kwargs):
        emit(self, *args, **kwargs)
        sent.set()
        release.wait(30)  # the thread stays alive until the test has seen how the run ended

    joined: list[threading.Thread] = []
    join = threading.Thread.join

    def record_join(thread, *args, **kwargs):
        joined.append(thread)
        return join(thread, *args, **kwargs)

    def heartbeat_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if any(getattr(a, "__name__", "") == "heartbeat_loop" for a in getattr(t, "_args", ()))]

    @flow(name="c2m-heartbeat-check")
    def quick() -> str:
        from prefect.runtime import flow_run

        assert sent.wait(60), "the heartbeat thread sent nothing"
        return str(flow_run.id)

    with mock.patch.object(FlowRunEngine, "_emit_flow_run_heartbeat", emit_and_hold), \
            mock.patch.object(threading.Thread, "join", record_join):
        try:
            run_id = quick()
            beating = heartbeat_threads()
        finally:
            release.set()
    assert beating and not [t for t in joined if t in beating], "the flow run waited for its heartbeat thread"
    body = json.dumps({"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                                  "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 5}).encode()
    deadline = time.time() + 60
    while True:
        req = urllib.request.Request(f"{prefect_harness['url']}/api/events/filter", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            if json.load(r)["events"]:
                break
        assert time.time() < deadline, f"no heartbeat event of flow run {run_id}"
        time.sleep(0.5)
    for t in beating:
        t.join(5)
        assert not t.is_alive(), "the heartbeat thread did not stop by itself"
    assert not heartbeat_threads()


def test_a_server_without_csrf_protection_is_asked_about_tokens_once_per_process(prefect_harness):
    """flows/runtime.py remembers, per API URL, that the server has no CSRF protection (Prefect's
    default): stock Prefect asks again with every new client, twice per flow run."""
    from unittest import mock

    import flows.stages  # noqa: F401  (installs the change)
    from prefect import flow
    from prefect.client import base

    asked: list[str] = []
    send = base.PrefectHttpxSyncClient.send

    def recording_send(self, request, *args, **kwargs):
        if "/csrf-token" in request.url.path:
            asked.append(str(request.url))
        return send(self, request, *args, **kwargs)

    @flow(name="c2m-csrf-check")
    def quick(n: int) -> int:
        return n

    with mock.patch.object(base.PrefectHttpxSyncClient, "send", recording_send):
        assert [quick(n) for n in range(3)] == [0, 1, 2]
    assert len(asked) <= 1, asked
