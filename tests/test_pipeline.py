"""The pipeline end to end (demo preset), on a local lake and on S3, the cache-hit rerun, a single
stage rebuilt, deployments against a real `prefect server start`, and the UI in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from tasks.lake import Lake
from tests.conftest import BIN, QUICK, ROOT, STAGES, run_all, run_cli, run_pipeline, versions_and_hashes

def test_demo_pipeline_end_to_end(demo_local_run):
    lake_url, r = demo_local_run
    lake = Lake(lake_url)
    ms = {k: lake.resolve(k) for k in STAGES}
    # lineage from checkpoint back to the crawl
    assert ms["pretrain"].inputs == [ms["shard"].ref, ms["tokenizer"].ref]
    assert ms["shard"].inputs == [ms["dedup"].ref, ms["tokenizer"].ref]
    assert ms["dedup"].inputs == [ms["filter"].ref] and ms["filter"].inputs == [ms["download"].ref]
    assert ms["filter"].metrics["documents"] >= 10 and ms["shard"].metrics["train_tokens"] > 5000
    files = {f["path"] for f in ms["pretrain"].files}
    assert {"final/model.safetensors", "final/config.json", "loss.png", "metrics.json"} <= files
    assert ms["pretrain"].metrics["steps"] == 20
    for kind in STAGES:
        assert f"{kind}@" in r.stdout and "built now" in r.stdout
    s = run_cli("--lake", lake_url, "sample", "--model", "pretrain@latest", "--prompt", "The ", "--max-new-tokens", "20")
    assert s.returncode == 0 and s.stdout.startswith("The ") and len(s.stdout.strip()) > 5


def test_second_run_is_all_cache_hits(demo_local_run, demo_mirror):
    lake_url, _ = demo_local_run
    before = versions_and_hashes(Lake(lake_url))
    t = time.time()
    r = run_pipeline(lake_url, demo_mirror)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("cache hit") == len(STAGES) and "built now" not in r.stdout
    assert versions_and_hashes(Lake(lake_url)) == before
    assert time.time() - t < 120


def test_rebuild_one_stage(demo_local_run, demo_mirror, tmp_path):
    # on a copy: a rebuild un-commits the version first, and other tests read the reference run's
    lake_url = str(tmp_path / "lake")
    shutil.copytree(demo_local_run[0], lake_url)
    lake = Lake(lake_url)
    old = lake.resolve("shard")
    time.sleep(1.1)  # created_at has one-second resolution
    r = run_pipeline(lake_url, demo_mirror, "--from", "shard", "--to", "shard", "--rebuild", "shard")
    assert r.returncode == 0, r.stderr[-3000:]
    new = lake.resolve("shard")
    assert new.version == old.version and new.created_at > old.created_at
    assert new.files == old.files  # deterministic: the same bytes again
    assert "built now" in r.stdout and "pretrain@" not in r.stdout


def test_invalid_pipeline_parameters(tmp_path, demo_mirror):
    cases = [(["--from", "shard", "--to", "filter"], "comes after"),
             (["--set", "pretrain.max_steps=0"], "invalid pretrain.max-steps"),
             (["--set", "nosuchstage.x=1"], "invalid --set 'nosuchstage'"),
             (["--set", "pretrain.rdzv_endpoint=nohostport"], "invalid rdzv endpoint"),
             (["--set", "pretrain.nnodes=2", "--set", "pretrain.node_rank=2", "--set",
               "pretrain.rdzv_endpoint=127.0.0.1:29400"], "node_rank 2 is not a node of a 2-node run (0 to 1)"),
             (["--set", "pretrain.nnodes=2"], "a 2-node run needs rdzv_endpoint HOST:PORT")]
    lake = str(tmp_path / "lake")
    runs = run_all([[str(BIN / "crawl2model"), "--lake", lake, "run", "--preset", "demo", *QUICK, *args]
                    for args, _ in cases], cwd=demo_mirror.parent)  # as run_pipeline, all at once
    for (args, message), r in zip(cases, runs):
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert not (tmp_path / "lake").exists()


# --------------------------------------------------------------------------- Prefect server, UI


# `prefect_server` (conftest): the session's real `prefect server start`, which every test uses.


def prefect(server, *args, timeout=300):
    return subprocess.run([str(BIN / "prefect"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=server["env"], timeout=timeout)


@pytest.mark.xdist_group("deployments")  # the next test runs what this one deploys
def test_prefect_deploy_all_creates_every_deployment_and_the_schedule(prefect_server):
    for pool in ("crawl2model-process", "crawl2model-gpu"):
        r = prefect(prefect_server, "work-pool", "create", pool, "--type", "process")
        assert r.returncode == 0, r.stderr
    r = prefect(prefect_server, "--no-prompt", "deploy", "--all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = prefect(prefect_server, "deployment", "ls")
    for name in ["pipeline/weekly", "download/download", "filter/filter", "dedup/dedup", "tokenizer/tokenizer",
                 "shard/shard", "pretrain/pretrain", "ingest/ingest"]:
        assert name in r.stdout.replace(" ", ""), (name, r.stdout)
    r = prefect(prefect_server, "deployment", "inspect", "pipeline/weekly")
    assert "0 3 * * 1" in r.stdout and "crawl2model-gpu" in r.stdout
    r = prefect(prefect_server, "deployment", "inspect", "pretrain/pretrain")
    assert "crawl2model-gpu" in r.stdout


@pytest.mark.xdist_group("deployments")
def test_a_deployment_run_with_invalid_parameters_is_refused_before_it_starts(prefect_server):
    """The server checks a run's parameters against the flow's pydantic schema (extra fields
    forbidden, bounds): no flow run is created."""
    for params, field in [({"params": {"vocab_size": 3}}, "vocab_size"),
                          ({"params": {"vocab_sise": 4096}}, "vocab_sise"),
                          ({"params": {}, "lake_url": 7}, "lake_url")]:
        r = prefect(prefect_server, "deployment", "run", "tokenizer/tokenizer", "--params", json.dumps(params))
        assert r.returncode != 0 and field in r.stdout + r.stderr, (params, r.stdout[-2000:], r.stderr[-2000:])
    # a valid one is accepted (it waits for a worker): the deployment's only flow run
    r = prefect(prefect_server, "deployment", "run", "tokenizer/tokenizer", "--params",
                json.dumps({"params": {"vocab_size": 4096}}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    found = subprocess.run(["curl", "-sf", "-X", "POST", f"{prefect_server['url']}/api/flow_runs/filter",
                            "-H", "Content-Type: application/json", "-d",
                            json.dumps({"deployments": {"name": {"any_": ["tokenizer"]}}})],
                           capture_output=True, text=True)
    assert [r["parameters"] for r in json.loads(found.stdout)] == [{"params": {"vocab_size": 4096}}]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is installed by `make test`")
def test_ui_shows_the_flow_run_artifacts(prefect_server, shared_data, tmp_path):
    lake = str(tmp_path / "lake")
    files = [str(shared_data / "warc" / "wget-sample-0000.warc.gz")]
    r = subprocess.run([str(BIN / "crawl2model"), "--lake", lake, "stage", "download", "--files", *files],
                       capture_output=True, text=True, env=prefect_server["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = Lake(lake).resolve("download")
    page = f"{prefect_server['url']}/runs/flow-run/{m.flow_run_id}"
    found = subprocess.run(["curl", "-sf", "-X", "POST", f"{prefect_server['url']}/api/artifacts/filter",
                            "-H", "Content-Type: application/json",
                            "-d", json.dumps({"artifacts": {"key": {"any_": ["download-version"]}}})],
                           capture_output=True, text=True, timeout=30)
    ids = [a["id"] for a in json.loads(found.stdout) if a["flow_run_id"] == m.flow_run_id]
    assert ids, found.stdout
    artifact = f"{prefect_server['url']}/artifacts/artifact/{ids[0]}"
    shot = tmp_path / "flow-run.png"
    common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000", "--virtual-time-budget=15000"]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    subprocess.run([*common, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    assert f"{m.ref}: committed 1 file(s)" in dom.stdout, dom.stdout[-2000:]  # the run's logs
    # the stage's artifact: its version, lineage and metrics rendered from markdown
    art = subprocess.run([*common, "--dump-dom", artifact], capture_output=True, text=True, timeout=120)
    subprocess.run([*common, f"--screenshot={tmp_path / 'artifact.png'}", artifact], capture_output=True, timeout=120)
    assert m.ref in art.stdout and "Lineage" in art.stdout and "records_by_type" in art.stdout, art.stdout[-2000:]
