"""Stage `conversations`: files of conversations into one versioned, validated artifact with a
deterministic held-out split, for post-training (`sft`).

A source is a local file, in one of these formats (a `FORMAT:` prefix on the path; `messages`
when none):
- `messages`: JSON lines of `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`
  (nanochat's and OpenAI's shape);
- `gsm8k`: JSON lines of `{"question", "answer"}` (GSM8K): the question is the user's turn, the
  worked answer the assistant's, its calculator annotations (`<<48/2=24>>`) removed and its last
  line (`#### 72`) said as `The answer is 72.`;
- `sgd`: a JSON list of Schema-Guided Dialogue dialogues: USER turns are the user's, SYSTEM
  turns the assistant's (a trailing user turn, which has no reply, is left out);
- `sharegpt`: a JSON list of `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`
  (FastChat's identity conversations among them): the names of other assistants and their makers
  (`FOREIGN_NAMES`: Vicuna, LMSYS, ...) are replaced by `assistant_name` and `assistant_maker`; a
  conversation whose assistant still names another assistant or maker is rejected
  (`names_another_assistant`), never trained on.

Generated sets, so a lake with no conversation files still gets an assistant (the pipeline's
default: 1,000 arithmetic, 1,000 corpus and 100 identity conversations when no file is given):
- `arithmetic`: sums, differences, products and two-step word problems with worked answers ending
  `The answer is N.` (GSM8K's shape, which `gsm8k` sources are converted to);
- `corpus_questions`: questions answered by the corpus's own sentences: a definitional sentence
  ("A generator function is ...") becomes "What is a generator function?" answered by it and the
  sentence after it; from the `corpus` version (dedup) and any `extra` ingest versions;
- `identity`: who the assistant is, who made it, what it can do (`assistant_name`,
  `assistant_maker`), half of them under the system prompt that says so.
A quarter of the arithmetic and corpus conversations go on for a second turn. Seeded: the same
parameters and corpus give the same conversations.

Every conversation is checked: an optional system message first, then user and assistant
alternating, starting with the user and ending with the assistant, every content a non-empty
string. What fails (invalid JSON, a line that is not UTF-8, an unknown role, empty content, a
conversation that does not end with the assistant, ...) is counted per reason and source,
sampled in `rejected.jsonl`, and reported in the summary: never silently dropped, never a crash.
A conversation goes to `val.jsonl` when a hash of its messages falls under `val_fraction`, else to
`train.jsonl`; the same conversation always lands on the same side.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from pydantic import Field, field_validator, model_validator

from tasks.errors import StageError
from tasks.ingest import sha256_file
from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage

CODE_VERSION = "conversations/1"
FORMATS = ("messages", "gsm8k", "sgd", "sharegpt")
GENERATED_WITHOUT_FILES = {"arithmetic": 1000, "corpus_questions": 1000, "identity": 100}
ROLES = ("system", "passage", "user", "assistant")  # passage: corpus text in the context (model/chat.py)


class ConversationsError(StageError):
    """Nothing usable came out of the sources."""


def parse_source(spec: str) -> tuple[str, str]:
    """'gsm8k:path' -> ('gsm8k', 'path'); a path alone is `messages`."""
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        return head, rest
    return "messages", spec


class ConversationsParams(StageParams):
    """Conversation files to validate, convert and split, and sets to generate."""

    files: list[str] = Field(default_factory=list, description="local files, each FORMAT:PATH or PATH (messages "
                             f"JSONL); formats: {', '.join(FORMATS)}")
    corpus: str = input_ref("dedup", "filter", description="the corpus whose sentences answer generated questions "
                            "(read only when corpus_questions > 0)")
    extra: list[str] = input_ref("ingest", many=True, description="ingest refs of extra text whose sentences also "
                                 "answer generated questions")
    probes: list[str] = input_ref("probe", many=True, description="probe refs whose examples (\"not sure\" for "
                                  "the unknown questions the model answered, reference answers for known ones) join")
    arithmetic: int | None = Field(None, ge=0, le=10_000_000, description="generated arithmetic conversations with "
                                   "worked answers; default: 1000 when no files or probes are given, else 0")
    corpus_questions: int | None = Field(None, ge=0, le=10_000_000, description="generated questions answered by "
                                         "the corpus's sentences; default: 1000 when no files or probes are given, else 0")
    identity: int | None = Field(None, ge=0, le=1_000_000, description="generated who-are-you conversations; "
                                 "default: 100 when no files or probes are given, else 0")
    assistant_name: str = Field("Crawly", min_length=1, max_length=100, description="the name identity "
                                "conversations give the assistant")
    assistant_maker: str = Field("the crawl2model project", min_length=1, max_length=200,
                                 description="who made it, in identity conversations")
    seed: int = Field(0, ge=0, description="seed of the generated sets")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="conversations held out for validation")
    rejected_sample: int = Field(20, ge=0, le=10_000, description="rejected conversations kept per reason")

    def generated(self) -> dict[str, int]:
        """How many conversations of each generated set (their defaults applied)."""
        return {k: v if (v := getattr(self, k)) is not None else (0 if self.files or self.probes else n)
                for k, n in GENERATED_WITHOUT_FILES.items()}

    def inputs_read(self) -> set[str]:
        return {"probes"} | ({"corpus", "extra"} if self.generated()["corpus_questions"] else set())

    @model_validator(mode="after")
    def _something(self):
        if not self.files and not self.probes and not any(self.generated().values()):
            raise ValueError("no conversations: give files, probes or a generated set (arithmetic, corpus_questions, "
                             "identity)")
        return self

    @field_validator("files")
    @classmethod
    def _readable(cls, files: list[str]) -> list[str]:
        names = set()
        for spec in files:
            fmt, path = parse_source(spec)
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file")
            if not os.access(path, os.R_OK):
                raise ValueError(f"{path}: not readable")
            if Path(path).name in names:
                raise ValueError(f"{path}: two sources share the file name {Path(path).name!r}")
            names.add(Path(path).name)
        return files

    def recipe(self) -> dict:
        # the version follows the sources' bytes and formats, not where they were on this machine
        sources = sorted([Path(p).name, fmt, sha256_file(p)] for fmt, p in map(parse_source, self.files))
        recipe = {"sources": sources, "val_fraction": self.val_fraction, "rejected_sample": self.rejected_sample}
        generated = self.generated()
        if any(generated.values()):  # (a version from files alone keeps the version it had)
            recipe.update(generated=generated, seed=self.seed)
        if generated["identity"] or any(fmt == "sharegpt" for _, fmt, _ in sources):  # the identity it teaches
            recipe["assistant"] = [self.assistant_name, self.assistant_maker]
        return recipe


# --------------------------------------------------------------------------- reading the formats


class Rejected(Exception):
    """Why a conversation is not used (a reason key of the metrics), and what it was when it could
    not even be parsed."""

    def __init__(self, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.reason, self.raw = reason, raw


def check(conversation) -> list[dict]:
    """The conversation's messages, or Rejected(reason)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise Rejected("malformed")
    messages = conversation["messages"]
    if not messages:
        raise Rejected("no_messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise Rejected("malformed")
        if m["role"] not in ROLES:
            raise Rejected("unknown_role")
        if not m["content"].strip():
            raise Rejected("empty_content")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in turns):
        raise Rejected("misplaced_system")
    if any(m["role"] == "passage" and (i + 1 == len(turns) or turns[i + 1]["role"] not in ("passage", "user"))
           for i, m in enumerate(turns)):
        raise Rejected("misplaced_passage")  # a passage goes before the user's message it serves
    turns = [m for m in turns if m["role"] != "passage"]
    if not turns or turns[-1]["role"] != "assistant":
        raise Rejected("does_not_end_with_assistant")
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
        raise Rejected("turns_do_not_alternate")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _json_lines(path: str) -> Iterator[tuple[str, object]]:
    """(line number, the parsed line, or Rejected) of a JSON-lines file; blank lines skipped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield str(n), Rejected("not_utf8", raw.decode("utf-8", errors="replace"))
                continue
            if not text.strip():
                continue
            try:
                yield str(n), json.loads(text)
            except json.JSONDecodeError:
                yield str(n), Rejected("invalid_json", text)


_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def from_gsm8k(row) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise Rejected("malformed")
    answer = _CALC.sub("", row["answer"])
    answer = _FINAL.sub(lambda m: f"\nThe answer is {m.group(1)}.", answer)
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}]}


def from_sgd(dialogue) -> dict:
    if not isinstance(dialogue, dict) or not isinstance(dialogue.get("turns"), list):
        raise Rejected("malformed")
    speakers = {"USER": "user", "SYSTEM": "assistant"}
    messages = []
    for turn in dialogue["turns"]:
        if not isinstance(turn, dict) or turn.get("speaker") not in speakers:
            raise Rejected("unknown_role")
        messages.append({"role": speakers[turn["speaker"]], "content": turn.get("utterance")})
    while messages and messages[-1]["role"] == "user":  # a last question with no reply
        messages.pop()
    return {"messages": messages}


# Other assistants' names and makers in public identity sets (FastChat's), longest first: replaced
# by ours, and a conversation that still names one after that is rejected.
FOREIGN_NAMES = [(r"researchers from Large Model Systems Organization \(LMSYS\)", "maker"),
                 (r"Large Model Systems Organization \(LMSYS\)", "maker"), (r"Large Model Systems Organization", "maker"),
                 (r"LMSYS", "maker"), (r"Vicuna", "name")]
FOREIGN = re.compile(r"Vicuna|LMSYS|Large Model Systems|ChatGPT|OpenAI|Claude|Anthropic|LLaMA|Alpaca", re.IGNORECASE)


def from_sharegpt(row, name: str, maker: str) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise Rejected("malformed")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for turn in row["conversations"]:
        if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
            raise Rejected("unknown_role" if isinstance(turn, dict) and "from" in turn else "malformed")
        text = turn["value"]
        for pattern, what in FOREIGN_NAMES:
            text = re.sub(pattern, maker if what == "maker" else name, text)
        if roles[turn["from"]] == "assistant" and FOREIGN.search(text):  # (a user may ask "Are you ChatGPT?")
            raise Rejected("names_another_assistant")
        messages.append({"role": roles[turn["from"]], "content": text})
    return {"messages": messages}


def read_source(fmt: str, path: str, assistant: tuple[str, str]) -> Iterator[tuple[str, object]]:
    """(where, a conversation dict or Rejected) for every conversation of one source file;
    `assistant`: the (name, maker) that replace other assistants' in `sharegpt` sources."""
    name = Path(path).name
    if fmt in ("sgd", "sharegpt"):  # one JSON list of dialogues
        try:
            with open(path, "rb") as f:
                dialogues = json.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError:
            yield name, Rejected("not_utf8")
            return
        except json.JSONDecodeError:
            yield name, Rejected("invalid_json")
            return
        if not isinstance(dialogues, list):
            yield name, Rejected("malformed")
            return
        key = "dialogue_id" if fmt == "sgd" else "id"
        for i, d in enumerate(dialogues):
            where = f"{name}#{d.get(key, i) if isinstance(d, dict) else i}"
            try:
                yield where, from_sgd(d) if fmt == "sgd" else from_sharegpt(d, *assistant)
            except Rejected as e:
                yield where, e
        return
    for line, row in _json_lines(path):
        where = f"{name}:{line}"
        if isinstance(row, Rejected) or fmt == "messages":
            yield where, row
            continue
        try:
            yield where, from_gsm8k(row)
        except Rejected as e:
            yield where, e


