"""`crawl2model plan` for a real crawl, offline: a mirror laid out from the real listing of
CC-MAIN-2025-47 (100,000 WARC paths), one real WARC served under the path it samples, and the
reference demo run's manifests as the measured costs."""

from __future__ import annotations

import gzip
import json
import shutil

from tasks.download import select_spread
from tasks.lake import Lake
from tasks.plan import CURATION, model_params
from tasks.warc import verify_warc
from tests.conftest import run_cli

CRAWL = "CC-MAIN-2025-47"


def real_listing_mirror(shared_data, folder) -> tuple:
    """A mirror of the real listing, with a real WARC (an excerpt of CC-MAIN-2020-34) under the path
    that `plan` samples: (mirror, its paths, the sampled path, that WARC)."""
    mirror = folder / "mirror"
    listing = mirror / "crawl-data" / CRAWL / "warc.paths.gz"
    listing.parent.mkdir(parents=True)
    shutil.copyfile(shared_data / "cc-listings" / CRAWL / "warc.paths.gz", listing)
    paths = [p for p in gzip.decompress(listing.read_bytes()).decode().split() if p]
    sampled = select_spread(paths, 1, seed=0)[0]
    warc = shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz"
    (mirror / sampled).parent.mkdir(parents=True)
    shutil.copyfile(warc, mirror / sampled)
    return mirror, paths, sampled, warc


def test_plan_scales_the_measured_runs_to_a_whole_real_crawl(shared_data, demo_local_run, tmp_path):
    mirror, paths, sampled, warc = real_listing_mirror(shared_data, tmp_path)
    lake = Lake(demo_local_run[0])

    r = run_cli("--lake", lake.url, "plan", "--crawl", CRAWL, "--base-url", f"file://{mirror}/", "--json",
                "--usd-per-cpu-hour", "0.05", "--gpus", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout)
    stats = verify_warc(lambda: open(warc, "rb"), warc.name)
    assert (p["files"], p["files_in_crawl"], len(paths)) == (100_000, 100_000, 100_000)
    assert p["sample"] == {"path": sampled, "bytes": stats.bytes, "records": stats.records,
                           "responses": stats.by_type["response"]}
    runs = {k: lake.resolve(k) for k in CURATION}  # the newest measured version of each
    assert p["measured"] == {k: m.ref for k, m in runs.items()}
    d, f, dd, sh = (runs[k].metrics for k in CURATION)
    pages, d_pages = 100_000 * stats.by_type["response"], d["records_by_type"]["response"]
    docs = pages * f["documents"] / d_pages
    tokens = docs * dd["documents"] / dd["input_documents"] * (sh["train_tokens"] + sh["val_tokens"]) / \
        (sh["train_documents"] + sh["val_documents"])
    want = {"download": d["cpu_seconds"] / d["bytes"] * 100_000 * stats.bytes,
            "filter": f["cpu_seconds"] / d_pages * pages,
            "dedup": dd["cpu_seconds"] / dd["input_documents"] * docs,
            "shard": sh["cpu_seconds"] / (sh["train_tokens"] + sh["val_tokens"]) * tokens}
    for row in p["stages"]:
        assert abs(row["cpu_hours"] - want[row["stage"]] / 3600) <= 1e-9 * max(1.0, row["cpu_hours"]), row
        assert row["usd"] == row["cpu_hours"] * 0.05 and row["wall_hours"] == row["cpu_hours"] / 64
    assert all(m.metrics["cpu_seconds"] > 0 for m in runs.values())
    t = p["train"]
    assert t["params"] == model_params("gpt2-small", sh["vocab_size"]) and abs(t["tokens"] - tokens) < 1e-6 * tokens
    assert abs(t["gpu_hours"] - 6 * t["params"] * tokens / (989e12 * 0.4) / 3600) < 1e-9 * t["gpu_hours"]

    # the table, for people; and a lake without measured runs says how to get one
    r = run_cli("--lake", lake.url, "plan", "--crawl", CRAWL, "--base-url", f"file://{mirror}/")
    assert r.returncode == 0 and "100,000 of 100,000 WARC files" in r.stdout and sampled in r.stdout, r.stderr
    r = run_cli("--lake", str(tmp_path / "empty"), "plan", "--crawl", CRAWL, "--base-url", f"file://{mirror}/")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: no measured run of download, "
                                                                               "filter, dedup, shard"), r.stderr
    assert "make demo" in r.stderr


