"""Stage `download` against a loopback Common Crawl (real WARCs from ../shared/data/warc in
Common Crawl's layout) with injected faults, and against the demo mirror."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.download import DownloadParams, download, select_spread
from tasks.lake import Lake
from tasks.warc import verify_warc
from tests.ccserver import CCServer, make_cc_layout
from tests.conftest import BIN, ROOT, make_bucket, run_cli, run_cli_all, temp_server_env


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cc_root(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cc")
    make_cc_layout(root, sorted((shared_data / "warc").iterdir()))
    return root


@pytest.fixture(scope="module")
def originals(shared_data) -> dict[str, str]:
    return {p.name: sha256(p) for p in (shared_data / "warc").iterdir()}


def test_crawl_download_survives_faults_and_matches_originals(cc_root, originals, tmp_path,
                                                              prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    from flows.stages import download as download_flow

    big, cc, wget = "ia-2008-heritrix.warc.gz", "cc-main-2020-34-excerpt.warc.gz", "wget-sample-0000.warc.gz"
    faults = {big: ["503", "drop", "ok"], cc: ["429", "drop", "drop"], wget: ["slow"],
              "warc.paths.gz": ["503"]}
    with CCServer(cc_root, faults) as srv:
        params = DownloadParams(crawl="latest", base_url=srv.url, segments=len(originals),
                                concurrency=3)
        ref = download_flow(params, lake_url=str(tmp_path / "lake"))
    lake = Lake(str(tmp_path / "lake"))
    m = lake.resolve(ref)
    assert m.params["crawl"] == "CC-MAIN-TEST"  # 'latest' resolved through collinfo.json
    assert {f["path"]: f["sha256"] for f in m.files} == originals
    assert lake.verify(m) == []
    # every fault was met and overcome: Retry-After honoured, dropped bodies resumed by Range
    got = {(p.rsplit("/", 1)[-1], code) for p, _, code in srv.requests}
    assert {(big, 503), (cc, 429), ("warc.paths.gz", 503)} <= got
    resumed = [r for p, r, code in srv.requests if p.endswith(big) and code == 206]
    assert resumed and int(resumed[0].split("=")[1].rstrip("-")) > 0
    # record counts by type, per file and in total
    per_file = {s["name"]: s for s in m.metrics["sources"]}
    assert per_file[big]["records"] == 822 and per_file[cc]["records_by_type"]["response"] == 16
    assert m.metrics["records"] == sum(s["records"] for s in m.metrics["sources"])
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"])))
        assert any(a.data == 100.0 and ref in (a.description or "") for a in progress)


def test_rerun_is_a_cache_hit_without_network(cc_root, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with CCServer(cc_root) as srv:
        params = DownloadParams(crawl="CC-MAIN-TEST", base_url=srv.url, segments=2, seed=3)
        first = download(lake, params)
        served = len(srv.requests)
    # the server is gone: a rerun must not need it
    again = download(lake, params)
    assert again.version == first.version and again.created_at == first.created_at
    assert served == 3  # warc.paths.gz + two files


def test_max_records_streams_a_valid_prefix(cc_root, shared_data, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    big = shared_data / "warc" / "ia-2008-heritrix.warc.gz"
    with CCServer(cc_root) as srv:
        url = srv.url + [p for p in gzip.open(cc_root / "crawl-data/CC-MAIN-TEST/warc.paths.gz", "rt")
                         .read().split() if p.endswith(big.name)][0]
        m = download(lake, DownloadParams(urls=[url], max_records=7))
    data = lake.fs.cat_file(lake.path("download", m.version, big.name))
    assert big.read_bytes().startswith(data)  # byte-exact prefix: whole gzip members
    out = tmp_path / "cut.warc.gz"
    out.write_bytes(data)
    assert verify_warc(lambda: open(out, "rb"), "cut").records == 7
    assert m.metrics["records"] == 7
    # it stopped reading the 2.5 MB file early
    assert m.metrics["sources"][0]["bytes_fetched"] < big.stat().st_size / 4


def test_selection_is_deterministic_and_spread():
    paths = [f"p{i:04d}" for i in range(1000)]
    a = select_spread(paths, 10, seed=1)
    assert a == select_spread(paths, 10, seed=1) != select_spread(paths, 10, seed=2)
    assert [int(p[1:]) // 100 for p in a] == list(range(10))  # one from each tenth
    assert select_spread(paths[:3], 10, seed=0) == paths[:3]


def test_demo_mirror_and_wet_format(tmp_path):
    r = run_cli("demo-mirror", str(tmp_path / "mirror"), "--files", "3")
    assert r.returncode == 0, r.stderr
    lake = Lake(str(tmp_path / "lake"))
    base = f"file://{tmp_path / 'mirror'}/"
    warc = download(lake, DownloadParams(crawl="latest", base_url=base, segments=2))
    assert warc.params["crawl"] == "CC-MAIN-DEMO" and warc.metrics["files"] == 2
    assert warc.metrics["records_by_type"]["response"] > 40
    wet = download(lake, DownloadParams(crawl="CC-MAIN-DEMO", base_url=base, format="wet", segments=3))
    assert wet.version != warc.version
    assert set(wet.metrics["records_by_type"]) == {"conversion"}
    assert all(f["path"].endswith(".warc.wet.gz") for f in wet.files)
    # the mirror is the same bytes on every build (record ids too): the demo's results are too
    r = run_cli("demo-mirror", str(tmp_path / "again"), "--files", "3")
    assert r.returncode == 0, r.stderr
    built = {p.relative_to(tmp_path / "mirror"): sha256(p) for p in (tmp_path / "mirror").rglob("*") if p.is_file()}
    again = {p.relative_to(tmp_path / "again"): sha256(p) for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert built == again and len(built) >= 9


def test_local_files_and_s3_lake(shared_data, s3_endpoint, originals):
    lake = Lake(f"s3://{make_bucket(s3_endpoint)}/lake")
    files = [str(shared_data / "warc" / n) for n in ("whirlwind.warc.gz", "wget-sample-0001.warc.gz")]
    m = download(lake, DownloadParams(files=files))
    assert {f["path"]: f["sha256"] for f in m.files} == {Path(f).name: originals[Path(f).name] for f in files}
    assert lake.verify(m) == []
    assert m.params["source"] == "files" and "/" not in json.dumps(m.params["files"])  # no local paths


def test_two_s3_lakes_download_the_same_file_at_once(cc_root, originals, s3_endpoint):
    """S3 downloads stage in a local cache folder. Two lakes producing the same version at once
    (each the only producer in its lake) used to share it: the first to finish deleted the
    other's partial file, which then failed."""
    from concurrent.futures import ThreadPoolExecutor

    big = "ia-2008-heritrix.warc.gz"
    first, second = (Lake(f"s3://{make_bucket(s3_endpoint)}/lake") for _ in range(2))
    with CCServer(cc_root, {big: ["slow"]}, slow_delay=0.01) as srv, ThreadPoolExecutor(1) as pool:
        url = srv.url + f"crawl-data/CC-MAIN-TEST/segments/1700000000002.02/warc/{big}"
        slow = pool.submit(download, first, DownloadParams(urls=[url]))  # its transfer trickles
        deadline = time.time() + 120
        while srv.bytes_sent.get(url[len(srv.url) - 1:], 0) < 300_000 and time.time() < deadline:
            time.sleep(0.05)
        fast = download(second, DownloadParams(urls=[url]))  # the whole file, committed meanwhile
        assert not slow.done()
        ms = [slow.result(timeout=300), fast]
    for lake, m in zip((first, second), ms):
        assert [f["sha256"] for f in m.files] == [originals[big]] and lake.verify(m) == []
    assert ms[0].version == ms[1].version


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(os.listdir(Path(__file__).resolve().parents[2] / "shared/data/warc-broken")))
def test_broken_files_are_refused_and_nothing_is_committed(shared_data, tmp_path, name):
    lake = Lake(str(tmp_path / "lake"))
    path = shared_data / "warc-broken" / name
    if name.startswith("IAH-"):
        # cut off between two gzip members: every member and record present is whole, so the
        # file is a valid (shorter) WARC; nothing can tell it from one that was never longer.
        assert download(lake, DownloadParams(files=[str(path)])).metrics["records"] == 23
        return
    from tasks.warc import WarcError

    with pytest.raises(WarcError, match=name):
        download(lake, DownloadParams(files=[str(path)]))
    assert lake.versions("download") == []


