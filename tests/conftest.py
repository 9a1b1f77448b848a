"""Shared fixtures: real data from ../shared/data, a moto_server S3 API on loopback, one real
`prefect server start` for the whole session (own PREFECT_HOME; PREFECT_API_URL is exported, so
every `crawl2model` subprocess and every in-process flow uses it instead of starting a temporary
server of its own), and the demo pipeline run once for every test that only reads it.

Tests of the CLI's temporary Prefect server itself (it is in the stage's process tree, listens on
loopback only, dies with the stage, sends no telemetry) run their command with
`temp_server_env()`, which drops PREFECT_API_URL."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tasks.lake import Lake

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
BIN = Path(sys.executable).parent

# Credentials the tests use against moto; their values must never appear in anything we write.
S3_KEY_ID = "AKIACRAWL2MODELTEST1"
S3_SECRET = "crawl2model-test-secret-" + "9f3a7c51e2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Prefect: own home, no analytics, and the run's one server, all set before anything imports
# prefect. `make test` runs pytest-xdist workers (pytest -n): the first process to import this file
# (the controller, or a plain `pytest`) picks the folders and the port and exports them; the
# workers it starts inherit them. The server lives in SERVER_HOME (its database), each process's
# Prefect state in a PREFECT_HOME of its own below TEST_HOME: a test that searches what Prefect
# wrote (test_storage_faults' credential check) searches all of TEST_HOME.
if "C2M_TEST_HOME" not in os.environ:
    os.environ["C2M_TEST_HOME"] = tempfile.mkdtemp(prefix="c2m-test-")
    os.environ["C2M_TEST_PREFECT_URL"] = f"http://127.0.0.1:{free_port()}"
TEST_HOME = Path(os.environ["C2M_TEST_HOME"])
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # None: the controller, or a plain pytest
SERVER_HOME = TEST_HOME / "server"
_PREFECT_HOME = str(TEST_HOME / f"prefect-{WORKER or 'main'}")
os.makedirs(_PREFECT_HOME, exist_ok=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.pop("CRAWL2MODEL_LAKE", None)
PREFECT_URL = os.environ["C2M_TEST_PREFECT_URL"]
os.environ["PREFECT_API_URL"] = f"{PREFECT_URL}/api"


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        pytest.fail(f"real test data not found at {SHARED_DATA} (expected ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API: moto_server on 127.0.0.1, a random free port, for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        os.environ.update(env)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def make_bucket(endpoint: str, versioning: bool = True) -> str:
    import boto3

    name = f"c2m-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=name)
    if versioning:
        client.put_bucket_versioning(Bucket=name,
                                     VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture(params=["local", "s3"])
def lake_url(request, tmp_path) -> str:
    """The lake contract suite runs twice: on a local folder and on the S3 API."""
    if request.param == "local":
        return str(tmp_path / "lake")
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{make_bucket(endpoint)}/lake"


# --------------------------------------------------------------------------- the Prefect server

_server: subprocess.Popen | None = None


def _start_prefect_server() -> subprocess.Popen | None:
    """`prefect server start` on PREFECT_URL, in a session of its own (uvicorn dies with it), by
    the controller or a plain pytest; an xdist worker uses theirs (None)."""
    global _server
    if _server is None and WORKER is None:
        SERVER_HOME.mkdir(parents=True, exist_ok=True)
        port = PREFECT_URL.rsplit(":", 1)[1]
        # the server's background services that no test uses, off: they poll the database every
        # few seconds (late runs, schedules, ...) on the 2 cores the tests share
        env = {**os.environ, "PREFECT_HOME": str(SERVER_HOME),
               **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in (
                   "CANCELLATION_CLEANUP", "FOREMAN", "LATE_RUNS", "SCHEDULER", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
                   "CLEANUP_RECONCILER", "TRIGGERS")}}
        _server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port,
                                    "--analytics-off"], stdout=open(SERVER_HOME / "server.log", "wb"),
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=SERVER_HOME)
    return _server


# Under pytest-xdist (`make test`: -n 3 --dist loadgroup), the tests that share an expensive
# fixture run in one worker, so it is made once: the S3 pipelines, and each module-scoped fixture
# (the curated corpus, the tokenizer corpus, the trained model, ...). The session-scoped demo runs
# are shared by all workers instead (`run_once`). The queue starts with the S3 pipelines (the
# longest unit), then one test that makes the reference demo run while the other workers take the
# groups that do not need it, then the long single tests, so the last ones to run are short.
FIRST = ["s3-pipelines", "tests/test_pipeline.py::test_demo_pipeline_end_to_end", "tests/test_curation.py", "ray",
         "tests/test_model.py", "slurm", "tests/test_tokens.py", "tests/test_registry.py::test_a_stage_added",
         "tests/reliability/test_process_faults.py::test_a_killed_datatrove", "tests/reliability/test_storage_faults.py",
         "tests/reliability/test_full_disk.py", "tests/reliability/test_process_faults.py", "tests/test_download.py"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def group(item) -> str | None:
        if mark := item.get_closest_marker("xdist_group"):  # the test's own
            return mark.args[0]
        if "s3_pipelines" in item.fixturenames:
            return "s3-pipelines"
        defs = item._fixtureinfo.name2fixturedefs
        if any(d[-1].scope == "module" for name in item.fixturenames for d in [defs.get(name)] if d):
            return item.nodeid.split("::")[0]
        return None

    groups = {item: group(item) for item in items}

    def rank(item) -> int:
        return next((i for i, key in enumerate(FIRST) if groups[item] == key or item.nodeid.startswith(key)),
                    len(FIRST))

    for item, g in groups.items():
        if g is not None and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(g))
    items.sort(key=rank)  # stable: collection order within a rank


def run_once(name: str, tmp_path_factory, make):
    """`make(folder)` once for the whole run: under pytest-xdist the first worker to ask makes it in
    a folder all workers share (under a file lock), the others wait for it and read it back; the
    value must pickle."""
    if WORKER is None:
        return make(tmp_path_factory.mktemp(name))
    import fcntl
    import pickle

    root = tmp_path_factory.getbasetemp().parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.pickle"
        if done.exists():
            return pickle.loads(done.read_bytes())
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to make it left
        folder.mkdir()
        value = make(folder)
        done.write_bytes(pickle.dumps(value))
        return value


def pytest_sessionstart(session):
    # started before collection, which imports torch, datatrove, ...: the two overlap
    _start_prefect_server()


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> dict:
    """The run's Prefect server, up and healthy before the first test: {"url", "env"}. Every
    test uses it through PREFECT_API_URL (exported above); the deployment and UI tests by name."""
    import urllib.request

    proc = _start_prefect_server()
    deadline = time.time() + 180
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n"
                               + (SERVER_HOME / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{PREFECT_URL}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("prefect server not healthy after 180 s:\n"
                               + (SERVER_HOME / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    return {"url": PREFECT_URL, "env": dict(os.environ)}


@pytest.fixture(scope="session")
def prefect_harness(prefect_server) -> dict:
    """The Prefect API for in-process flows: the session's server (kept under this name)."""
    return prefect_server