def test_plan_as_a_flow_shows_its_table_as_a_markdown_artifact(shared_data, demo_local_run, tmp_path):
    """The `plan` deployment's flow: the same plan as the command, and a markdown artifact with
    the table, the storage notes and what is assumed."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.plan import plan as plan_flow
    from tasks.plan import PlanParams

    mirror, _, sampled, warc = real_listing_mirror(shared_data, tmp_path)
    # an excerpt is no whole file: say how big a file is, and the records scale in the sample's proportion
    state = plan_flow(PlanParams(crawl=CRAWL, base_url=f"file://{mirror}/", segments=1000, bytes_per_file=10**9),
                      lake_url=demo_local_run[0], return_state=True)
    p = state.result()
    assert p["files"] == 1000 and p["files_in_crawl"] == 100_000 and [r["stage"] for r in p["stages"]] == CURATION
    stats = verify_warc(lambda: open(warc, "rb"), warc.name)
    assert p["stages"][0]["bytes_out"] == 1000 * 10**9
    assert p["assumed"][:2] == ["bytes per file: 1,000,000,000 as given",
                                "pages (responses) per file: in the sampled file's proportion to its bytes"]
    d = Lake(demo_local_run[0]).resolve("download").metrics
    want = d["cpu_seconds"] / d["bytes"] * 1000 * 10**9 / 3600
    assert abs(p["stages"][0]["cpu_hours"] - want) <= 1e-9 * want
    f = Lake(demo_local_run[0]).resolve("filter").metrics
    d_pages = d["records_by_type"]["response"]
    want = f["cpu_seconds"] / d_pages * 1000 * stats.by_type["response"] * 10**9 / stats.bytes / 3600
    assert abs(p["stages"][1]["cpu_hours"] - want) <= 1e-9 * want
    # ... and how many records it holds
    from tasks.plan import plan

    given = plan(Lake(demo_local_run[0]), PlanParams(crawl=CRAWL, base_url=f"file://{mirror}/", segments=1000,
                                                     bytes_per_file=10**9, pages_per_file=27_500))
    want = f["cpu_seconds"] / d_pages * 1000 * 27_500 / 3600
    assert abs(given["stages"][1]["cpu_hours"] - want) <= 1e-9 * want
    assert given["assumed"][1] == "pages (responses) per file: 27,500 as given"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["crawl-plan"]), flow_run_id=ArtifactFilterFlowRunId(any_=[
                state.state_details.flow_run_id])))
    [page] = [a.data for a in found]
    assert page.startswith(f"# Plan for {CRAWL}") and f"sampled `{sampled}`" in page
    for row in p["stages"]:
        assert f"| {row['stage']} | {row['cpu_hours']:,.1f} |" in page
    assert "## Storage" in page and "--format wet" in page and "## Assumed" in page


def test_the_cost_of_a_stage_is_fitted_as_a_fixed_part_and_a_part_per_unit(tmp_path):
    """Runs of one configuration at different sizes give a line (a small run is mostly start-up);
    another configuration is not mixed in; one run alone scales in proportion."""
    from tasks.plan import cost_model

    lake = Lake(str(tmp_path / "lake"))

    def run(params: dict, nbytes: int, cpu: float):
        with lake.produce("download", params, [], "download/1") as p:
            p.metrics.update(bytes=nbytes, cpu_seconds=cpu)
            p.write_bytes("x.warc.gz", b"x")
        return lake.resolve("download")

    warc = {"format": "warc", "max_records": None}
    wet = run({**warc, "format": "wet", "segments": 9}, 100, 50.0)
    for segments, nbytes in ((1, 1000), (2, 3000), (4, 9000)):
        newest = run({**warc, "segments": segments}, nbytes, 2.0 + 0.001 * nbytes)
    fixed, per_unit, runs = cost_model(lake, newest)
    assert runs == 3 and abs(fixed - 2.0) < 1e-9 and abs(per_unit - 0.001) < 1e-12
    assert cost_model(lake, wet) == (0.0, 0.5, 1)
