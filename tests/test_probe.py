"""Stage `probe` (self-interrogation, tasks/probe.py) and its round trip: probe -> refusal examples
-> conversations -> a second sft round that measures refusal and answer rates on the probe's
held-out questions, before and after. Tiny preset, CPU, offline."""

from __future__ import annotations

import json

import pytest

from tasks.lake import Lake
from tasks.probe import (NOT_SURE, ProbeError, ProbeParams, declines, examples, interrogate, made_up_questions, probe,
                         rates, read_questions)
from tests.conftest import copy_version, run_cli


def questions(shared_data, n: int = 12) -> list[dict]:
    """The first n answerable and n unanswerable SelfAware questions."""
    qs = list(read_questions(f"selfaware:{shared_data / 'chat' / 'selfaware.json'}", 10_000))
    return [q for q in qs if q["answerable"]][:n] + [q for q in qs if not q["answerable"]][:n]


def test_rates_are_computed_from_the_replies(shared_data):
    """A model that always answers refuses nothing; one that always declines answers nothing; the
    verdict is the majority of a question's samples; examples teach "not sure" only where an
    unknown question was answered, and the reference answer for known ones."""
    qs = questions(shared_data) + list(made_up_questions(6, seed=0))
    always = interrogate(lambda q, k: "It is Paris, in 1889.", qs, samples=3)
    r = rates(always)
    assert r["refusal_rate_unanswerable"] == 0.0 and r["answer_rate_answerable"] == 1.0
    assert (r["unanswerable"], r["answerable"]) == (18, 12)
    never = rates(interrogate(lambda q, k: "I'm not sure. Could you give me more context?", qs, samples=3))
    assert never["refusal_rate_unanswerable"] == 1.0 and never["answer_rate_answerable"] == 0.0
    # two of three samples decline: declined; one of three: answered; rates count samples
    mixed = interrogate(lambda q, k: "I don't know." if k < 2 else "Yes.", qs[:1], samples=3)
    assert mixed[0]["verdict"] == "declined" and mixed[0]["declined"] == [True, True, False]
    assert rates(mixed)["answer_rate_answerable"] == round(1 / 3, 4)
    # correctness where a reference exists: SelfAware's first answer is "song"
    right = interrogate(lambda q, k: "A Song, I think.", qs[:1], samples=2)
    assert qs[0]["reference"] == ["song"] and rates(right)["correct_rate_answerable"] == 1.0
    made = list(examples(always))
    refusals = [e for e in made if e["messages"][1]["content"] == NOT_SURE]
    assert len(refusals) == 18 and len(made) == 18 + 12
    assert all(e["messages"][0]["content"] == q["question"] for e, q in zip(made, always))
    assert not any(e["messages"][1]["content"] == NOT_SURE for e in examples(
        interrogate(lambda q, k: "not sure", qs, samples=1)))  # declined already: nothing to teach
    assert declines("I am not sure about that") and declines("I don't know.") and not declines("I know Paris.")
    # made-up questions name things that do not exist, never the same twice in a set
    made_up = [q["question"] for q in made_up_questions(200, seed=3)]
    assert len(set(made_up)) > 190 and all(not q["answerable"] for q in made_up_questions(5, 3))


def test_probe_then_a_second_sft_round_measures_before_and_after(demo_local_run, shared_data, tmp_path):
    """probe the demo pipeline's sft model -> its examples in a conversations version -> sft again:
    the round's manifest holds the held-out rates before (the probe's) and after (asked again of
    the new model, the replies kept in uncertainty.jsonl and the rates recomputed from them here)."""
    from tasks.conversations import ConversationsParams, build_conversations, read_conversations
    from tasks.sft import SftParams, sft

    demo = Lake(demo_local_run[0])
    lake = Lake(str(tmp_path / "lake"))
    base = copy_version(demo, lake, demo.resolve("sft").ref)
    qfile = tmp_path / "selfaware.json"
    qfile.write_text(json.dumps({"example": [
        {"question_id": i, "question": q["question"], "answer": q["reference"], "answerable": q["answerable"]}
        for i, q in enumerate(questions(shared_data, 10))]}))
    params = ProbeParams(model=base, files=[f"selfaware:{qfile}"], made_up=10, samples=2, max_new_tokens=10,
                         heldout_fraction=0.3)
    p = probe(lake, params, log=lambda s: None)
    x = p.metrics
    assert p.inputs == [base] and x["questions"] == 30 and x["model"] == base
    held = [json.loads(line) for line in lake.open(p, "heldout.jsonl").read().decode().splitlines()]
    train = [json.loads(line) for line in lake.open(p, "train.jsonl").read().decode().splitlines()]
    assert len(held) + len(train) == 30 and held and not {q["question"] for q in held} & {q["question"] for q in train}
    assert x["heldout"] == rates(held) and all(len(r["replies"]) == 2 for r in held + train)
    assert x["examples"] == len(list(examples(train)))
    assert probe(lake, params, log=lambda s: None).ref == p.ref  # a cache hit

    convs = build_conversations(lake, ConversationsParams(probes=[p.ref]), log=lambda s: None)
    assert convs.inputs == [p.ref] and convs.metrics["sources"][p.ref]["kept"] == x["examples"]
    taught = {c[0]["content"] for split in ("train", "val") for c in read_conversations(lake, convs, split)}
    assert not taught & {q["question"] for q in held}  # held-out questions are never training data

    again = sft(lake, SftParams(model=base, conversations=convs.ref, max_steps=4, batch_size=2, seq_len=128,
                                eval_every=2, eval_steps=1, checkpoint_every=2, sample_tokens=8, nproc_per_node=2),
                log=lambda s: None)
    u = again.metrics["uncertainty"]
    assert u["probe"] == p.ref and u["before"] == x["heldout"]
    after = [json.loads(line) for line in lake.open(again, "uncertainty.jsonl").read().decode().splitlines()]
    assert [r["question"] for r in after] == [r["question"] for r in held]
    assert u["after"] == rates(after) and all(r["declined"] == [declines(t) for t in r["replies"]] for r in after)


def test_bad_probe_input_is_one_line(tmp_path, shared_data):
    with pytest.raises(ValueError, match="expected FORMAT:PATH"):
        ProbeParams(files=[str(shared_data / "chat" / "selfaware.json")])
    with pytest.raises(ValueError, match="no such file"):
        ProbeParams(files=[f"selfaware:{tmp_path / 'none.json'}"])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(ProbeError, match="bad.json: not a selfaware file"):
        list(read_questions(f"selfaware:{bad}", 10))
    lake = str(tmp_path / "lake")
    r = run_cli("--lake", lake, "stage", "probe", "--made-up", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