def test_bad_sources_fail_clearly(cc_root, shared_data, tmp_path):
    lake_dir = str(tmp_path / "lake")
    (tmp_path / "page.html").write_text("<html><body>not a warc</body></html>")
    with CCServer(tmp_path) as junk, CCServer(cc_root, {"whirlwind.warc.gz": ["500"] * 10}) as flaky:
        cases = [
            (["--crawl", "CC-MAIN-NOPE", "--base-url", flaky.url], 2,  # bad input
             f"unknown crawl 'CC-MAIN-NOPE': {flaky.url}crawl-data/CC-MAIN-NOPE/warc.paths.gz not found"),
            (["--urls", flaky.url + "nope.warc.gz"], 1, f"{flaky.url}nope.warc.gz: HTTP 404 not found"),
            (["--urls", junk.url + "page.html"], 1, f"{junk.url}page.html: not a valid WARC"),
            (["--files", str(shared_data / "warc-broken" / "appended_zip_fragment_unexpected_eof.wet.gz")], 2,
             "appended_zip_fragment_unexpected_eof.wet.gz: truncated: gzip member 17 ends before its trailer"),
            (["--urls", flaky.url + "crawl-data/CC-MAIN-TEST/segments/1700000000005.05/warc/whirlwind.warc.gz",
              "--retries", "1"], 1, f"{flaky.url}crawl-data/CC-MAIN-TEST/segments/1700000000005.05/"
             "warc/whirlwind.warc.gz: HTTP 500 (gave up after 2 attempts)"),
        ]
        runs = run_cli_all(*(["--lake", lake_dir, "stage", "download", *args] for args, _, _ in cases))
        for (args, code, message), r in zip(cases, runs):
            assert r.returncode == code, (args, r.stderr[-2000:])
            # the one line, last, and no traceback anywhere (Prefect's log lines come before it)
            last = r.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and message in last, (args, r.stderr[-2000:])
            assert "Traceback" not in r.stderr, (args, r.stderr[-3000:])
    assert not os.path.exists(lake_dir) or Lake(lake_dir).versions("download") == []