# --------------------------------------------------------------------------- generated sets

_NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena", "Mateo",
          "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
_ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "shells", "stamps", "cards", "coins"]


def _arithmetic_turn(rng: random.Random) -> tuple[str, str]:
    """One question with its worked answer."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."
    if kind == 1:
        a, b = sorted((rng.randint(2, 999), rng.randint(2, 999)), reverse=True)
        return f"What is {a} minus {b}?", f"{a} - {b} = {a - b}. The answer is {a - b}."
    if kind == 2:
        a, b = rng.randint(2, 99), rng.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} x {b} = {a * b}. The answer is {a * b}."
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 3:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}. The answer is {a + b}.")
    if kind == 4:
        a, b = max(a, b), min(a, b)
        return (f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?",
                f"{name} gives {b} of {a} {item} away, so {a} - {b} = {a - b} are left. The answer is {a - b}.")
    packs, per = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{name} has {a} {item} and buys {packs} packs of {per} {item}. How many {item} does {name} have now?",
            f"{packs} packs of {per} {item} are {packs} x {per} = {packs * per} {item}. "
            f"{a} + {packs * per} = {a + packs * per}. The answer is {a + packs * per}.")


def arithmetic_conversations(n: int, seed: int) -> Iterator[tuple[str, dict]]:
    rng = random.Random(f"arithmetic:{seed}")
    for i in range(n):
        messages = []
        for _ in range(2 if rng.random() < 0.25 else 1):
            q, a = _arithmetic_turn(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        yield f"arithmetic#{i}", {"messages": messages}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# a definitional sentence: "A generator function is ...", "The yield statement can ..."
_DEFINITION = re.compile(r"^(The|A|An) ([a-z][a-z-]*(?: [a-z][a-z-]*){0,3}) (is|are|was|were|can|returns|provides|"
                         r"contains|has|have|does|must|may|should|will) [^()\[\]{}<>=_*`|\\]+\.$")
_PLAIN = re.compile(r"^[A-Z][^()\[\]{}<>=_*`|\\:;]+\.$")
_TELL = ["What do you know about {topic}?", "Tell me about {topic}.", "Can you explain {topic}?",
         "What can you tell me about {topic}?"]


def _corpus_turns(text: str) -> Iterator[tuple[str, str, str, str]]:
    """(key, question, answer, passage) for each definitional sentence of a text; the passage is
    the answer with the sentences around it (about 80 words), as retrieval would find it."""
    sentences = [" ".join(x.split()) for x in _SENTENCE_END.split(text)]
    for i, sent in enumerate(sentences):
        m = _DEFINITION.match(sent)
        if not m or not 6 <= len(sent.split()) <= 40:
            continue
        article, topic, verb = m.groups()
        topic = f"{article.lower()} {topic}"
        answer = sent
        if i + 1 < len(sentences) and len(sentences[i + 1].split()) <= 40 and _PLAIN.match(sentences[i + 1]):
            answer += " " + sentences[i + 1]
        key = hashlib.sha256(sent.encode()).hexdigest()
        if verb in ("is", "are", "was", "were"):
            question = f"What {verb} {topic}?"
        else:
            question = _TELL[int(key[:8], 16) % len(_TELL)].format(topic=topic)
        lo, hi, left = i, i + 1, True  # grow the passage a sentence at a time, left and right in turn
        while len(" ".join(sentences[lo:hi]).split()) < 80 and (lo > 0 or hi < len(sentences)):
            if (left and lo > 0) or hi == len(sentences):
                lo -= 1
            else:
                hi += 1
            left = not left
        yield key, question, answer, " ".join(sentences[lo:hi])


def corpus_conversations(texts: Iterator[dict], n: int, seed: int) -> Iterator[tuple[str, dict]]:
    """`n` questions answered by the corpus's sentences, those whose seeded hash is smallest (a
    bounded heap: memory holds `n`, whatever the corpus's size); half with the passage the answer
    is in placed before the question (the model learns to use its working memory), a quarter of
    the others go on to a second question."""
    heap: list = []
    for doc in texts:
        for key, q, a, passage in _corpus_turns(doc["text"]):
            rank = -int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)
            item = (rank, key, doc["id"], q, a, passage)
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    chosen = sorted(heap, reverse=True)
    for i, (_, _, doc_id, q, a, passage) in enumerate(chosen):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 2 == 0:
            messages.insert(0, {"role": "passage", "content": passage})
        elif i % 4 == 3 and i + 1 < len(chosen):  # a second turn: the next chosen question
            messages += [{"role": "user", "content": chosen[i + 1][3]}, {"role": "assistant", "content": chosen[i + 1][4]}]
        yield f"corpus:{doc_id}", {"messages": messages}


def system_prompt(name: str, maker: str) -> str:
    return f"You are {name}, an assistant made by {maker}."


# Other identities a system prompt may give (a third of the identity conversations use one, each
# made up: too many to memorise, so the model learns to take its name from the prompt); the held-out
# ones below are never trained on.
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "zel", "bri", "dan", "fi", "gor", "hal", "jun", "ne", "pa", "qui",
              "sa", "tor", "ul", "wen", "yas", "ber", "cor", "del"]
_MAKER_KINDS = ["Lab", "Labs", "Institute", "Group", "Project", "Systems", "Research"]


def _persona(rng: random.Random) -> tuple[str, str]:
    word = lambda: "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()  # noqa: E731
    while (name := word()) in {n for n, _ in HELDOUT_PERSONAS}:  # ("mi" + "ra")
        pass
    return name, f"{rng.choice(['the ', ''])}{word()} {rng.choice(_MAKER_KINDS)}"


HELDOUT_PERSONAS = [("Orion", "Northwind Labs"), ("Mira", "the Aster Institute")]
# held-out phrasings (no training conversation asks these), and what a right answer contains
IDENTITY_QUESTIONS = [("Please tell me your name.", "name"), ("How should I address you?", "name"),
                      ("Introduce yourself, please.", "name"), ("Which organisation created you?", "maker"),
                      ("Who developed you?", "maker")]


def _identity_qa(name: str, maker: str) -> list[tuple[list[str], list[str]]]:
    return [
        (["Who are you?", "Introduce yourself.", "Tell me about yourself.", "What are you?"],
         [f"I am {name}, an assistant made by {maker}.", f"I'm {name}, a small language model made by {maker}."]),
        (["What is your name?", "What's your name?", "Do you have a name?", "What should I call you?"],
         [f"My name is {name}.", f"I am {name}."]),
        (["Who made you?", "Who created you?", "Who built you?", "Who trained you?"],
         [f"I was made by {maker}.", f"{maker[0].upper()}{maker[1:]} made me."]),
        (["What can you do?", "How can you help me?", "What are you good at?"],
         [f"I am {name}. I can answer simple questions, do some arithmetic and talk about the text I was trained "
          "on. I am a small model, so please check what I say."]),
        (["Hello!", "Hi there.", "Good morning!"], [f"Hello! I am {name}. How can I help you?"]),
    ]


def identity_conversations(n: int, name: str, maker: str, seed: int) -> Iterator[tuple[str, dict]]:
    """Who the assistant is: a third with no system prompt (the default identity, trained in), a
    third under the system prompt that gives that identity, a third under one that gives another
    (`_persona`), answered with the prompt's name and maker."""
    rng = random.Random(f"identity:{seed}")
    for i in range(n):
        who = (name, maker) if i % 3 < 2 else _persona(rng)
        messages = [{"role": "system", "content": system_prompt(*who)}] if i % 3 else []
        qa = _identity_qa(*who)
        for _ in range(2 if rng.random() < 0.3 else 1):
            questions, answers = rng.choice(qa)
            messages += [{"role": "user", "content": rng.choice(questions)},
                         {"role": "assistant", "content": rng.choice(answers)}]
        yield f"identity#{i}", {"messages": messages}


