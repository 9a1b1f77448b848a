"""Extraction quality on scrapinghub/article-extraction-benchmark (181 real article pages with
human gold text), with that benchmark's own metric, against datatrove's stock Trafilatura
extractor; plus CPU seconds per page.

The metric is a faithful copy of the benchmark's evaluate.py: 4-gram shingles of `\\w+` tokens,
per page TP/FP/FN normalised to sum 1; precision = mean over pages with TP+FP > 0, recall =
mean over pages with TP+FN > 0, F1 = harmonic mean of those two means (not a mean of per-page
F1s). Validated here on the reference outputs shipped in the benchmark's output/ folder.

The stock peer is `datatrove.pipeline.extractors.Trafilatura(favour_precision=True).extract`,
called directly (not through its timeout sandbox). It keeps trafilatura's deduplicate=True, whose
LRU cache carries state across documents: its caches are reset before each pass so every pass
(and the score) starts from the same state as a fresh process would.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import record

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "extraction-benchmark"
REPEATS = 3

# ----------------------------------------------------------------- the benchmark's metric

_TOKEN_RE = re.compile(r"\w+", re.UNICODE | re.MULTILINE | re.IGNORECASE | re.DOTALL)


def _ngrams(text: str, n: int = 4) -> list[tuple[str, ...]]:
    tokens = _TOKEN_RE.findall(text or "")
    out = []
    for i in range(0, max(1, len(tokens) - n + 1)):
        shingle = tuple(tokens[i: i + n])
        if shingle:
            out.append(shingle)
    return out


def shingle_tp_fp_fn(true: str, pred: str, n: int = 4) -> tuple[float, float, float]:
    t, p = Counter(_ngrams(true, n)), Counter(_ngrams(pred, n))
    tp = fp = fn = 0.0
    for key in set(t) | set(p):
        tc, pc = t.get(key, 0), p.get(key, 0)
        tp += min(tc, pc)
        fp += max(0, pc - tc)
        fn += max(0, tc - pc)
    s = tp + fp + fn
    if s > 0:  # normalised: longer texts do not weigh more
        return tp / s, fp / s, fn / s
    return tp, fp, fn


def _precision(tp: float, fp: float, fn: float) -> float:
    if fp == fn == 0:
        return 1.0
    if tp == fp == 0:
        return 0.0
    return tp / (tp + fp)


def _recall(tp: float, fp: float, fn: float) -> float:
    if fp == fn == 0:
        return 1.0
    if tp == fn == 0:
        return 0.0
    return tp / (tp + fn)


def score(gold: dict[str, str], pred: dict[str, str]) -> dict[str, float]:
    """precision, recall, F1 exactly as the benchmark's evaluate.py (without its bootstrap CIs)."""
    if gold.keys() != pred.keys():
        raise ValueError("prediction keys do not match ground truth")
    triples = [shingle_tp_fp_fn(gold[k], pred[k]) for k in gold]
    p = statistics.mean([_precision(*x) for x in triples if x[0] + x[1] > 0])
    r = statistics.mean([_recall(*x) for x in triples if x[0] + x[2] > 0])
    return {"f1": 2 * p * r / (p + r), "precision": p, "recall": r}


# ----------------------------------------------------------------- data


def load() -> tuple[dict[str, str], dict[str, str]]:
    gt = json.loads((BENCH / "ground-truth.json").read_text(encoding="utf8"))
    gold = {k: v.get("articleBody", "") for k, v in gt.items()}
    html = {k: gzip.decompress((BENCH / "html" / f"{k}.html.gz").read_bytes()).decode("utf8") for k in gt}
    return gold, html


def check_metric(gold: dict[str, str]) -> None:
    """Print the scores of the reference outputs shipped with the benchmark (compare README.rst)."""
    for path in sorted((BENCH / "output").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf8"))
        version = data.get("version", "?") if "output" in data else "?"
        data = data.get("output", data)
        m = score(gold, {k: data[k].get("articleBody", "") or "" for k in gold})
        print(f"  reference {path.stem:<12} {version:<10} F1 {m['f1']:.3f}  P {m['precision']:.3f}  R {m['recall']:.3f}")


# ----------------------------------------------------------------- runs


def _reset_trafilatura() -> None:
    try:
        from trafilatura.meta import reset_caches

        reset_caches()
    except ImportError:
        pass


def evaluate(name: str, extract, gold: dict[str, str], html: dict[str, str]) -> dict:
    """Score from the first pass; CPU seconds per page = median over REPEATS passes."""
    cpu, preds = [], None
    for _ in range(REPEATS):
        _reset_trafilatura()
        out = {}
        t = time.process_time()
        for k, page in html.items():
            try:
                out[k] = extract(page) or ""
            except Exception:
                out[k] = ""
        cpu.append((time.process_time() - t) / len(html))
        if preds is None:
            preds = out
        elif out != preds:
            print(f"  note: {name}: pass output differs from the first pass")
    m = score(gold, preds)
    m["cpu_per_page"] = statistics.median(cpu)
    m["cpu_all"] = cpu
    print(f"  {name:<40} F1 {m['f1']:.3f}  P {m['precision']:.3f}  R {m['recall']:.3f}  "
          f"CPU {1000 * m['cpu_per_page']:.1f} ms/page (passes: {', '.join(f'{1000 * c:.1f}' for c in cpu)})",
          flush=True)
    return m


def _fmt(m: dict) -> str:
    return f"F1 {m['f1']:.3f} (P {m['precision']:.3f}, R {m['recall']:.3f}), {1000 * m['cpu_per_page']:.0f} ms CPU/page"


def run() -> None:
    from datatrove.pipeline.extractors import Trafilatura

    from tasks.steps import Extract

    gold, html = load()
    print(f"{len(gold)} pages; metric check on the benchmark's reference outputs:")
    check_metric(gold)

    stock = Trafilatura(favour_precision=True)  # stock defaults: deduplicate=True, timeout unused here
    peer = evaluate("datatrove Trafilatura(favour_precision=True)", stock.extract, gold, html)
    ours = {
        "trafilatura favour_precision": evaluate("ours trafilatura favour_precision",
                                                 Extract("trafilatura", True).extract, gold, html),
        "trafilatura default": evaluate("ours trafilatura default", Extract("trafilatura", False).extract, gold, html),
        "resiliparse": evaluate("ours resiliparse", Extract("resiliparse").extract, gold, html),
        # tasks/boilerplate.py after the extractor (FilterParams.strip_boilerplate, on by default)
        "trafilatura favour_precision + strip_boilerplate": evaluate(
            "ours trafilatura favour_precision + strip", Extract("trafilatura", True, True).extract, gold, html),
        "trafilatura default + strip_boilerplate": evaluate(
            "ours trafilatura default + strip", Extract("trafilatura", False, True).extract, gold, html),
        "resiliparse + strip_boilerplate": evaluate("ours resiliparse + strip", Extract("resiliparse", True, True).extract,
                                                    gold, html),
    }
    cmd = "python -m benchmarks.bench_extraction"
    for label, m in ours.items():
        record(f"extraction F1 on {len(gold)} gold pages ({label})", _fmt(m),
               f"datatrove Trafilatura(favour_precision=True) {_fmt(peer)}", m["f1"] / peer["f1"], cmd)


if __name__ == "__main__":
    run()