@pytest.mark.parametrize("args, message", [
    (["--segments", "0"], "invalid segments: Input should be greater than or equal to 1"),
    (["--crawl", "../etc"], "invalid crawl: invalid crawl id '../etc'"),
    (["--files", "/nonexistent.warc.gz"], "invalid files: /nonexistent.warc.gz: no such file"),
    (["--urls", "ftp://x/y.warc.gz"], "invalid urls: invalid URL 'ftp://x/y.warc.gz'"),
    (["--base-url", "gopher://x/"], "invalid base-url: invalid base_url 'gopher://x/'"),
    (["--crawl", "X", "--urls", "http://a/b"], "give one source: crawl, urls or files (got crawl, urls)"),
    (["--max-records", "0"], "invalid max-records"),
])
def test_invalid_parameters_are_refused_before_work(tmp_path, args, message):
    r = run_cli("--lake", str(tmp_path / "lake"), "stage", "download", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lake").exists()


# --------------------------------------------------------------------------- offline, killed


def _netns_available() -> bool:
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="unshare -n needs user namespaces or root")
def test_full_download_under_unshare_loopback_only(cc_root, originals, tmp_path):
    port = 18000 + os.getpid() % 1000
    lake = tmp_path / "lake"
    script = (f"ip link set lo up; {sys.executable} {ROOT}/tests/ccserver.py {cc_root} {port} & "
              f"for i in $(seq 50); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.1; done; "
              f"{BIN}/crawl2model --lake {lake} stage download --crawl CC-MAIN-TEST "
              f"--base-url http://127.0.0.1:{port}/ --segments {len(originals)}; rc=$?; kill %1; exit $rc")
    r = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True,
                       timeout=300, env={**temp_server_env(), "PREFECT_HOME": str(tmp_path / "ph")})  # no session server here
    assert r.returncode == 0, r.stderr[-3000:]
    m = Lake(str(lake)).resolve("download")
    assert {f["path"]: f["sha256"] for f in m.files} == originals


