"""Stage `quality-model`: a fastText classifier of text that reads like reference text, trained
as DCLM trained theirs: positives are reference text (Wikipedia, books, textbooks, clean article
bodies: `ingest` versions), negatives a sample of the crawl's own extracted text (a `filter`
version built without the classifier, so the lineage has no cycle). `filter --quality-model`
then scores every document with it (tasks/steps.py: QualityClassifier).

Both sides go through one normaliser (`features`): lower case, words and punctuation as
separate tokens, WikiText's ` @-@ ` joins undone and heading rules dropped, so that the
classifier learns what the text says and how, not which file it came from. Training is
deterministic (one thread, a fixed seed, the examples in a seeded order): the version's bytes
repeat. The version holds `model.bin`, its evaluation on held-out examples of both sides, and the
crawl sample's score quantiles (what `--quality-keep-top` turns into a threshold). Given
`--labelled FILE` (JSON lines of text, url and a good/bad label), it also reports the precision
of what is kept and the recall of the good documents for the filter's heuristics alone, the
classifier alone and both, as a table in the terminal and the Prefect UI.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pydantic import Field, field_validator

from tasks.errors import StageError
from tasks.ingest import sha256_file
from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage

CODE_VERSION = "quality-model/1"
GOOD, BAD = "__label__hq", "__label__cc"
MAX_CHARS = 20_000  # a document's first characters are what is scored (FineWeb-Edu scores its start too)

_WIKITEXT_JOINS = re.compile(r" @([-,.])@ ")
_HEADING_RULE = re.compile(r"^\s*=+\s*|\s*=+\s*$", re.M)
_TOKENS = re.compile(r"\w+|[^\w\s]")


class QualityModelError(StageError):
    """Too little to train on, or a labelled document among the training examples."""


class QualityModelParams(StageParams):
    """What to train on (the reference text and the crawl sample), the classifier's settings, and
    an optional labelled set to evaluate the filter with."""

    negatives: str = input_ref("filter", description="the crawl's extracted text, a filter version built without "
                                                     "a quality model (negatives); default: filter@latest")
    positives: list[str] = input_ref("ingest", many=True, description="ingest versions of reference text "
                                     "(Wikipedia, books, textbooks, clean article bodies): the positives")
    more_negatives: list[str] = input_ref("ingest", many=True, description="ingest versions of more crawl text "
                                          "(extracted text, such as WET files' or another crawl's documents)")
    max_examples: int = Field(20_000, ge=10, le=10_000_000, description="examples of each side at most (a seeded "
                              "sample; the larger side is cut to the smaller's size, so the classes are balanced)")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="examples of each side kept out of training, to "
                                    "evaluate on")
    epochs: int = Field(10, ge=1, le=1000)
    lr: float = Field(0.1, gt=0, le=10)
    dim: int = Field(32, ge=2, le=1000, description="embedding dimensions")
    word_ngrams: int = Field(2, ge=1, le=5)
    min_count: int = Field(2, ge=1)
    bucket: int = Field(200_000, ge=1000, le=10_000_000, description="hashed n-gram buckets (model size: bucket x dim)")
    threshold: float = Field(0.5, ge=0, le=1, description="the score its evaluation keeps a document at")
    labelled: str = Field("", description="a JSON lines file of documents labelled good/bad ({text, label, url}): "
                          "precision and recall of the heuristics, the classifier and both; never training data")
    seed: int = Field(0, ge=0)

    @field_validator("labelled")
    @classmethod
    def _readable(cls, path: str) -> str:
        if path and not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
        if path:
            try:
                read_labelled(path)  # before any work: a bad line is found now, not after the training
            except QualityModelError as e:
                raise ValueError(str(e)) from None
        return path

    def recipe(self) -> dict:
        recipe = self.model_dump(mode="json", exclude={"negatives", "positives", "labelled", "rebuild"})
        if self.labelled:  # the file by content: the same labels give the same version wherever they lie
            recipe["labelled"] = [Path(self.labelled).name, sha256_file(self.labelled)]
        return recipe


def features(text: str) -> str:
    """The classifier's view of a text, one line: tokens of the first MAX_CHARS characters."""
    text = _HEADING_RULE.sub(" ", _WIKITEXT_JOINS.sub(r"\1", text[:MAX_CHARS]))
    return " ".join(_TOKENS.findall(text.lower()))


@functools.cache
def load_model(path: str):
    """A quality model, one per process (the filter's workers load it on their first document)."""
    from fasttext.FastText import _FastText  # not fasttext.load_model: it prints a warning

    return _FastText(path)


def score(model, text: str) -> float:
    """The probability that `text` reads like the reference text."""
    labels, probs = model.predict(features(text) or ".", k=2)
    return min(1.0, float(dict(zip(labels, probs)).get(GOOD, 0.0)))


def _sample(docs: Iterable[dict], n: int, seed: int, salt: str) -> list[dict]:
    """The `n` documents of smallest seeded hash (same sample wherever the documents lie), in that
    order; a heap of `n` (heapq.nsmallest): memory does not grow with the corpus."""
    return heapq.nsmallest(n, (d for d in docs if d["text"].strip()),
                           key=lambda d: hashlib.sha256(f"{seed}:{salt}:{d['id']}".encode()).hexdigest())