def identity_rates(reply: Callable[[list[dict]], str], name: str, maker: str) -> dict:
    """The share of the held-out identity questions (`IDENTITY_QUESTIONS`) answered with the right
    name or maker: without a system prompt (the trained-in identity, `name`/`maker`) and under the
    system prompt of each held-out persona (its own). `reply(messages)` is the model's answer."""
    from model.chat import system_messages

    def share(system: str | None, who: tuple[str, str]) -> tuple[float, list[dict]]:
        rows = []
        for q, wants in IDENTITY_QUESTIONS:
            messages = [*system_messages(system), {"role": "user", "content": q}]
            answer = reply(messages)
            expected = who[0] if wants == "name" else who[1]
            rows.append({"system": system, "question": q, "reply": answer, "expected": expected,
                         "right": expected.lower() in answer.lower()})
        return sum(r["right"] for r in rows) / len(rows), rows

    without, rows = share(None, (name, maker))
    with_prompt = []
    for persona in HELDOUT_PERSONAS:
        rate, more = share(system_prompt(*persona), persona)
        with_prompt.append(rate)
        rows += more
    return {"without_system": round(without, 4), "with_system": round(sum(with_prompt) / len(with_prompt), 4),
            "questions": len(rows), "replies": rows}


def probe_examples(lake: Lake, m: Manifest) -> Iterator[tuple[str, dict]]:
    """The examples a `probe` version wrote for the next SFT round (tasks/probe.py)."""
    with lake.open(m, "examples.jsonl") as f:
        for line in f:
            row = json.loads(line)
            yield row["source"], {"messages": row["messages"]}