def test_killed_download_resumes_from_its_partial_file(cc_root, shared_data, tmp_path):
    big = "ia-2008-heritrix.warc.gz"
    lake_dir = tmp_path / "lake"
    with CCServer(cc_root, {big: ["slow"]}, slow_delay=0.01) as srv:
        url = srv.url + f"crawl-data/CC-MAIN-TEST/segments/1700000000002.02/warc/{big}"
        proc = subprocess.Popen([str(BIN / "crawl2model"), "--lake", str(lake_dir), "stage",
                                 "download", "--urls", url], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PREFECT_HOME": str(tmp_path / "ph")})
        deadline = time.time() + 120
        while srv.bytes_sent.get(url[len(srv.url) - 1:], 0) < 300_000 and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its ephemeral Prefect server
        proc.wait()
        lake = Lake(str(lake_dir))
        assert lake.versions("download") == []
        m = download(lake, DownloadParams(urls=[url]))
        resumed = [r for p, r, code in srv.requests if code == 206]
    assert resumed and int(resumed[0].split("=")[1].rstrip("-")) >= 300_000 // 2
    assert m.files[0]["sha256"] == sha256(shared_data / "warc" / big)


def test_a_wrong_content_length_is_resumed_or_a_clear_error(cc_root, originals, tmp_path):
    """A server that claims more than it sends is resumed (right sha256); one that silently sends
    and claims 1000 bytes too few gives a file that fails verification: a clear error naming it."""
    wget = "wget-sample-0000.warc.gz"
    url = next(f"crawl-data/CC-MAIN-TEST/{p.relative_to(cc_root / 'crawl-data' / 'CC-MAIN-TEST')}"
               for p in (cc_root / "crawl-data").rglob(wget))
    lake = Lake(str(tmp_path / "lake"))
    with CCServer(cc_root, {wget: ["longlen", "ok"]}) as srv:
        m = download(lake, DownloadParams(urls=[srv.url + url]))
    assert {f["sha256"] for f in m.files} == {originals[wget]}
    assert [code for p, _, code in srv.requests if p.endswith(wget)] == [200, 206]  # resumed by Range
    with CCServer(cc_root, {wget: ["shortlen"] * 10}) as srv:
        r = run_cli("--lake", str(tmp_path / "other"), "stage", "download", "--urls", srv.url + url)
    assert r.returncode == 1 and f"error: {srv.url + url}:" in r.stderr, r.stderr[-2000:]
    assert "truncated" in r.stderr.split("error:")[-1], r.stderr[-2000:]
    assert not (tmp_path / "other").exists() or Lake(str(tmp_path / "other")).versions("download") == []


def test_checks_in_worker_processes_equal_the_in_process_check(shared_data):
    """tasks.warc.CheckerProcesses (what a download checks with): the same stats, or the same
    error, as WarcChecker for every real and damaged WARC of the shared data, reported while
    feeding when the in-process check would be; an abandoned check leaves its worker usable."""
    from tasks.warc import CheckerProcesses, WarcChecker, WarcError

    def outcome(checker, data: bytes):
        try:
            for i in range(0, len(data), 1 << 16):
                checker.feed(data[i:i + (1 << 16)])
            return checker.finish()
        except WarcError as e:
            return f"error: {e}"
        finally:
            checker.close()

    files = sorted(p for d in ("warc", "warc-broken") for p in (shared_data / d).iterdir() if p.is_file())
    assert len(files) >= 10
    from common import process

    errors, reported = 0, process._worker_cpu[0]  # the workers' CPU, for the stage's cpu_seconds
    with CheckerProcesses(2) as checkers:
        abandoned = checkers.checker("abandoned")
        abandoned.feed(b"\x1f\x8b garbage that fails at once" * 100)
        abandoned.close()  # its error reply is drained, not read by the next file
        for path in files:
            data = path.read_bytes()
            want = outcome(WarcChecker(path.name), data)
            assert outcome(checkers.checker(path.name), data) == want, path.name
            errors += isinstance(want, str)
    assert 0 < errors < len(files) and process._worker_cpu[0] > reported
