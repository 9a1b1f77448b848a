"""Supervised fine-tuning in model/train.py (`--conversations --init-from`): it starts from the
base model's weights, its loss is the chat template's assistant-only loss, and a killed run
resumes the identical loss curve. The `sft` stage and `chat` are still to come (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tasks.conversations import ConversationsParams, build_conversations
from tasks.lake import Lake
from tests.conftest import BIN, run_cli

pytestmark = pytest.mark.slow


def sft_command(convs: str, base: str, out: str, *extra: str, ranks: int = 1) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", "-m", "model.train",
            "--conversations", convs, "--init-from", base, "--out", out, "--batch-size", "4", "--seq-len", "128",
            "--seed", "3", "--lr", "1e-4", "--sample-every", "0", "--eval-every", "10", "--eval-steps", "2", *extra]


def history(out) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def sft_inputs(demo_local_run, shared_data, tmp_path_factory):
    """300 GSM8K conversations and the demo run's pretrained model."""
    work = tmp_path_factory.mktemp("sft")
    lines = (shared_data / "chat" / "gsm8k-test.jsonl").read_text().splitlines(keepends=True)[:300]
    (work / "gsm8k.jsonl").write_text("".join(lines))
    lake = Lake(str(work / "lake"))
    m = build_conversations(lake, ConversationsParams(files=[f"gsm8k:{work / 'gsm8k.jsonl'}"]), log=lambda s: None)
    demo = Lake(demo_local_run[0])
    base = demo.path("pretrain", demo.resolve("pretrain").version, "final")
    return {"convs": lake.path(m.kind, m.version), "base": base, "work": work}