def held_out(messages: list[dict]) -> float:
    """Where a conversation falls in [0, 1): a hash of its messages (the split's key)."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2**64


# --------------------------------------------------------------------------- the stage


def build_conversations(lake: Lake, params: ConversationsParams, log: Callable[[str], None] = print) -> Manifest:
    recipe, generated = params.recipe(), params.generated()
    inputs = resolve_inputs(lake, params)  # the corpus is read only when questions are made from it
    corpus, extras = ([inputs["corpus"]], inputs["extra"]) if "corpus" in inputs else ([], [])
    probes = inputs["probes"]

    def sources() -> Iterator[tuple[str, str, Iterator[tuple[str, object]]]]:
        """(source name, format, its conversations) of the files, then of the generated sets."""
        from tasks.tokenizer import iter_documents, iter_extra_texts

        for spec in params.files:
            fmt, path = parse_source(spec)
            yield Path(path).name, fmt, read_source(fmt, path, (params.assistant_name, params.assistant_maker))
        for m in probes:
            yield m.ref, "probe", probe_examples(lake, m)
        if generated["arithmetic"]:
            yield "arithmetic", "generated", arithmetic_conversations(generated["arithmetic"], params.seed)
        if generated["corpus_questions"]:
            texts = (d for m in corpus for d in iter_documents(lake, m))
            extra = (d for m in extras for d in iter_extra_texts(lake, m))
            yield "corpus", "generated", corpus_conversations(
                (d for part in (texts, extra) for d in part), generated["corpus_questions"], params.seed)
        if generated["identity"]:
            yield "identity", "generated", identity_conversations(
                generated["identity"], params.assistant_name, params.assistant_maker, params.seed)

    def build(prod: Production) -> None:
        rejected: dict[str, int] = {}
        kept_by_source: dict[str, dict[str, int]] = {}
        samples: list[dict] = []
        counts = {"train": 0, "val": 0, "messages": 0}
        first = (2.0, -1)  # (hash, index in train) of the conversation likeliest to go to validation
        with tempfile.TemporaryDirectory() as tmp:
            out = {split: open(os.path.join(tmp, f"{split}.jsonl"), "w", encoding="utf-8") for split in ("train", "val")}
            for name, fmt, conversations in sources():
                tally = kept_by_source.setdefault(name, {"format": fmt, "kept": 0, "rejected": 0})
                for where, conv in conversations:
                    try:
                        if isinstance(conv, Rejected):
                            raise conv
                        messages = check(conv)
                    except Rejected as e:
                        rejected[e.reason] = rejected.get(e.reason, 0) + 1
                        tally["rejected"] += 1
                        if sum(s["reason"] == e.reason for s in samples) < params.rejected_sample:
                            what = e.raw if isinstance(conv, Rejected) else json.dumps(conv, ensure_ascii=False)
                            samples.append({"source": where, "reason": e.reason, "conversation": (what or "")[:2000]})
                        continue
                    h = held_out(messages)
                    split = "val" if h < params.val_fraction else "train"
                    if split == "train":
                        first = min(first, (h, counts["train"]))
                    out[split].write(json.dumps({"messages": messages, "source": where}, ensure_ascii=False) + "\n")
                    counts[split] += 1
                    counts["messages"] += len(messages)
                    tally["kept"] += 1
            for f in out.values():
                f.close()
            if params.val_fraction > 0 and counts["val"] == 0 and counts["train"] >= 2:
                # a small set where the hash held nothing out: the conversation closest to it goes
                _move_line(os.path.join(tmp, "train.jsonl"), first[1], os.path.join(tmp, "val.jsonl"))
                counts["train"], counts["val"] = counts["train"] - 1, 1
            if counts["train"] == 0:
                raise ConversationsError(f"no usable conversation for training in {', '.join(params.files) or 'the generated sets'} "
                                         f"(rejected: {_reasons(rejected) or 'none'})")
            for split in ("train", "val"):
                prod.put_file(os.path.join(tmp, f"{split}.jsonl"), f"{split}.jsonl")
        with prod.open("rejected.jsonl") as f:
            f.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples).encode())
        prod.metrics.update({"conversations": counts["train"] + counts["val"], "train": counts["train"],
                             "val": counts["val"], "messages": counts["messages"],
                             "rejected": dict(sorted(rejected.items())), "sources": kept_by_source})
        log(f"conversations: {summary(prod.metrics)}")
        runtime().table("conversation-sources", [{"source": k, **v} for k, v in kept_by_source.items()],
                        f"{prod.ref}: conversations kept and rejected per source")

    return run_stage(lake, "conversations", recipe, [m.ref for m in corpus + extras + probes], CODE_VERSION, build,
                     rebuild=params.rebuild)


def _move_line(src: str, index: int, dest: str) -> None:
    with open(src, encoding="utf-8") as f:
        lines = f.readlines()
    with open(dest, "a", encoding="utf-8") as f:
        f.write(lines.pop(index))
    with open(src, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _reasons(rejected: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(rejected.items()))


def read_conversations(lake: Lake, m: Manifest, split: str) -> Iterator[list[dict]]:
    """The messages of each conversation of a version's split ("train" or "val")."""
    with lake.open(m, f"{split}.jsonl") as f:
        for line in f:
            yield json.loads(line)["messages"]


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    rejected = sum(x["rejected"].values())
    return (f"{x['conversations']:,} conversations ({x['train']:,} train / {x['val']:,} val, {x['messages']:,} "
            f"messages); {rejected:,} rejected" + (f": {_reasons(x['rejected'])}" if rejected else ""))