def temp_server_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) without PREFECT_API_URL: a `crawl2model` command run with it
    starts its own temporary Prefect server, as it does for a user who has no server. For the tests
    of that server itself, and for commands in a network namespace of their own (`unshare -n`),
    where the session's server is out of reach."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PREFECT_API_URL"}
    # Prefect waits 20 s for it by default: too short on 2 busy cores, for a fresh PREFECT_HOME
    # (its database made from scratch) above all
    return {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **env}


def copy_version(src: Lake, dst: Lake, ref: str) -> str:
    """Copy a version and its lineage into another lake; the same recipe gives the same version."""
    m = src.resolve(ref)
    inputs = [copy_version(src, dst, i) for i in m.inputs]
    with dst.produce(m.kind, m.params, inputs, m.code_version) as p:
        if not p.cached:
            for f in m.files:
                p.write_bytes(f["path"], src.open(m, f["path"]).read())
            p.metrics.update(m.metrics)
    assert p.version == m.version
    return p.ref


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "crawl2model"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def run_all(cmds: list[list[str]], timeout: float = 300, **popen) -> list[subprocess.CompletedProcess]:
    """Independent commands run at once (mostly the CLI's start-up, one core each), in order of `cmds`."""
    import concurrent.futures

    def one(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)

    with concurrent.futures.ThreadPoolExecutor(len(cmds) or 1) as pool:
        return list(pool.map(one, cmds))


