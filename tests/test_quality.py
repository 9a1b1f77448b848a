"""Stage `quality-model` (tasks/quality.py) and the filter's classifier step: a fastText classifier
trained offline on the shared data's reference text against the crawl's own text, evaluated on
the rubric-labelled set (tests/data/quality), used by `filter --quality-model` deterministically."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tasks.download import DownloadParams, download
from tasks.filter import FilterParams, filter_documents
from tasks.lake import Lake
from tasks.quality import (QualityModelError, QualityModelParams, load_model, read_labelled, score,
                           train_quality_model)
from tasks.stage import document_files, local_file
from tasks.tokenizer import iter_documents
from tests.conftest import copy_version, run_cli
from tests.quality_data import training_inputs

QUICK = {"bucket": 20_000}  # a smaller model file; the other settings are the defaults


@pytest.fixture(scope="module")
def trained(curated_corpus, shared_data, tmp_path_factory):
    """A quality model of the curated corpus's filter version against the reference text, evaluated
    on the labelled set (its lake is the curated corpus's: other kinds may be added there)."""
    work = tmp_path_factory.mktemp("quality")
    lake = Lake(curated_corpus["lake"])
    positives, more, labelled = training_inputs(lake, shared_data, work)
    params = QualityModelParams(negatives=curated_corpus["filter"], positives=positives, more_negatives=[more],
                                labelled=str(labelled), **QUICK)
    lines: list[str] = []
    m = train_quality_model(lake, params, log=lines.append)
    return {"lake": lake, "m": m, "params": params, "labelled": labelled, "positives": positives, "more": more,
            "log": lines, "work": work}


def test_the_model_is_trained_evaluated_and_its_bytes_repeat(trained, curated_corpus, tmp_path):
    m, lake = trained["m"], trained["lake"]
    assert m.inputs == [curated_corpus["filter"], *trained["positives"], trained["more"]]
    ex = m.metrics["examples"]  # balanced: as many crawl documents as reference ones
    assert ex["positives"] == ex["negatives"] > 200 and ex["train"] + ex["heldout"] == 2 * ex["negatives"]
    assert m.metrics["heldout"]["accuracy"] >= 0.7
    # it ranks the rubric's good documents above its bad ones far better than chance
    assert m.metrics["labelled_auc"]["all"] >= 0.85
    q = m.metrics["crawl_score_quantiles"]
    assert len(q) == 101 and q == sorted(q) and 0 <= q[0] <= q[100] <= 1
    # rebuilt in another lake from the same inputs: the same version, the same bytes
    again = Lake(str(tmp_path / "again"))
    for ref in m.inputs:
        copy_version(lake, again, ref)
    m2 = train_quality_model(again, trained["params"].model_copy(update={"rebuild": True}), log=lambda s: None)
    timing = ("seconds", "cpu_seconds")
    assert m2.ref == m.ref and m2.files == m.files
    assert {k: v for k, v in m2.metrics.items() if k not in timing} == {k: v for k, v in m.metrics.items() if k not in timing}


def test_the_labelled_evaluation_counts_what_each_way_keeps(trained):
    m = trained["m"]
    rows = {r["kept by"]: r for r in m.metrics["labelled"]}
    threshold = trained["params"].threshold
    at, same = f"classifier alone (score >= {threshold})", "classifier alone (its top, as many as the heuristics keep)"
    assert set(rows) == {"heuristics alone", at, same, "heuristics and classifier"}
    scored = [json.loads(line) for line in trained["lake"].open(m, "labelled.jsonl").read().decode().splitlines()]
    labels = {d["id"]: d["label"] for d in read_labelled(str(trained["labelled"]))}
    assert [s["id"] for s in scored] == list(labels) and len(labels) == 300
    good = sum(v == "good" for v in labels.values())
    budget = sum(s["heuristics"] for s in scored)
    top = {s["id"] for s in sorted(scored, key=lambda s: -s["score"])[:budget]}
    for name, keep in (("heuristics alone", lambda s: s["heuristics"]),
                       (at, lambda s: s["score"] >= threshold), (same, lambda s: s["id"] in top),
                       ("heuristics and classifier", lambda s: s["heuristics"] and s["score"] >= threshold)):
        kept = [s for s in scored if keep(s)]
        right = sum(labels[s["id"]] == "good" for s in kept)
        assert (rows[name]["kept"], rows[name]["good kept"], rows[name]["good"]) == (len(kept), right, good)
        assert rows[name]["precision"] == round(right / len(kept), 4) and rows[name]["recall"] == round(right / good, 4)
    assert rows["heuristics and classifier"]["kept"] <= min(rows["heuristics alone"]["kept"], rows[at]["kept"])
    assert rows[same]["kept"] == rows["heuristics alone"]["kept"]
    assert any("precision" in line for line in trained["log"])


def test_the_filter_scores_with_the_model_and_its_bytes_repeat(trained, shared_data, tmp_path):
    """filter --quality-model on a small download: every kept document has its score, at least the
    threshold; the removed ones are sampled with their reason; a rebuild gives the same bytes."""
    lake = Lake(str(tmp_path / "lake"))
    qm = copy_version(trained["lake"], lake, trained["m"].ref)
    dl = download(lake, DownloadParams(files=[str(shared_data / "warc" / "wget-sample-0000.warc.gz")]))
    plain = filter_documents(lake, FilterParams(input=dl.ref, tasks=1, workers=1), log=lambda s: None)
    model = load_model(local_file(lake, lake.resolve(qm), "model.bin"))
    scores = {r["id"]: round(score(model, r["text"]), 4) for r in documents(lake, plain)}
    threshold = sorted(scores.values())[len(scores) // 2]  # the median: some kept, some removed
    params = FilterParams(input=dl.ref, tasks=1, workers=1, quality_model=[qm], quality_threshold=threshold)
    m = filter_documents(lake, params, log=lambda s: None)
    assert m.inputs == [dl.ref, qm] and m.ref != plain.ref
    assert [r["step"] for r in m.metrics["funnel"]][-1] == "quality"
    assert m.metrics["funnel"][-1]["docs_in"] == plain.metrics["documents"]
    rows = documents(lake, m)
    assert {r["id"]: r["quality_score"] for r in rows} == {i: s for i, s in scores.items() if s >= threshold}
    assert 0 < m.metrics["funnel"][-1]["removed"] < len(scores)
    again = filter_documents(lake, params.model_copy(update={"rebuild": True}), log=lambda s: None)
    assert again.ref == m.ref and again.files == m.files
    # keep the top half: the threshold is the crawl sample's median score
    top = filter_documents(lake, params.model_copy(update={"quality_keep_top": 0.5}), log=lambda s: None)
    median = trained["m"].metrics["crawl_score_quantiles"][50]
    assert {r["id"] for r in documents(lake, top)} == {i for i, s in scores.items() if s >= median}
    # a model trained on a classifier-filtered version would learn from its own choices: refused
    with pytest.raises(QualityModelError, match="filtered with a quality model"):
        train_quality_model(lake, trained["params"].model_copy(update={"negatives": m.ref, "labelled": ""}),
                            log=lambda s: None)


def documents(lake: Lake, m) -> list[dict]:
    return [r for f in document_files(m) for r in pq.read_table(lake.open(m, f)).to_pylist()]


def test_bad_input_is_one_line_and_labelled_documents_never_train(trained, tmp_path):
    lake, params = trained["lake"], trained["params"]
    leaky = tmp_path / "leaky.jsonl"  # a labelled "document" that is one of the training documents
    doc = next(iter_documents(lake, lake.resolve(params.negatives)))
    leaky.write_text(json.dumps({"text": doc["text"], "label": "bad"}) + "\n")
    with pytest.raises(QualityModelError, match="are among the training examples"):
        train_quality_model(lake, params.model_copy(update={"labelled": str(leaky), "max_examples": 100_000}),
                            log=lambda s: None)
    r = run_cli("--lake", lake.url, "stage", "quality-model", "--labelled", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "none.jsonl: no such file" in r.stderr, r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "maybe"}\n')
    r = run_cli("--lake", lake.url, "stage", "quality-model", "--positives", *trained["positives"][:1],
                "--labelled", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{bad}:1: expected an object with a text and a label good or bad" in r.stderr and "Flow run" not in r.stderr


def test_the_evaluation_is_a_table_in_the_prefect_ui(trained, prefect_server):
    """`stage quality-model` through its flow on the session's Prefect server: the labelled
    evaluation is the run's table artifact `quality-evaluation`, the manifest's rows."""
    import subprocess

    from tests.conftest import BIN

    p = trained["params"]
    r = subprocess.run([str(BIN / "crawl2model"), "--lake", trained["lake"].url, "stage", "quality-model",
                        "--negatives", p.negatives, "--positives", *p.positives, "--more-negatives", *p.more_negatives,
                        "--labelled", p.labelled, "--bucket", str(p.bucket), "--threshold", "0.6"],
                       capture_output=True, text=True, env=prefect_server["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "heuristics and classifier" in r.stdout  # the terminal's table
    m = max(trained["lake"].versions("quality-model"), key=lambda v: v.created_at)
    assert m.params["threshold"] == 0.6 and m.flow_run_id
    found = subprocess.run(["curl", "-sf", "-X", "POST", f"{prefect_server['url']}/api/artifacts/filter",
                            "-H", "Content-Type: application/json",
                            "-d", json.dumps({"artifacts": {"key": {"any_": ["quality-evaluation"]}}})],
                           capture_output=True, text=True, timeout=30)
    tables = [a for a in json.loads(found.stdout) if a["flow_run_id"] == m.flow_run_id]
    assert len(tables) == 1 and tables[0]["type"] == "table", found.stdout
    data = tables[0]["data"]
    assert (json.loads(data) if isinstance(data, str) else data) == m.metrics["labelled"]
