"""One declaration per stage: the CLI's commands, the flows, the pipeline and the deployments
all come from the registry, so a stage added there alone (tests/toy_stage.py) runs through the
CLI, the pipeline and a deployment; user errors are one line, bugs keep their traceback; the
server stops on SIGTERM and SIGINT, taking its processes with it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import BIN, ROOT, free_port, run_cli
from tasks.lake import Lake

PLUGIN = {"CRAWL2MODEL_PLUGINS": "tests.toy_stage", "PYTHONPATH": str(ROOT)}


def test_prefect_yaml_is_written_from_the_registry():
    from prefect.flows import load_flow_from_entrypoint

    from deployments.spec import PREFECT_YAML, render
    from tasks.registry import STAGES

    assert PREFECT_YAML.read_text() == render(), "prefect.yaml is stale: run `python -m deployments.spec`"
    import yaml

    entries = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    for name, st in STAGES.items():
        assert entries[name]["entrypoint"] == f"flows/stages.py:{STAGES[name].flow_attribute}"
        assert entries[name]["work_pool"]["name"] == {"data": "crawl2model-process", "gpu": "crawl2model-gpu"}[st.pool]
        fl = load_flow_from_entrypoint(str(ROOT / entries[name]["entrypoint"]))
        assert fl.name == name and set(fl.parameters.properties) == {"params", "lake_url"}
    assert entries["weekly"]["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC"}]


def test_commands_flows_and_pipeline_come_from_the_registry():
    from flows.cli import build_parser
    from tasks.registry import PIPELINE, PipelineParams
    from flows.stages import FLOWS
    from tasks.registry import STAGES

    stage_cmds = next(a for a in build_parser()._subparsers._group_actions[0].choices["stage"]._actions
                      if a.dest == "stage").choices
    assert list(stage_cmds) == list(STAGES) == list(FLOWS)
    assert "ingest" in STAGES and "ingest" not in PIPELINE
    assert PIPELINE == ("download", "filter", "dedup", "tokenizer", "shard", "pretrain", "conversations", "sft")
    assert set(PIPELINE) <= set(PipelineParams.model_fields)
    # each stage's inputs are declared once, on its parameters, and name stages before it
    assert STAGES["shard"].inputs == {"input": ("dedup", "filter"), "tokenizer": ("tokenizer",), "extra": ("ingest",)}
    assert STAGES["tokenizer"].inputs == {"input": ("dedup", "filter"), "extra": ("ingest",)}
    order = list(STAGES)
    for st in STAGES.values():  # a stage reads versions of stages before it (a list input, empty by default, may
        # name a later one: conversations --probes probe@V, the probe of an sft model)
        assert all(order.index(kinds[0]) < order.index(st.name) for name, kinds in st.inputs.items()
                   if not isinstance(st.params.model_fields[name].default_factory, type)), st.name
    assert STAGES["conversations"].inputs["probes"] == ("probe",) and order.index("probe") > order.index("sft")


def _tree_gone(pids: list[int], within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _wait_for_deployment(api: str, name: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    import urllib.request
    import json

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            req = urllib.request.Request(f"{api}/deployments/name/{name}/{name}")
            json.loads(urllib.request.urlopen(req, timeout=2).read())
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"deployment {name}/{name} never appeared")


@pytest.mark.slow
def test_a_stage_added_through_the_registry_runs_everywhere_and_the_server_stops(tmp_path):
    from common.process import descendants

    lake = str(tmp_path / "lake")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **PLUGIN, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    make = subprocess.Popen(["make", "-s", "server", f"PORT={port}"], cwd=ROOT, env=env,
                            stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        _wait_for_deployment(api, "toy", make)
        with_api = {**PLUGIN, "PREFECT_API_URL": api}

        # the CLI: its own `stage toy` command, options from the toy's parameters
        r = run_cli("--lake", lake, "stage", "toy", "--words", "5", env=with_api)
        assert r.returncode == 0, r.stderr[-3000:]
        m = Lake(lake).resolve("toy")
        assert f"{m.ref}: 5 words" in r.stdout and Lake(lake).open(m, "words.txt").read() == b"toy toy toy toy toy"

        # a user's error: its one line, last; no traceback in the terminal or the flow-run log
        r = run_cli("--lake", lake, "stage", "toy", "--fail", "user", env=with_api)
        line = "error: toy: 3 words are not enough for anyone"
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == line, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, LogFilter, LogFilterFlowRunId

        with SyncPrefectClient(api) as client:
            failed = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["FAILED"]))))
            assert [fr.state.message for fr in failed] == [line]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[failed[0].id])))
            assert logs and not any("Traceback" in lg.message for lg in logs)

        # a bug is not a user's error: it keeps its traceback, and is not called an outage
        r = run_cli("--lake", lake, "stage", "toy", "--fail", "bug", env=with_api)
        assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'no such key'" in r.stderr
        assert "cannot reach lake" not in r.stderr and len(Lake(lake).versions("toy")) == 1

        # the pipeline: a stage of its own, bounded by --from/--to, its parameters under toy.
        r = run_cli("--lake", lake, "run", "--from", "toy", "--to", "toy", "--set", "toy.words=7", env=with_api)
        assert r.returncode == 0, r.stderr[-3000:]
        assert Lake(lake).resolve("toy").metrics["words"] == 7 and "7 words" in r.stdout

        # a deployment: the served `toy` deployment, run through the API
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            fr = run_deployment("toy/toy", parameters={"params": {"words": 9}, "lake_url": lake}, timeout=240)
        assert fr.state.is_completed(), fr.state
        assert Lake(lake).resolve("toy").metrics["words"] == 9

        # SIGINT stops deployments/serve.py alone (it joins the running server)
        serve = subprocess.Popen([str(BIN / "python"), "-m", "deployments.serve"], cwd=ROOT,
                                 env={**env, "PREFECT_API_URL": api},
                                 stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "serving" not in (tmp_path / "serve.log").read_text() and time.time() < deadline:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        tree = [serve.pid, *descendants(serve.pid)]
        serve.send_signal(signal.SIGINT)
        assert _tree_gone(tree, 10), (tmp_path / "serve.log").read_text()[-3000:]
        assert serve.wait(5) is not None
    finally:
        # SIGTERM stops `make server`: the runner, the Prefect server, everything below it
        tree = [make.pid, *descendants(make.pid)]
        assert len(tree) >= 3  # make, serve, the Prefect server
        make.send_signal(signal.SIGTERM)
        stopped = _tree_gone(tree, 10)
        if not stopped:
            for p in tree:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        assert stopped, (tmp_path / "server.log").read_text()[-3000:]


def test_tasks_and_the_lake_import_no_prefect():
    """tasks/ (the lake included) reports through tasks/report.py; only flows/ brings Prefect."""
    code = ("import sys, pkgutil, importlib, tasks, common\n"
            "for m in pkgutil.iter_modules(tasks.__path__): importlib.import_module('tasks.' + m.name)\n"
            "import tasks.lake\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'flows'}))")
    r = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