def _fingerprint(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def read_labelled(path: str) -> list[dict]:
    """A labelled set: one JSON object a line with `text` and `label` (good or bad), `id` and `url` optional."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QualityModelError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or row.get("label") not in ("good", "bad") or not isinstance(row.get("text"), str):
                raise QualityModelError(f"{path}:{n}: expected an object with a text and a label good or bad")
            rows.append({"id": str(row.get("id", n)), "url": row.get("url") or "", "text": row["text"],
                         "label": row["label"]})
    if not rows:
        raise QualityModelError(f"{path}: no labelled documents")
    return rows


def train_quality_model(lake: Lake, params: QualityModelParams, log: Callable[[str], None] = print) -> Manifest:
    from tasks.tokenizer import iter_documents, iter_extra_texts

    inputs = resolve_inputs(lake, params)
    negatives_m, positives_m, more_m = inputs["negatives"], inputs["positives"], inputs["more_negatives"]
    if negatives_m.params.get("quality_model") or any(i.startswith("quality-model@") for i in negatives_m.inputs):
        raise QualityModelError(f"negatives {negatives_m.ref} were filtered with a quality model: give a filter "
                                "version built without one (the classifier must not learn from its own choices)")
    if not positives_m:
        raise QualityModelError("no positives: give --positives ingest@V (reference text: Wikipedia, books, ...)")
    labelled = read_labelled(params.labelled) if params.labelled else []

    def build(prod: Production) -> None:
        crawl = itertools.chain(iter_documents(lake, negatives_m), (d for m in more_m for d in iter_extra_texts(lake, m)))
        sides = {GOOD: _sample((d for m in positives_m for d in iter_extra_texts(lake, m)), params.max_examples,
                               params.seed, "positives"),
                 BAD: _sample(crawl, params.max_examples, params.seed, "negatives")}
        balanced = min(len(docs) for docs in sides.values())  # else the larger side's prior decides close calls
        sides = {label: docs[:balanced] for label, docs in sides.items()}
        for label, docs in sides.items():
            if len(docs) < 5:
                raise QualityModelError(f"only {len(docs)} {'positive' if label == GOOD else 'negative'} documents: "
                                        "too few to train a classifier")
        leaked = {_fingerprint(d["text"]) for d in labelled} & {_fingerprint(d["text"]) for s in sides.values()
                                                                 for d in s}
        if leaked:
            raise QualityModelError(f"{len(leaked)} labelled document(s) of {params.labelled} are among the training "
                                    "examples: an evaluation on them would flatter the classifier")
        train, held = [], []
        for label, docs in sides.items():
            cut = max(1, round(len(docs) * params.heldout_fraction))
            held += [(label, d) for d in docs[:cut]]
            train += [(label, d) for d in docs[cut:]]
        random.Random(params.seed).shuffle(train)
        with tempfile.TemporaryDirectory() as tmp:
            path, model_path = os.path.join(tmp, "train.txt"), os.path.join(tmp, "model.bin")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(f"{label} {features(d['text'])}\n" for label, d in train)
            fit(path, model_path, epoch=params.epochs, lr=params.lr, dim=params.dim, wordNgrams=params.word_ngrams,
                minCount=params.min_count, bucket=params.bucket, seed=params.seed)
            prod.put_file(model_path, "model.bin")
            model = load_model.__wrapped__(model_path)
        prod.metrics["examples"] = {"positives": len(sides[GOOD]), "negatives": len(sides[BAD]),
                                    "train": len(train), "heldout": len(held)}
        prod.metrics["heldout"] = rates([(label == GOOD, score(model, d["text"])) for label, d in held],
                                        params.threshold)
        crawl_scores = sorted(score(model, d["text"]) for d in sides[BAD])
        prod.metrics["crawl_score_quantiles"] = [
            round(crawl_scores[min(len(crawl_scores) - 1, q * len(crawl_scores) // 100)], 6) for q in range(101)]
        if labelled:
            rows = evaluate(labelled, model, params.threshold)
            prod.metrics["labelled"] = rows
            prod.metrics["labelled_auc"] = {
                "all": auc([(d["label"] == "good", d["score"]) for d in labelled]),
                "heuristics_kept": auc([(d["label"] == "good", d["score"]) for d in labelled if d["heuristics"]])}
            with prod.open("labelled.jsonl") as f:
                f.write("".join(json.dumps({"id": d["id"], "label": d["label"], "score": d["score"],
                                            "heuristics": d["heuristics"]}) + "\n" for d in labelled).encode())
            runtime().table("quality-evaluation", rows, f"{prod.ref}: precision of what is kept and recall of the "
                            f"good documents on {len(labelled)} labelled documents")
            a = prod.metrics["labelled_auc"]
            log("quality-model: on the labelled set\n" + evaluation_markdown(rows) + f"\nranking (ROC AUC of the "
                f"score): {a['all']} over all labelled documents, {a['heuristics_kept']} among those the heuristics keep")
        h = prod.metrics["heldout"]
        log(f"quality-model: held-out accuracy {h['accuracy']:.1%} (precision {h['precision']:.1%}, recall "
            f"{h['recall']:.1%}) on {len(held)} examples")

    return run_stage(lake, "quality-model", params.recipe(),
                     [negatives_m.ref, *(m.ref for m in positives_m), *(m.ref for m in more_m)],
                     CODE_VERSION, build, rebuild=params.rebuild)


def rates(scored: list[tuple[bool, float]], threshold: float) -> dict:
    """Accuracy, and precision and recall of the good side, of (is good, score) pairs at a threshold."""
    kept = [good for good, s in scored if s >= threshold]
    good = sum(g for g, _ in scored)
    right = sum((s >= threshold) == g for g, s in scored)
    return {"examples": len(scored), "accuracy": round(right / len(scored), 4),
            "precision": round(sum(kept) / len(kept), 4) if kept else 0.0,
            "recall": round(sum(kept) / good, 4) if good else 0.0}


def fit(train_path: str, model_path: str, **settings) -> None:
    """fastText's supervised training, one thread, in a process of its own: in a process that has
    trained before, the fastText wheel can fail with "Encountered NaN" on data it trains on fine
    in a fresh one (seen on fasttext-numpy2-wheel 0.9.2); a fresh process also gives the same bytes
    every time."""
    import subprocess
    import sys

    args = json.dumps({"input": train_path, **settings, "thread": 1, "verbose": 0})
    r = subprocess.run([sys.executable, "-m", "tasks.quality", args, model_path], capture_output=True, text=True)
    if r.returncode != 0:
        raise QualityModelError(f"fastText training failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")


def auc(scored: list[tuple[bool, float]]) -> float | None:
    """ROC AUC: the chance that a good document scores above a bad one (ties count half)."""
    good = [s for g, s in scored if g]
    bad = [s for g, s in scored if not g]
    if not good or not bad:
        return None
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return round(wins / (len(good) * len(bad)), 4)


def heuristic_verdicts(docs: list[dict]) -> list[bool]:
    """Whether each document (text and url) passes the filter stage's heuristics as `filter` runs
    them by default (FineWeb's): URL blocklist, language, Gopher, C4, FineWeb."""
    from datatrove.data import Document

    from tasks.filter import FilterParams, text_filters

    steps = text_filters(FilterParams(), removed=lambda name: None, url=True)
    data: Iterator = (Document(text=d["text"], id=d["id"], metadata={"url": d["url"]}) for d in docs)
    for step in steps:
        data = step.run(data, 0, 1)
    kept = {d.id for d in data}
    return [d["id"] in kept for d in docs]


def evaluate(labelled: list[dict], model, threshold: float) -> list[dict]:
    """Precision of what is kept and recall of the good documents, for the heuristics alone, the
    classifier alone and both (each document's `score` and `heuristics` verdict are added to it)."""
    for d, passed in zip(labelled, heuristic_verdicts(labelled)):
        d["heuristics"], d["score"] = passed, round(score(model, d["text"]), 4)
    good = sum(d["label"] == "good" for d in labelled)
    # the same budget as the heuristics: the classifier's top documents, as many as they keep (DCLM's comparison)
    budget = sum(d["heuristics"] for d in labelled)
    top = {id(d) for d in sorted(labelled, key=lambda d: -d["score"])[:budget]}
    rows = []
    for name, keep in (("heuristics alone", lambda d: d["heuristics"]),
                       (f"classifier alone (score >= {threshold})", lambda d: d["score"] >= threshold),
                       ("classifier alone (its top, as many as the heuristics keep)", lambda d: id(d) in top),
                       ("heuristics and classifier", lambda d: d["heuristics"] and d["score"] >= threshold)):
        kept = [d for d in labelled if keep(d)]
        right = sum(d["label"] == "good" for d in kept)
        p, r = (right / len(kept) if kept else 0.0), (right / good if good else 0.0)
        rows.append({"kept by": name, "kept": len(kept), "good kept": right, "good": good,
                     "precision": round(p, 4), "recall": round(r, 4),
                     "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0})
    return rows


def table_row(row: dict) -> dict:
    """A row of the labelled evaluation in reading order (the manifest stores its keys sorted)."""
    return {k: row[k] for k in ("kept by", "kept", "good kept", "good", "precision", "recall", "f1")}


def evaluation_markdown(rows: list[dict]) -> str:
    lines = ["| kept by | kept | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['kept by']} | {r['kept']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def summary(x: dict) -> str:
    h, e = x["heldout"], x["examples"]
    return (f"{e['positives']:,} reference / {e['negatives']:,} crawl documents, held-out accuracy "
            f"{h['accuracy']:.1%}")


if __name__ == "__main__":  # fit's training process: python -m tasks.quality SETTINGS_JSON MODEL_PATH
    import sys

    import fasttext

    fasttext.train_supervised(**json.loads(sys.argv[1])).save_model(sys.argv[2])