def test_sft_starts_from_the_base_model_and_learns_the_replies_only(sft_inputs, tmp_path):
    from model.chat import ConversationLoader, render_conversation
    from model.sample import load

    out = tmp_path / "out"
    r = subprocess.run(sft_command(sft_inputs["convs"], sft_inputs["base"], str(out), "--max-steps", "10",
                                   "--checkpoint-every", "10"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = history(out)
    # step 1's loss is the base model's assistant-only loss on the first batch: the weights were
    # loaded and the mask applied (the same rows, rendered and shuffled as the trainer does)
    model, config, sp = load(sft_inputs["base"], device="cpu")
    with open(f"{sft_inputs['convs']}/train.jsonl") as f:
        rendered = [render_conversation(sp, json.loads(line)["messages"]) for line in f]
    x, y = ConversationLoader(rendered, 4, 128, sp.piece_to_id("<|pad|>"), seed=3).next_batch()
    with torch.no_grad():
        _, loss = model(x, y)
    assert abs(steps[0]["loss"] - loss.item()) < 1e-4, (steps[0]["loss"], loss.item())
    assert steps[-1]["val_loss"] < 20 and (out / "final" / "model.safetensors").exists()
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["vocab_size"] == config["vocab_size"] and final["tokenizer"] == "tokenizer.model"


def test_a_killed_sft_run_resumes_the_identical_loss_curve(sft_inputs, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ("--max-steps", "20", "--checkpoint-every", "5")
    r = subprocess.run(sft_command(sft_inputs["convs"], sft_inputs["base"], str(whole), *args, ranks=2),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(sft_command(sft_inputs["convs"], sft_inputs["base"], str(killed), *args, ranks=2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000010").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(sft_command(sft_inputs["convs"], sft_inputs["base"], str(killed), *args, ranks=2),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-3000:]
    assert [(h["step"], h["loss"], h.get("val_loss")) for h in history(killed)] == \
        [(h["step"], h["loss"], h.get("val_loss")) for h in history(whole)]


def test_sft_arguments_go_together(tmp_path):
    r = subprocess.run([sys.executable, "-m", "model.train", "--conversations", str(tmp_path), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--conversations and --init-from go together" in r.stderr
    # the stage's command: its `--model` option is a parameter like any other (it once collided with
    # the CLI's own argument name); a bad value is one line before any work
    lake = str(tmp_path / "lake")
    r = run_cli("--lake", lake, "stage", "sft", "--model", "pretrain@nothing", "--max-steps", "5")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: unknown artifact kind 'pretrain' in lake {lake}"], r.stderr
    r = run_cli("--lake", lake, "stage", "sft", "--max-steps", "0")
    assert r.returncode == 2 and "invalid max-steps: Input should be greater than or equal to 1" in r.stderr, r.stderr


def test_the_sft_stage_commits_a_chat_model_with_its_lineage(demo_local_run, sft_inputs, tmp_path):
    """`stage sft` on the demo's pretrain version and 300 GSM8K conversations: a version whose
    lineage holds both, whose final/ model loads like a pretrain's, and whose rerun is a cache hit."""
    from model.sample import load
    from tasks.sft import SftParams, sft
    from tests.conftest import copy_version

    lake = Lake(str(tmp_path / "lake"))
    base = copy_version(Lake(demo_local_run[0]), lake, "pretrain")
    convs = build_conversations(lake, ConversationsParams(files=[f"gsm8k:{sft_inputs['work'] / 'gsm8k.jsonl'}"]),
                                log=lambda s: None)
    params = SftParams(model=base, conversations=convs.ref, max_steps=6, eval_every=3, eval_steps=1, batch_size=4,
                       seq_len=128, nproc_per_node=2, checkpoint_every=3)
    m = sft(lake, params, log=lambda s: None)
    assert m.kind == "sft" and m.inputs == [base, convs.ref]
    assert m.metrics["steps"] == 6 and m.metrics["val_loss"] is not None and m.metrics["conversations"] == convs.metrics["train"]
    assert {"final/model.safetensors", "final/config.json", "final/tokenizer.model", "loss.png"} <= {f["path"] for f in m.files}
    model, config, sp = load(lake.path("sft", m.version, "final"), device="cpu")
    base_config = json.loads(open(lake.path("pretrain", Lake(demo_local_run[0]).resolve("pretrain").version,
                                            "final", "config.json")).read())
    assert {k: config[k] for k in ("n_layer", "n_embd", "vocab_size")} == \
        {k: base_config[k] for k in ("n_layer", "n_embd", "vocab_size")}
    # its replies to held-out questions, beside the reference answers (the Prefect artifact shows them)
    from tasks.conversations import read_conversations

    held = [c[0]["content"] for c in read_conversations(lake, convs, "val")][:3]
    shown = [d["user"] for d in m.metrics["dialogues"]]  # those that leave room for a reply in 128 tokens
    assert shown and shown == [q for q in held if q in shown]
    assert all(isinstance(d["assistant"], str) for d in m.metrics["dialogues"])
    assert all(d["reference"].endswith(".") for d in m.metrics["dialogues"])
    assert sft(lake, params, log=lambda s: None).created_at == m.created_at  # the same version: a cache hit
    lineage = json.dumps(lake.lineage(m.ref))
    assert base in lineage and convs.ref in lineage and "shard@" in lineage


def test_chat_in_a_terminal_and_for_scripts(demo_local_run):
    """`crawl2model chat` through a pseudo-terminal: a system prompt, two turns streamed back,
    /reset, /quit; `--prompt --json` answers one turn, the same reply for the same seed; a
    conversation longer than the context drops its oldest turns and says so."""
    import pty
    import select

    lake = demo_local_run[0]  # its pipeline ended with sft: the default model, sft@latest
    cmd = [str(BIN / "crawl2model"), "--lake", lake, "chat", "--system", "You are Lakeside.", "--max-new-tokens", "24"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def until(marker: bytes, count: int, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < count:
            assert time.time() < deadline, seen.decode(errors="replace")[-2000:]
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    until(b"you> ", 1)
    assert f"chatting with {Lake(lake).resolve('sft').ref}".encode() in seen
    for n, line in enumerate([b"What is 2 + 2?\n", b"And 3 + 3?\n", b"/reset\n"], start=2):
        os.write(master, line)
        until(b"you> ", n)
    os.write(master, b"/quit\n")
    assert proc.wait(60) == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert text.count("assistant> ") == 2 and "(a new conversation)" in text

    one = [*cmd[:3], "chat", "--model", "sft@latest", "--prompt", "What is 2 + 2?", "--json", "--seed", "7",
           "--max-new-tokens", "16"]
    a, b = (subprocess.run(one, capture_output=True, text=True, timeout=120) for _ in range(2))
    assert a.returncode == 0 and json.loads(a.stdout)["reply"] == json.loads(b.stdout)["reply"], a.stderr[-2000:]
    assert json.loads(a.stdout)["dropped_messages"] == 0

    from model.chat import fit_context, render_for_reply
    from tasks.tokenizer import load, tokenizer_path

    demo = Lake(lake)
    sp = load(tokenizer_path(demo, demo.resolve("tokenizer").ref))
    long = [{"role": "system", "content": "You are Lakeside."}]
    for i in range(12):
        long += [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    long.append({"role": "user", "content": "The last question?"})
    kept, dropped = fit_context(sp, long, 64)
    assert kept[0] == long[0] and kept[-1] == long[-1] and len(render_for_reply(sp, kept)) <= 64
    assert dropped > 0 and kept[1:] == long[1 + dropped:] and kept[1]["role"] == "user"
    with pytest.raises(ValueError, match="the model's context holds 8"):
        fit_context(sp, long, 8)


def test_the_pipelines_sft_measures_identity_before_and_after(demo_local_run):
    """The demo pipeline's conversations include identity ones, so its sft round asks the held-out
    identity questions (greedy) of the base model and of itself, without a system prompt and under
    held-out personas' prompts: the rates in the manifest are those of the replies it kept."""
    from tasks.conversations import HELDOUT_PERSONAS, IDENTITY_QUESTIONS

    lake = Lake(demo_local_run[0])
    m = lake.resolve("sft")
    ident = m.metrics["identity"]
    assert (ident["name"], ident["maker"]) == ("Crawly", "the crawl2model project")
    n = len(IDENTITY_QUESTIONS)
    assert ident["before"]["questions"] == ident["after"]["questions"] == n * (1 + len(HELDOUT_PERSONAS))
    with lake.open(m, "identity.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["right"] for r in rows] == [r["expected"].lower() in r["reply"].lower() for r in rows]
    assert ident["after"]["without_system"] == round(sum(r["right"] for r in rows[:n]) / n, 4)
    assert ident["after"]["with_system"] == round(sum(r["right"] for r in rows[n:]) / (len(rows) - n), 4)
    assert {r["system"] for r in rows[n:]} == {f"You are {a}, an assistant made by {b}." for a, b in HELDOUT_PERSONAS}


def test_the_pipelines_sft_measures_working_memory_when_it_has_passage_questions(demo_local_run):
    """Held-out corpus questions with their passage (the conversations' val split): asked with and
    without the passage, before and after; the rates are those of the replies kept."""
    from tasks.conversations import read_conversations
    from tasks.sft import key_words

    lake = Lake(demo_local_run[0])
    m = lake.resolve("sft")
    convs = lake.resolve(next(r for r in m.inputs if r.startswith("conversations@")))
    held = [c for c in read_conversations(lake, convs, "val") if c[0]["role"] == "passage"]
    if not held:
        assert "context" not in m.metrics
        return
    x = m.metrics["context"]
    assert x["questions"] == len(held) and set(x["before"]) == set(x["after"]) == {"with_passage", "without_passage"}
    with lake.open(m, "context.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 * len(held)
    for r in rows:
        words = set(r["key_words"])
        assert r["right"] == (bool(words) and sum(w in r["reply"].lower() for w in words) * 2 >= len(words))
    for mode in ("with_passage", "without_passage"):
        mine = [r["right"] for r in rows if r["mode"] == mode]
        assert x["after"][mode] == round(sum(mine) / len(mine), 4)
    assert key_words("A ledger is a book of accounts kept by wardens. More.", "What is a ledger?") == \
        {"book", "accounts", "kept", "wardens"}
