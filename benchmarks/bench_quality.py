"""Quality beyond heuristics (issue 18), side by side in one run:

1. Language id: fastText `lid.176` (the filter's LanguageId, tasks/lid.py) vs py3langid (what
   the filter used before), on the 16 x 1,000 sentences of ../shared/data/langid: accuracy per
   language and sentences per CPU-second (median of 3 passes each, alternating).
2. The quality classifier: stage `quality-model` trained on the shared data's reference text
   (WikiText-2, three public-domain books, the OpenStax textbook, the extraction benchmark's gold
   article bodies) against the crawl's own text (a filter version of every WARC of
   ../shared/data/warc and the unlabelled CC-MAIN-2019-30 documents), evaluated on the 300
   rubric-labelled CC-MAIN-2019-30 documents (tests/data/quality): precision of what is kept and
   recall of the good documents for FineWeb's heuristics alone (the peer), the classifier alone
   and both.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import record

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CMD = "python -m benchmarks.bench_quality"


def language_id() -> None:
    import py3langid

    from tasks.lid import top_language

    data = {p.stem: [line.strip() for line in p.read_text().splitlines() if line.strip()]
            for p in sorted((SHARED / "langid").glob("*.txt"))}
    sentences = [(lang, s) for lang, lines in data.items() for s in lines]
    ours = lambda s: top_language(s)[0]  # noqa: E731
    theirs = lambda s: py3langid.classify(s)[0]  # noqa: E731
    ours("warm up"), theirs("warm up")
    cpu = {"lid.176": [], "py3langid": []}
    right = {}
    for _ in range(3):
        for name, fn in (("lid.176", ours), ("py3langid", theirs)):
            t = time.process_time()
            got = [fn(s) for _, s in sentences]
            cpu[name].append(time.process_time() - t)
            right[name] = [g == lang for (lang, _), g in zip(sentences, got)]
    rate = {n: len(sentences) / statistics.median(c) for n, c in cpu.items()}
    acc = {n: sum(r) / len(r) for n, r in right.items()}
    per_lang = {n: {lang: sum(r for (l2, _), r in zip(sentences, right[n]) if l2 == lang) / len(lines)
                    for lang, lines in data.items()} for n in right}
    for n in right:
        worst = sorted(per_lang[n].items(), key=lambda x: x[1])[:3]
        print(f"  {n}: {acc[n]:.2%} right, {rate[n]:,.0f} sentences/CPU-s; worst: "
              + ", ".join(f"{lang} {a:.1%}" for lang, a in worst))
    what = f"language id on {len(sentences):,} sentences of {len(data)} languages (../shared/data/langid)"
    record(f"{what}: accuracy", f"fastText lid.176 {acc['lid.176']:.2%} (lowest: "
           f"{min(per_lang['lid.176'].items(), key=lambda x: x[1])[0]} {min(per_lang['lid.176'].values()):.1%})",
           f"py3langid {acc['py3langid']:.2%} (lowest: {min(per_lang['py3langid'].items(), key=lambda x: x[1])[0]} "
           f"{min(per_lang['py3langid'].values()):.1%})", acc["lid.176"] / acc["py3langid"], CMD)
    record(f"{what}: sentences per CPU-second (median of 3)", f"fastText lid.176 {rate['lid.176']:,.0f}",
           f"py3langid {rate['py3langid']:,.0f}", rate["lid.176"] / rate["py3langid"], CMD)


def classifier() -> None:
    sys.path.insert(0, str(ROOT))
    from tasks.download import DownloadParams, download
    from tasks.filter import FilterParams, filter_documents
    from tasks.lake import Lake
    from tasks.quality import QualityModelParams, evaluation_markdown, train_quality_model
    from tests.quality_data import training_inputs

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lake = Lake(str(work / "lake"))
        dl = download(lake, DownloadParams(files=sorted(str(p) for p in (SHARED / "warc").iterdir())))
        crawl = filter_documents(lake, FilterParams(input=dl.ref, tasks=1, workers=1), log=lambda s: None)
        positives, more, labelled = training_inputs(lake, SHARED, work)
        t = time.process_time()
        m = train_quality_model(lake, QualityModelParams(negatives=crawl.ref, positives=positives, more_negatives=[more],
                                                         labelled=str(labelled)), log=lambda s: None)
        cpu = time.process_time() - t
    rows = {r["kept by"].split(" (")[0] + (" top" if "its top" in r["kept by"] else ""): r for r in m.metrics["labelled"]}
    print(evaluation_markdown(m.metrics["labelled"]))
    ex, auc = m.metrics["examples"], m.metrics["labelled_auc"]
    print(f"  {ex['positives']} + {ex['negatives']} examples, held-out accuracy {m.metrics['heldout']['accuracy']:.1%}, "
          f"labelled ROC AUC {auc['all']} (among heuristics-kept {auc['heuristics_kept']}), {cpu:.1f} CPU-s")
    peer = rows["heuristics alone"]

    def fmt(r: dict) -> str:
        return f"P {r['precision']:.3f} R {r['recall']:.3f} F1 {r['f1']:.3f} ({r['kept']} kept)"

    what = f"quality filter on {peer['good']} good / 300 rubric-labelled CC-MAIN-2019 documents"
    for name, how in (("classifier alone", f"score >= {QualityModelParams().threshold}"),
                      ("classifier alone top", "its top documents, as many as the heuristics keep"),
                      ("heuristics and classifier", f"score >= {QualityModelParams().threshold}")):
        record(f"{what}: {name.removesuffix(' top')} (fastText, {how}; ROC AUC {auc['all']})",
               fmt(rows[name]), f"FineWeb heuristics alone {fmt(peer)}",
               rows[name]["precision"] / peer["precision"], CMD)


def run() -> None:
    language_id()
    classifier()


if __name__ == "__main__":
    run()
