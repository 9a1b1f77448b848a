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
  turns the assistant's (a trailing user turn, which has no reply, is left out).

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
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from pydantic import Field, field_validator

from tasks.errors import StageError
from tasks.ingest import sha256_file
from tasks.lake import Lake, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, run_stage

CODE_VERSION = "conversations/1"
FORMATS = ("messages", "gsm8k", "sgd")
ROLES = ("system", "user", "assistant")


class ConversationsError(StageError):
    """Nothing usable came out of the sources."""


def parse_source(spec: str) -> tuple[str, str]:
    """'gsm8k:path' -> ('gsm8k', 'path'); a path alone is `messages`."""
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        return head, rest
    return "messages", spec


class ConversationsParams(StageParams):
    """Conversation files to validate, convert and split."""

    files: list[str] = Field(min_length=1, description="local files, each FORMAT:PATH or PATH (messages JSONL); "
                             f"formats: {', '.join(FORMATS)}")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="conversations held out for validation")
    rejected_sample: int = Field(20, ge=0, le=10_000, description="rejected conversations kept per reason")

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
        return {"sources": sources, "val_fraction": self.val_fraction, "rejected_sample": self.rejected_sample}


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


def read_source(fmt: str, path: str) -> Iterator[tuple[str, object]]:
    """(where, a conversation dict or Rejected) for every conversation of one source file."""
    name = Path(path).name
    if fmt == "sgd":
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
        for i, d in enumerate(dialogues):
            where = f"{name}#{d.get('dialogue_id', i) if isinstance(d, dict) else i}"
            try:
                yield where, from_sgd(d)
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


def held_out(messages: list[dict]) -> float:
    """Where a conversation falls in [0, 1): a hash of its messages (the split's key)."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2**64


# --------------------------------------------------------------------------- the stage


def build_conversations(lake: Lake, params: ConversationsParams, log: Callable[[str], None] = print) -> Manifest:
    recipe = params.recipe()

    def build(prod: Production) -> None:
        rejected: dict[str, int] = {}
        kept_by_source: dict[str, dict[str, int]] = {}
        samples: list[dict] = []
        counts = {"train": 0, "val": 0, "messages": 0}
        first = (2.0, -1)  # (hash, index in train) of the conversation likeliest to go to validation
        with tempfile.TemporaryDirectory() as tmp:
            out = {split: open(os.path.join(tmp, f"{split}.jsonl"), "w", encoding="utf-8") for split in ("train", "val")}
            for spec in params.files:
                fmt, path = parse_source(spec)
                tally = kept_by_source.setdefault(Path(path).name, {"format": fmt, "kept": 0, "rejected": 0})
                for where, conv in read_source(fmt, path):
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
                raise ConversationsError(f"no usable conversation for training in {', '.join(params.files)} "
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

    return run_stage(lake, "conversations", recipe, [], CODE_VERSION, build, rebuild=params.rebuild)


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

