"""Stage `index`: a BM25 text index of a corpus (a dedup version and any extra ingest text),
versioned in the lake, so that `chat --context` can put relevant corpus text in the model's
context (working memory) and say where it came from.

Documents are cut into passages of about `passage_words` words (whole paragraphs, a longer one
cut at sentence ends); `passages.jsonl` holds each passage with its document's id, and `bm25/` the
index as bm25s (a maintained BM25 library: numpy only, sparse matrices saved as .npy and JSON)
writes it. Its bytes repeat on a rebuild (tested), so the version is content-addressed like every
other. The index is built in memory: about the size of the passages' token ids.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Callable, Iterator

from pydantic import Field

from tasks.errors import StageError
from tasks.lake import Lake, Manifest, Production
from tasks.stage import StageParams, cache_dir, input_ref, local_file, resolve_inputs, run_stage

CODE_VERSION = "index/1"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


class IndexError_(StageError):
    """Nothing to index."""


class IndexParams(StageParams):
    """The corpus to index and how it is cut into passages."""

    input: str = input_ref("dedup", "filter")
    extra: list[str] = input_ref("ingest", many=True, description="ingest refs of extra text to index too")
    passage_words: int = Field(120, ge=16, le=2000, description="about this many words a passage")
    eval_questions: int = Field(200, ge=0, le=100_000, description="questions made from the corpus's definitional "
                                "sentences (as conversations makes them) to measure retrieval: is the answer's "
                                "document among the top passages?")
    eval_k: int = Field(5, ge=1, le=100, description="recall@k of the measurement (and recall@1)")

    def recipe(self) -> dict:
        return self.model_dump(mode="json", exclude={"input", "extra", "rebuild"})


def passages(doc_id: str, text: str, words: int) -> Iterator[dict]:
    """A document's passages: paragraphs gathered up to about `words` words; a paragraph longer
    than that is cut at sentence ends."""
    pieces: list[str] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n|\n", text)):
        if not para:
            continue
        if len(para.split()) <= words:
            pieces.append(para)
            continue
        chunk: list[str] = []
        for sent in _SENTENCE.split(para):
            if chunk and len(" ".join(chunk).split()) + len(sent.split()) > words:
                pieces.append(" ".join(chunk))
                chunk = []
            chunk.append(sent)
        if chunk:
            pieces.append(" ".join(chunk))
    block: list[str] = []
    k = 0
    for piece in pieces:
        if block and len(" ".join(block).split()) + len(piece.split()) > words:
            yield {"id": f"{doc_id}~{k}", "doc": doc_id, "text": "\n".join(block)}
            block, k = [], k + 1
        block.append(piece)
    if block:
        yield {"id": f"{doc_id}~{k}", "doc": doc_id, "text": "\n".join(block)}


def tokens(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def build_index(lake: Lake, params: IndexParams, log: Callable[[str], None] = print) -> Manifest:
    from tasks.tokenizer import iter_documents, iter_extra_texts

    inputs = resolve_inputs(lake, params)
    source, extras = inputs["input"], inputs["extra"]
    if not source.metrics.get("documents") and not extras:
        raise IndexError_(f"{source.ref} holds no documents: nothing to index")

    def build(prod: Production) -> None:
        import bm25s

        docs = [*iter_documents(lake, source), *(d for e in extras for d in iter_extra_texts(lake, e))]
        rows = [p for d in docs for p in passages(d["id"], d["text"], params.passage_words)]
        if not rows:
            raise IndexError_(f"no text to index in {source.ref}")
        retriever = bm25s.BM25()
        retriever.index(tokens([r["text"] for r in rows]), show_progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            retriever.save(os.path.join(tmp, "bm25"))
            for name in sorted(os.listdir(os.path.join(tmp, "bm25"))):
                prod.put_file(os.path.join(tmp, "bm25", name), f"bm25/{name}")
        with prod.open("passages.jsonl") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        prod.metrics.update({"documents": len(docs), "passages": len(rows),
                             "words": sum(len(r["text"].split()) for r in rows)})
        if params.eval_questions:
            prod.metrics["retrieval"] = measure_retrieval(retriever, rows, docs, params, prod.ref)
        log(f"index: {summary(prod.metrics)}")

    return run_stage(lake, "index", params.recipe(), [source.ref, *(e.ref for e in extras)], CODE_VERSION, build,
                     rebuild=params.rebuild)


def measure_retrieval(bm25, rows: list[dict], docs: list[dict], params: IndexParams, ref: str) -> dict:
    """Questions whose answer is a sentence of the corpus (tasks/conversations.py makes its corpus
    questions the same way), searched in the index: the share whose answer's document is the top
    passage's (recall@1) or among the top `eval_k` passages' (recall@k), as a Prefect table."""
    from tasks.conversations import corpus_conversations
    from tasks.report import runtime

    asked = [(source.split(":", 1)[1], next(m["content"] for m in c["messages"] if m["role"] == "user"))
             for source, c in corpus_conversations(iter(docs), params.eval_questions, seed=0)]
    if not asked:
        return {"questions": 0}
    k = min(params.eval_k, len(rows))
    found, _ = bm25.retrieve(tokens([q for _, q in asked]), k=k, show_progress=False)
    ranks = [next((r for r, i in enumerate(top) if rows[int(i)]["doc"] == doc), None) for (doc, _), top in zip(asked, found)]
    result = {"questions": len(asked), "k": k, "recall_at_1": round(sum(r == 0 for r in ranks) / len(asked), 4),
              "recall_at_k": round(sum(r is not None for r in ranks) / len(asked), 4)}
    runtime().table("retrieval", [{"questions": len(asked), "recall@1": result["recall_at_1"],
                                   f"recall@{k}": result["recall_at_k"]}],
                    f"{ref}: is the answer's document among the passages retrieved for a corpus question?")
    return result


class Retriever:
    """Search an index version: the top passages for a query, with their documents' ids."""

    def __init__(self, lake: Lake, m: Manifest):
        import bm25s

        together = None if lake.is_local else cache_dir("index", m.version)  # bm25s loads one folder
        paths = [local_file(lake, m, f["path"], together) for f in m.files if f["path"].startswith("bm25/")]
        self.bm25 = bm25s.BM25.load(os.path.dirname(paths[0]))
        with open(local_file(lake, m, "passages.jsonl"), encoding="utf-8") as f:
            self.rows = [json.loads(line) for line in f]

    def search(self, query: str, k: int = 2) -> list[dict]:
        q = tokens([query])
        if not q.vocab or not any(len(ids) for ids in q.ids):
            return []
        found, scores = self.bm25.retrieve(q, k=min(k, len(self.rows)), show_progress=False)
        return [{**self.rows[int(i)], "score": round(float(s), 4)} for i, s in zip(found[0], scores[0]) if s > 0]


def summary(x: dict) -> str:
    r = x.get("retrieval") or {}
    found = (f"; recall@1 {r['recall_at_1']:.0%}, recall@{r['k']} {r['recall_at_k']:.0%} on {r['questions']} corpus "
             "questions" if r.get("questions") else "")
    return f"{x['passages']:,} passages of {x['documents']:,} documents ({x['words']:,} words){found}"