def run_cli_all(*arg_lists: list[str], env: dict | None = None, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """run_cli for each argument list, all at once."""
    return run_all([[str(BIN / "crawl2model"), *args] for args in arg_lists], timeout=timeout,
                   env={**os.environ, **(env or {})}, cwd=ROOT)


# --------------------------------------------------------------------------- the demo pipeline

STAGES = ["download", "filter", "dedup", "tokenizer", "shard", "pretrain", "conversations", "sft"]
QUICK = ["--set", "pretrain.max_steps=20", "--set", "pretrain.eval_every=10", "--set", "pretrain.sample_every=0",
         "--set", "pretrain.checkpoint_every=10",
         # post-training, small: a few generated conversations, a few steps
         "--set", "conversations.arithmetic=200", "--set", "conversations.corpus_questions=50",
         "--set", "conversations.identity=20", "--set", "sft.max_steps=4", "--set", "sft.eval_every=2",
         "--set", "sft.eval_steps=1", "--set", "sft.checkpoint_every=2", "--set", "sft.batch_size=2",
         "--set", "sft.seq_len=128", "--set", "sft.sample_tokens=16"]


@pytest.fixture(scope="session")
def demo_mirror(tmp_path_factory) -> Path:
    def make(folder: Path) -> Path:
        r = run_cli("demo-mirror", str(folder / "demo-mirror"))
        assert r.returncode == 0, r.stderr
        return folder / "demo-mirror"

    return run_once("mirror", tmp_path_factory, make)


@pytest.fixture(scope="session")
def curated_corpus(shared_data, tmp_path_factory) -> dict:
    """download -> filter -> dedup of every real WARC plus planted duplicates, once for the run
    (tests/corpus.py): {"lake", "download", "filter", "dedup": refs, "planted"}. Tests may add
    versions of other kinds to its lake, never of these three."""
    from tests.corpus import make_curated

    return run_once("curated", tmp_path_factory, lambda folder: make_curated(shared_data, folder))


def run_pipeline(lake: str, mirror: Path, *extra: str, env: dict | None = None, cwd: Path | None = None,
                 unset: tuple[str, ...] = ()):
    # `run --preset demo` reads the mirror from ./demo-mirror: run where it is
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([str(BIN / "crawl2model"), "--lake", lake, "run", "--preset", "demo", *QUICK, *extra],
                          capture_output=True, text=True, timeout=900, cwd=cwd or mirror.parent, env=environ)


def versions_and_hashes(lake: Lake) -> dict:
    out = {}
    for kind in STAGES:
        m = lake.resolve(kind)
        out[kind] = (m.version, {f["path"]: f["sha256"] for f in m.files})
    return out


@pytest.fixture(scope="session")
def demo_local_run(demo_mirror, tmp_path_factory):
    """The demo pipeline on a local lake, once: the uninterrupted reference run that the tests of
    the pipeline and the reliability tests compare with. (lake, CompletedProcess). The TCP
    sockets its processes listen on are watched meanwhile: `.listeners` of the CompletedProcess,
    for tests/reliability/test_listeners.py. It uses the session's Prefect server (the CLI's
    temporary server is tested where a command starts one: test_process_faults, test_curation)."""
    from tests.listening import watch_listeners

    def make(work: Path):
        lake = str(work / "lake")
        cmd = [str(BIN / "crawl2model"), "--lake", lake, "run", "--preset", "demo", *QUICK]
        with open(work / "stdout", "w+") as out, open(work / "stderr", "w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=demo_mirror.parent)
            try:
                seen = watch_listeners(proc)
                proc.wait(900)
            finally:
                if proc.poll() is None:
                    proc.kill()
            out.seek(0), err.seek(0)
            r = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
        assert r.returncode == 0, r.stderr[-4000:]
        r.listeners = seen
        return lake, r

    return run_once("pipe", tmp_path_factory, make)


@pytest.fixture(scope="session")
def fault_proxy(s3_endpoint):
    """tests/s3faults.py's fault-injecting proxy in front of the session's moto_server, on
    127.0.0.1; faults are off until a test turns them on (and off again: see `faults`)."""
    from tests.s3faults import FaultProxy

    proxy = FaultProxy(s3_endpoint).start()
    yield f"http://127.0.0.1:{proxy.port}"
    proxy.stop()


@contextlib.contextmanager
def faults(proxy: str, **cfg):
    """S3 faults on for the duration of a block; yields a function giving the fault counts."""
    from tests.s3faults import KINDS, control

    control(proxy, **{"rate": 0.1, "kinds": list(KINDS), "mode": "transient", "seed": 0, "stall_s": 1.0, **cfg})
    try:
        yield lambda: control(proxy)["counts"]
    finally:
        control(proxy, rate=0.0)


def pytest_sessionfinish(session, exitstatus):
    if WORKER is not None:
        return
    if os.environ.get("C2M_CPU_LOG") and _server is not None:  # the session server's CPU too
        from common.process import descendants

        ticks = 0
        for pid in [_server.pid, *descendants(_server.pid)]:
            with contextlib.suppress(OSError):
                ticks += sum(int(x) for x in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[11:15])
        with open(os.environ["C2M_CPU_LOG"], "a") as f:
            f.write(f"{ticks / os.sysconf('SC_CLK_TCK'):8.1f} {0:8.1f} the session's Prefect server\n")
    if _server is not None and _server.poll() is None:
        os.killpg(_server.pid, 15)
        try:
            _server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(_server.pid, 9)
    shutil.rmtree(TEST_HOME, ignore_errors=True)


if os.environ.get("C2M_CPU_LOG"):  # C2M_CPU_LOG=FILE: each test's CPU seconds (with its waited children), wall seconds
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        import resource

        def cpu() -> float:
            return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                          resource.getrusage(resource.RUSAGE_CHILDREN)))
        t, c = time.time(), cpu()
        yield
        with open(os.environ["C2M_CPU_LOG"], "a") as f:
            f.write(f"{cpu() - c:8.1f} {time.time() - t:8.1f} {t:.0f} {WORKER} {item.nodeid}\n")
