"""Stage `probe`: self-interrogation. Ask a chat model questions it can and cannot know, sample
its answers, decide per question whether it answered or declined, and write what a next SFT round
should learn from it: "I'm not sure. Could you give me more context?" for the unknown questions it
answered anyway, the reference answer for the known ones (so the round does not learn to refuse
everything). `conversations --probes probe@V` takes those examples.

Questions (files, `FORMAT:PATH`):
- `selfaware`: SelfAware's JSON (`{"example": [{question, answer, answerable}, ...]}`): answerable
  ones with their reference answers, unanswerable ones with none;
- `gsm8k`: GSM8K lines: answerable, the worked answer as reference;
- generated: `made_up` questions about names and things that do not exist ("Who is Asdja
  Rkjgklfj?"), unanswerable by construction.

A question is held out (by a hash of its text, `heldout_fraction`) or used for examples, never
both: the held-out questions are where the rates are measured, here (before) and by the `sft`
round that trains on the examples (after, with the same function). A reply declines when it says
so (`REFUSAL`: "not sure", "don't know", "more context", ...); a question is declined when most
of its samples decline. Rates count samples: refusal rate on unanswerable questions, answer rate
(not declining) on answerable ones, and, where a reference exists, the share of samples that
contain it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Iterator

from pydantic import Field, field_validator

from tasks.errors import StageError
from tasks.ingest import sha256_file
from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage

CODE_VERSION = "probe/1"
FORMATS = ("selfaware", "gsm8k")
NOT_SURE = "I'm not sure. Could you give me more context?"
REFUSAL = re.compile(r"\b(not sure|don'?t know|do not know|no idea|more context|cannot answer|can'?t answer|"
                     r"not certain|unsure)\b", re.IGNORECASE)


class ProbeError(StageError):
    """Nothing to ask."""


class ProbeParams(StageParams):
    """The model to question, the questions, how to sample its answers."""

    model: str = input_ref("sft", "pretrain", description="the chat model to question (a ref); default: sft@latest")
    files: list[str] = Field(default_factory=list, description="question files, each FORMAT:PATH; formats: "
                             + ", ".join(FORMATS))
    made_up: int = Field(100, ge=0, le=100_000, description="generated questions about made-up names (unanswerable)")
    max_per_file: int = Field(500, ge=1, le=1_000_000, description="questions read from each file at most "
                              "(answerable and unanswerable alike, in the file's order)")
    samples: int = Field(3, ge=1, le=64, description="answers sampled per question")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (the chat's)")
    top_k: int = Field(50, ge=0, description="sample from the k likeliest tokens; 0: from all")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="tokens per answer at most")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="questions kept out of the examples, for "
                                    "measuring before and after")
    seed: int = Field(0, ge=0, description="seed of the generated questions and of the sampling")
    system: str = Field("", max_length=8000, description="the system prompt the model is deployed with: the "
                        "questions are asked under it and the examples carry it")

    @field_validator("files")
    @classmethod
    def _readable(cls, files: list[str]) -> list[str]:
        for spec in files:
            fmt, sep, path = spec.partition(":")
            if not sep or fmt not in FORMATS:
                raise ValueError(f"{spec}: expected FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
            if not Path(path).is_file():
                raise ValueError(f"{path}: no such file")
        return files

    def recipe(self) -> dict:
        sources = [[spec.partition(":")[0], Path(spec.partition(":")[2]).name, sha256_file(spec.partition(":")[2])]
                   for spec in self.files]
        return {**self.model_dump(mode="json", exclude={"model", "files", "rebuild"}), "sources": sources}


# --------------------------------------------------------------------------- the questions

_SYLLABLES = ["as", "dja", "rk", "jg", "kl", "fj", "zor", "vex", "qui", "bel", "tru", "mo", "nax", "pli", "gor",
              "wen", "dra", "ix", "ul", "cha", "fen", "yor", "ska", "bu"]
_MADE_UP = ["Who is {name}?", "What is {name} famous for?", "When was {name} born?", "Where does {name} live?",
            "What is the capital of {place}?", "How many people live in {place}?", "Who founded {org}?",
            "What does {org} make?", "In what year did {place} become independent?", "What did {name} discover?"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def made_up_questions(n: int, seed: int) -> Iterator[dict]:
    """Questions about names, places and organisations that do not exist."""
    rng = random.Random(f"made-up:{seed}")
    for i in range(n):
        q = rng.choice(_MADE_UP).format(name=f"{_word(rng)} {_word(rng)}", place=_word(rng),
                                        org=f"{_word(rng)} {rng.choice(['Labs', 'Corporation', 'Institute'])}")
        yield {"id": f"made-up#{i}", "question": q, "answerable": False, "reference": None}


def read_questions(spec: str, limit: int) -> Iterator[dict]:
    fmt, _, path = spec.partition(":")
    name = Path(path).name
    try:
        if fmt == "selfaware":
            rows = json.loads(Path(path).read_bytes().decode("utf-8"))["example"]
            for r in rows[:limit]:
                answers = r.get("answer") or []
                yield {"id": f"{name}#{r['question_id']}", "question": r["question"].strip(),
                       "answerable": bool(r["answerable"]), "reference": answers if r["answerable"] else None}
        else:
            from tasks.conversations import from_gsm8k

            with open(path, encoding="utf-8") as f:
                for n, line in zip(range(limit), f):
                    row = json.loads(line)
                    answer = from_gsm8k(row)["messages"][1]["content"]
                    final = answer.rsplit("The answer is ", 1)[-1].rstrip(".")
                    yield {"id": f"{name}:{n + 1}", "question": row["question"], "answerable": True,
                           "reference": [final], "worked": answer}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ProbeError(f"{path}: not a {fmt} file ({type(e).__name__}: {e})") from None


def heldout(question: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{question}".encode()).digest()[:8], "little") / 2**64


# --------------------------------------------------------------------------- asking and deciding

def declines(reply: str) -> bool:
    return bool(REFUSAL.search(reply))


def contains_reference(reply: str, reference: list[str] | None) -> bool | None:
    if not reference:
        return None
    text = reply.lower()
    return any(r.lower().strip() in text for r in reference if r.strip())


def interrogate(ask: Callable[[str, int], str], questions: list[dict], samples: int) -> list[dict]:
    """Each question asked `samples` times (`ask(question, sample index)` -> reply); the replies,
    which decline, which contain a reference answer, and the verdict (declined by most samples)."""
    out = []
    for q in questions:
        replies = [ask(q["question"], k) for k in range(samples)]
        declined = [declines(r) for r in replies]
        correct = [contains_reference(r, q.get("reference")) for r in replies]
        out.append({**q, "replies": replies, "declined": declined, "correct": correct,
                    "verdict": "declined" if sum(declined) * 2 > samples else "answered"})
    return out


def rates(results: list[dict]) -> dict:
    """Refusal rate on unanswerable questions, answer rate on answerable ones (both over samples),
    the share of samples with a reference answer, and the counts they come from."""
    unknown = [d for r in results if not r["answerable"] for d in r["declined"]]
    known = [d for r in results if r["answerable"] for d in r["declined"]]
    correct = [c for r in results if r["answerable"] for c in r["correct"] if c is not None]
    return {"unanswerable": sum(not r["answerable"] for r in results),
            "answerable": sum(r["answerable"] for r in results),
            "refusal_rate_unanswerable": round(sum(unknown) / len(unknown), 4) if unknown else None,
            "answer_rate_answerable": round(1 - sum(known) / len(known), 4) if known else None,
            "correct_rate_answerable": round(sum(correct) / len(correct), 4) if correct else None}


def model_asker(model, sp, params) -> Callable[[str, int], str]:
    """`ask` for a loaded chat model: its reply through the chat template, seeded per question and sample."""
    from model.chat import reply_text, system_messages

    system = system_messages(getattr(params, "system", ""))  # a version probed before `system` existed: none

    def ask(question: str, k: int) -> str:
        seed = int.from_bytes(hashlib.sha256(f"{params.seed}:{k}:{question}".encode()).digest()[:4], "little")
        return reply_text(model, sp, [*system, {"role": "user", "content": question}], params.max_new_tokens,
                          params.temperature, params.top_k or None, None, seed)
    return ask


def examples(results: list[dict], system: str = "") -> Iterator[dict]:
    """What the next SFT round learns: "not sure" where it answered an unknown question, the
    reference answer for a known one; under the system prompt the questions were asked under."""
    from model.chat import system_messages

    opening = system_messages(system)
    for r in results:
        if not r["answerable"]:
            if r["verdict"] == "answered":
                yield {"messages": [*opening, {"role": "user", "content": r["question"]},
                                    {"role": "assistant", "content": NOT_SURE}], "source": f"probe:{r['id']}"}
        elif r.get("reference"):
            answer = r.get("worked") or f"{r['reference'][0].strip().rstrip('.')}."
            yield {"messages": [*opening, {"role": "user", "content": r["question"]},
                                {"role": "assistant", "content": answer}], "source": f"probe:{r['id']}"}


# --------------------------------------------------------------------------- the stage

def probe(lake: Lake, params: ProbeParams, log: Callable[[str], None] = print) -> Manifest:
    model_m = resolve_inputs(lake, params)["model"]
    questions = [q for spec in params.files for q in read_questions(spec, params.max_per_file)]
    questions += list(made_up_questions(params.made_up, params.seed))
    if not questions:
        raise ProbeError("no questions: give files (selfaware:PATH, gsm8k:PATH) or made_up > 0")

    def build(prod: Production) -> None:
        from model.sample import load

        model, _, sp = load(lake.file_uri(model_m, "final"), device="cpu", fs=lake.fs)
        ask = model_asker(model, sp, params)
        held = [q for q in questions if heldout(q["question"], params.seed) < params.heldout_fraction]
        train = [q for q in questions if heldout(q["question"], params.seed) >= params.heldout_fraction]
        results = {"heldout": interrogate(ask, held, params.samples), "train": interrogate(ask, train, params.samples)}
        for split, rs in results.items():
            with prod.open(f"{split}.jsonl") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs).encode())
        made = list(examples(results["train"], params.system))
        with prod.open("examples.jsonl") as f:
            f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in made).encode())
        prod.metrics.update({"model": model_m.ref, "questions": len(questions), "samples": params.samples,
                             "heldout": rates(results["heldout"]), "train": rates(results["train"]),
                             "examples": len(made),
                             "refusal_examples": sum(e["messages"][1]["content"] == NOT_SURE for e in made)})
        log(f"probe: {summary(prod.metrics)}")
        publish(prod.ref, {"probe (before)": prod.metrics["heldout"]})

    return run_stage(lake, "probe", params.recipe(), [model_m.ref], CODE_VERSION, build, rebuild=params.rebuild)


def publish(ref: str, measured: dict[str, dict]) -> None:
    """The held-out rates as a Prefect table artifact, a row per model measured."""
    rows = [{"measured": name, **{k: v for k, v in r.items()}} for name, r in measured.items()]
    runtime().table("uncertainty", rows, f"{ref}: refusals on unanswerable, answers on answerable held-out questions")


def summary(x: dict) -> str:
    h = x["heldout"]
    pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    return (f"{x['questions']:,} questions x {x['samples']}; held out: refuses {pct(h['refusal_rate_unanswerable'])} "
            f"of {h['unanswerable']} unanswerable, answers {pct(h['answer_rate_answerable'])} of {h['answerable']} "
            f"answerable ({pct(h['correct_rate_answerable'])} with the reference); {x['examples']:,} examples "
            f"({x['refusal_examples']:,} \"not sure\")")
