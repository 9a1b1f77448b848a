"""Stage `sft`: supervised fine-tuning of a trained model on a `conversations` version.

`torchrun -m model.train --conversations … --init-from …` (model/train.py's SFT mode: the base
model's shape, weights and tokenizer; one conversation a row, rendered by model/chat.py's template;
the loss on the assistant's tokens only), launched and recorded as `pretrain` is (tasks/pretrain.py):
the version's folder holds its checkpoints, so a rerun resumes, and `final/` (weights, config,
tokenizer) like a pretrain version's, so an `sft` version can be fine-tuned again or sampled.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, ClassVar

from pydantic import Field, create_model

from model.config import TrainConfig
from tasks.conversations import read_conversations
from tasks.lake import Lake, Manifest, Production
from tasks.pretrain import TRAIN_FIELDS, launch_training, pydantic_fields, record_training
from tasks.report import runtime
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage

CODE_VERSION = "sft/1"
# a fine-tuning round, not a pretraining run: fewer steps, a lower peak learning rate
SFT_DEFAULTS = {"max_steps": 100, "lr": 1e-4, "warmup_steps": 10, "eval_every": 25, "eval_steps": 4,
                "sample_every": 0, "checkpoint_every": 50}


class _Inputs(StageParams):
    model: str = input_ref("pretrain", "sft", description="the model to fine-tune: a pretrain or sft version "
                                                          "(a ref); default: pretrain@latest")
    conversations: str = input_ref("conversations")


class SftParams(create_model("_SftSettings", __base__=_Inputs, __module__=__name__,
                             **pydantic_fields(TrainConfig, SFT_DEFAULTS, exclude=("preset",)))):
    """The `sft` stage: the model and conversations to fine-tune on, every training setting of
    model/config.py's TrainConfig but `preset` (the shape is the base model's; they make the
    version), and the processes to launch (not part of the version)."""

    system: str = Field("", max_length=8000, description="the system prompt the model is deployed with: `chat` "
                        "uses it unless --system gives another and the sample dialogues are held under it (part of "
                        "the version: a model and how it is deployed)")
    nproc_per_node: int = Field(1, ge=1, le=1024, description="training processes (GPUs)")
    timeout_s: float = Field(24 * 3600, gt=0, description="kill the training after this many seconds")
    nnodes: ClassVar[int] = 1  # one node (torchrun --standalone)
    rdzv_endpoint: ClassVar[str | None] = None

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.model_dump(include=set(TRAIN_FIELDS)))  # preset: the trainer takes the base's

    def recipe(self) -> dict:
        deployed = {"system": self.system} if self.system else {}  # versions without one keep their ids
        return {**self.model_dump(mode="json", include=set(TRAIN_FIELDS)), **deployed}


def sft(lake: Lake, params: SftParams, log: Callable[[str], None] = print) -> Manifest:
    inputs = resolve_inputs(lake, params)
    base, conversations = inputs["model"], inputs["conversations"]

    def build(prod: Production) -> None:
        args = ["--conversations", lake.uri(conversations.kind, conversations.version),
                "--init-from", lake.uri(base.kind, base.version, "final")]
        progress = launch_training(lake, params, base, prod.version, log, "launching", kind="sft", inputs=args)
        record_training(lake, prod, progress)
        prod.metrics["conversations"] = conversations.metrics.get("train")
        prod.metrics["dialogues"] = sample_dialogues(lake, prod, conversations, params)
        runtime().markdown("sft-dialogues", dialogues_markdown(prod.ref, prod.metrics["dialogues"]),
                           f"{prod.ref}: its replies to held-out questions")
        assistant = conversations.params.get("assistant")  # recorded when it teaches an identity
        if assistant:
            prod.metrics["identity"] = measure_identity(lake, prod, base, *assistant, log=log)
        held = [c for c in read_conversations(lake, conversations, "val") if c[0]["role"] == "passage"]
        if held:
            prod.metrics["context"] = measure_context(lake, prod, base, held, log)
        probes = [lake.resolve(ref) for ref in conversations.inputs if ref.startswith("probe@")]
        if probes:
            prod.metrics["uncertainty"] = measure_uncertainty(lake, prod, probes[0], log)

    return run_stage(lake, "sft", params.recipe(), [base.ref, conversations.ref], CODE_VERSION, build,
                     rebuild=params.rebuild)


def sample_dialogues(lake: Lake, prod: Production, conversations: Manifest, params: SftParams,
                     count: int = 3) -> list[dict]:
    """The fine-tuned model's replies to the first user message of `count` held-out conversations
    (the training ones when none is held out), beside the reference reply: seeded, so the same
    version shows the same dialogues."""
    from model.chat import fit_context, reply_text, system_messages
    from model.sample import load

    model, _, sp = load(prod.uri("final"), device="cpu", fs=lake.fs)  # the lake's fs: its credentials
    held = list(itertools.islice(read_conversations(lake, conversations, "val"), count)) or \
        list(itertools.islice(read_conversations(lake, conversations, "train"), count))
    deployed = system_messages(params.system)  # replaces a conversation's own prompt; without it, that stays
    out = []
    for i, conv in enumerate(held):
        first = next(j for j, m in enumerate(conv) if m["role"] == "user")
        limit = model.config.seq_len - min(params.sample_tokens, model.config.seq_len // 4)
        try:
            messages, _ = fit_context(sp, [*deployed, *(m for m in conv[:first + 1]
                                                        if not (deployed and m["role"] == "system"))], limit)
        except ValueError:
            continue  # a question that leaves no room for a reply in the context: not shown
        reply = reply_text(model, sp, messages, params.sample_tokens, params.temperature, params.top_k, None,
                           params.seed + i)
        out.append({"user": conv[first]["content"], "assistant": reply,
                    "reference": conv[first + 1]["content"] if first + 1 < len(conv) else None})
    return out


_STOP = set("about above after again also because been before being below between both could does doing during "
             "each from further have having into itself more most other over same should some such than that their "
             "them then there these they this those through under until very what when where which while with "
             "would your tell know explain".split())


def key_words(answer: str, question: str) -> set[str]:
    """The words of an answer's first sentence a reply should repeat: 4+ letters, not in the
    question, not common."""
    first = answer.split(". ")[0].lower()
    asked = set(re.findall(r"[a-z]+", question.lower()))
    return {w for w in re.findall(r"[a-z]{4,}", first) if w not in asked and w not in _STOP}


def record_before_after(prod: Production, base: Manifest, result: dict, name: str, rows: list[dict], table: str,
                        what: str) -> None:
    """A measurement's replies (of the fine-tuned model) as JSON lines in the version, and its
    before/after rates as a Prefect table artifact."""
    import json

    with prod.open(name) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    runtime().table(table, [{"measured": f"{w} ({base.ref if w == 'before' else prod.ref})", **result[w]}
                            for w in ("before", "after")], f"{prod.ref}: {what}")


def measure_context(lake: Lake, prod: Production, base: Manifest, held: list[list[dict]],
                    log: Callable[[str], None]) -> dict:
    """Held-out questions whose answer is in a passage of the corpus (the conversations' val split),
    asked greedily with the passage in the context and without, of the base model (before) and the
    fine-tuned one (after): the share of replies with at least half of the answer's key words."""
    from model.chat import reply_text
    from model.sample import load

    result, rows = {"questions": len(held)}, []
    for when, uri in (("before", lake.file_uri(base, "final")), ("after", prod.uri("final"))):
        model, _, sp = load(uri, device="cpu", fs=lake.fs)
        rates = {}
        for mode in ("with_passage", "without_passage"):
            right = 0
            for conv in held:
                passage, question, answer = conv[0], conv[1], conv[2]["content"]
                messages = [passage, question] if mode == "with_passage" else [question]
                reply = reply_text(model, sp, messages, 48, 0.0, None, None, 0)
                words = key_words(answer, question["content"])
                hit = bool(words) and sum(w in reply.lower() for w in words) * 2 >= len(words)
                right += hit
                if when == "after":
                    rows.append({"mode": mode, "question": question["content"], "reply": reply,
                                 "key_words": sorted(words), "right": hit})
            rates[mode] = round(right / len(held), 4)
        result[when] = rates
    record_before_after(prod, base, result, "context.jsonl", rows, "working-memory",
                        "held-out corpus questions answered with the passage's key words")
    log(f"sft: answered with the key words, with the passage {result['before']['with_passage']:.0%} -> "
        f"{result['after']['with_passage']:.0%}, without {result['before']['without_passage']:.0%} -> "
        f"{result['after']['without_passage']:.0%} ({len(held)} held-out questions)")
    return result


def measure_identity(lake: Lake, prod: Production, base: Manifest, name: str, maker: str,
                     log: Callable[[str], None]) -> dict:
    """Held-out identity questions (tasks/conversations.py: identity_rates), greedy, of the base
    model (before) and the fine-tuned one (after): answered with the trained-in name and maker
    without a system prompt, and with a held-out persona's under its system prompt."""
    from model.chat import reply_text
    from model.sample import load
    from tasks.conversations import identity_rates

    result = {"name": name, "maker": maker}
    for when, uri in (("before", lake.file_uri(base, "final")), ("after", prod.uri("final"))):
        model, _, sp = load(uri, device="cpu", fs=lake.fs)
        rates = identity_rates(lambda messages: reply_text(model, sp, messages, 32, 0.0, None, None, 0), name, maker)
        result[when] = {k: v for k, v in rates.items() if k != "replies"}
    record_before_after(prod, base, result, "identity.jsonl", rates["replies"], "identity",
                        "held-out identity questions answered with the right name or maker")
    log(f"sft: identity without a system prompt {result['before']['without_system']:.0%} -> "
        f"{result['after']['without_system']:.0%}, with a held-out one {result['before']['with_system']:.0%} -> "
        f"{result['after']['with_system']:.0%}")
    return result


def measure_uncertainty(lake: Lake, prod: Production, probe_m: Manifest, log: Callable[[str], None]) -> dict:
    """The probe's held-out questions asked again, of the fine-tuned model, as the probe asked
    them (tasks/probe.py): refusal and answer rates before (the probed model) and after (this one)."""
    import json
    import types

    from model.sample import load
    from tasks.probe import interrogate, model_asker, publish, rates

    with lake.open(probe_m, "heldout.jsonl") as f:
        questions = [{k: v for k, v in json.loads(line).items() if k not in ("replies", "declined", "correct", "verdict")}
                     for line in f]
    model, _, sp = load(prod.uri("final"), device="cpu", fs=lake.fs)
    asked = types.SimpleNamespace(**probe_m.params)
    after = interrogate(model_asker(model, sp, asked), questions, asked.samples)
    with prod.open("uncertainty.jsonl") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in after).encode())
    result = {"probe": probe_m.ref, "before": probe_m.metrics["heldout"], "after": rates(after)}
    publish(prod.ref, {f"before ({probe_m.metrics['model']})": result["before"], f"after ({prod.ref})": result["after"]})
    b, a = result["before"], result["after"]
    log(f"sft: on {len(questions)} held-out questions of {probe_m.ref}: refusal rate on unanswerable "
        f"{b['refusal_rate_unanswerable']} -> {a['refusal_rate_unanswerable']}, answer rate on answerable "
        f"{b['answer_rate_answerable']} -> {a['answer_rate_answerable']}")
    return result


def dialogues_markdown(ref: str, dialogues: list[dict]) -> str:
    lines = [f"# Sample dialogues of `{ref}`", ""]
    for d in dialogues:
        lines += [f"**user:** {d['user']}", "", f"**assistant:** {d['assistant']}", ""]
        if d.get("reference"):
            lines += [f"_reference:_ {d['reference']}", ""]
    return "\n".join(lines)


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    val = f", val loss {x['val_loss']}" if x.get("val_loss") is not None else ""
    return f"{x['steps']} steps on {x.get('conversations') or '?'} conversations, loss {x['final_loss']}{val}"
