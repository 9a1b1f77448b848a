"""model/: the GPT, the trainer under torchrun (2 CPU processes, gloo) and sampling, on real
text (tinyshakespeare) tokenised with a sentencepiece BPE trained here and written in the
shard format (meta.json + Parquet `tokens` list<uint16>)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
BIN = Path(sys.executable).parent

# The tiny run every torchrun test shares: 2 ranks x 4 x 64 tokens, 2 micro-steps per step.
STEPS = 30
TRAIN_ARGS = ["--preset", "tiny", "--max-steps", str(STEPS), "--batch-size", "4", "--seq-len", "64",
              "--tokens-per-step", "1024", "--lr", "3e-3", "--warmup-steps", "5",
              "--eval-every", "15", "--eval-steps", "4", "--checkpoint-every", "10",
              "--keep-checkpoints", "2", "--sample-every", str(STEPS), "--sample-tokens", "24",
              "--prompt", "ROMEO:", "--seed", "7"]


# -- the shard folder ---------------------------------------------------------------------

def build_shards(folder: Path, vocab_size: int = 512) -> Path:
    """Train a BPE on tinyshakespeare and write it as a `shard` artifact; returns the .model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "tok"
    spm.SentencePieceTrainer.train(
        input=str(TEXT), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        input_sentence_size=20000, shuffle_input_sentence=False, num_threads=2,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    text = TEXT.read_text()
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    rows = [[sp.bos_id()] + sp.encode(d) for d in docs]
    n_val = len(rows) // 20
    splits = {"val": rows[:n_val], "train": rows[n_val:]}
    meta = {"vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "dtype": "uint16", "splits": {}}
    total_tokens = sum(len(r) for r in rows)
    meta["bytes_per_token"] = sum(len(d.encode()) for d in docs) / total_tokens
    for split, split_rows in splits.items():
        (folder / split).mkdir(exist_ok=True)
        n_files = 2 if split == "train" else 1
        per = -(-len(split_rows) // n_files)
        files = []
        for i in range(n_files):
            part = split_rows[i * per:(i + 1) * per]
            table = pa.table({"tokens": pa.array(part, type=pa.list_(pa.uint16()))})
            name = f"{split}/shard-{i:05d}.parquet"
            pq.write_table(table, folder / name, row_group_size=500)
            files.append(name)
        meta["splits"][split] = {"files": files, "documents": len(split_rows),
                                 "tokens": sum(len(r) for r in split_rows)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return Path(f"{prefix}.model")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    tok = build_shards(folder)
    return folder, tok


# -- running the trainer ------------------------------------------------------------------

def torchrun_cmd(data, out, *extra, nproc=2):
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "-m", "model.train",
            "--data", str(data), "--out", str(out), *TRAIN_ARGS, *extra]


def env():
    return {**os.environ, "C2M_PARAM_HASH": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def steps_of(stdout: str) -> dict[int, dict]:
    out = {}
    for line in stdout.splitlines():
        rec = json.loads(line)  # stdout is JSON lines only
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def no_abort(proc) -> None:
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    """One uninterrupted 2-rank run: the reference the other tests compare with."""
    data, tok = shards
    out = tmp_path_factory.mktemp("run") / "out"
    proc = subprocess.run(torchrun_cmd(data, out, "--tokenizer", str(tok)), capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=300)
    no_abort(proc)
    return out, proc


def test_two_ranks_train_and_agree(full_run):
    out, proc = full_run
    steps = steps_of(proc.stdout)
    assert sorted(steps) == list(range(1, STEPS + 1))
    first = sum(steps[s]["loss"] for s in range(1, 4)) / 3
    last = sum(steps[s]["loss"] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < first - 1.0, (first, last)           # ln(512) = 6.2 at the start
    assert "val_loss" in steps[15] and "val_bpb" in steps[STEPS]
    assert steps[STEPS]["val_loss"] < steps[15]["val_loss"]
    assert all(rec["tokens_per_s"] > 0 and "mfu" not in rec for rec in steps.values())
    hashes = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"rank"')]
    assert sorted(h["rank"] for h in hashes) == [0, 1]
    assert hashes[0]["param_sha256"] == hashes[1]["param_sha256"]
    # samples are logged as JSON and decoded with the tokenizer
    samples = [json.loads(line) for line in proc.stdout.splitlines() if '"samples"' in line]
    assert samples and samples[0]["samples"][0]["text"].startswith("ROMEO:")
    # outputs
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000020", "step-000030"]      # keeps the last 2
    last_ckpt = out / "checkpoints" / "step-000030"
    assert {p.name for p in last_ckpt.iterdir()} == {
        "model.safetensors", "optimizer.pt", "config.json", "trainer.json", "rank-00000.pt", "rank-00001.pt"}
    assert {p.name for p in (out / "final").iterdir()} == {"model.safetensors", "config.json", "tokenizer.model"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["loss"] for h in metrics["history"]] == [steps[s]["loss"] for s in range(1, STEPS + 1)]


def worker_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def test_sigkill_then_resume_matches(shards, full_run, tmp_path):
    data, tok = shards
    ref = steps_of(full_run[1].stdout)
    out = tmp_path / "out"
    log = open(tmp_path / "stdout", "w+")
    proc = subprocess.Popen(torchrun_cmd(data, out, "--tokenizer", str(tok)), stdout=log,
                            stderr=subprocess.DEVNULL, env=env(), cwd=ROOT, start_new_session=True)
    deadline = time.time() + 120
    try:
        # kill once step 10's checkpoint is committed and a few more steps have run
        while time.time() < deadline:
            if (out / "checkpoints" / "step-000010" / "trainer.json").exists() and \
                    len(steps_of(Path(log.name).read_text())) >= 13:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        victims = worker_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group ...
        for pid in victims:                  # ... and its workers (torchrun gives them own sessions)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = max(steps_of(Path(log.name).read_text()))
    assert killed_at < STEPS
    rerun = subprocess.run(torchrun_cmd(data, out, "--tokenizer", str(tok)), capture_output=True,
                           text=True, env=env(), cwd=ROOT, timeout=300)
    no_abort(rerun)
    assert "resuming from" in rerun.stderr
    resumed = steps_of(rerun.stdout)
    assert min(resumed) in (11, 21) and max(resumed) == STEPS
    for s, rec in resumed.items():   # the identical loss curve, bit for bit
        assert rec["loss"] == ref[s]["loss"], (s, rec["loss"], ref[s]["loss"])
        assert rec.get("val_loss") == ref[s].get("val_loss")
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["loss"] for h in metrics["history"]] == [ref[s]["loss"] for s in range(1, STEPS + 1)]
    from safetensors.torch import load_file
    a, b = load_file(out / "final" / "model.safetensors"), load_file(full_run[0] / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every checkpoint written after the resume is byte-identical to the uninterrupted run's,
    # the optimizer state included (a resumed AdamW once saved its betas as a list, not a tuple)
    for ckpt in ("step-000020", "step-000030"):
        for f in sorted((full_run[0] / "checkpoints" / ckpt).iterdir()):
            assert (out / "checkpoints" / ckpt / f.name).read_bytes() == f.read_bytes(), f"{ckpt}/{f.name}"


def test_sample(full_run):
    from model.sample import generate_text

    model_dir = full_run[0] / "final"
    text = generate_text(model_dir, "ROMEO:", max_new_tokens=30, temperature=0.8, top_k=40, top_p=0.95, seed=3)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert text == generate_text(model_dir, "ROMEO:", 30, 0.8, 40, 0.95, 3)  # seeded
    proc = subprocess.run([sys.executable, "-m", "model.sample", "--model", str(model_dir),
                           "--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "0.8",
                           "--top-k", "40", "--top-p", "0.95", "--seed", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == text


def test_kv_cache_matches_full_forward():
    from model.gpt import GPT, config_from_preset

    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=97, seq_len=32)).eval()
    idx = torch.randint(0, 97, (2, 5))
    out = model.generate(idx, 20, temperature=0)
    ref = idx
    for _ in range(20):
        logits, _ = model(ref, targets=torch.zeros_like(ref))
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    assert model.flops_per_token() > 6 * model.num_params(non_embedding=True)


# -- bad input ----------------------------------------------------------------------------

def train_inproc(capsys, *argv) -> tuple[int, str]:
    from model.train import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_bad_inputs(shards, full_run, tmp_path, capsys):
    data, _ = shards
    base = ["--data", data, "--out", tmp_path / "o", "--preset", "tiny", "--max-steps", "2"]
    code, err = train_inproc(capsys, *base, "--vocab-size", "300")
    assert code == 2 and "vocab_size 300 is smaller than the shards' vocab_size 512" in err
    code, err = train_inproc(capsys, *base, "--batch-size", "4", "--seq-len", "64", "--tokens-per-step", "1000")
    assert code == 2 and "does not divide" in err
    code, err = train_inproc(capsys, *base, "--seq-len", "1024")
    assert code == 2 and "exceeds the model's seq_len 512" in err
    code, err = train_inproc(capsys, "--data", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert code == 2 and "cannot read the shard folder" in err
    # resuming with a changed configuration: refused, naming the fields
    code, err = train_inproc(capsys, "--data", data, "--out", full_run[0], *TRAIN_ARGS, "--lr", "1e-3",
                             "--check")
    assert code == 2 and "train.lr 0.003 -> 0.001" in err and "world_size 2 -> 1" in err
    assert all(len(line) < 400 for line in err.splitlines())
    # errors are one line, no traceback
    assert "Traceback" not in err


def test_nan_loss_stops(shards, tmp_path, capsys):
    data, _ = shards
    code, err = train_inproc(capsys, "--data", data, "--out", tmp_path / "o", "--preset", "tiny",
                             "--max-steps", "20", "--batch-size", "2", "--seq-len", "32", "--lr", "1e6",
                             "--warmup-steps", "0", "--grad-clip", "0", "--eval-every", "0",
                             "--checkpoint-every", "1", "--keep-checkpoints", "1")
    assert code == 1 and "the loss is nan" in err.lower(), err
    kept = [p.name for p in (tmp_path / "o" / "checkpoints").iterdir()]
    assert len(kept) == 1 and f"last good checkpoint: {tmp_path / 'o' / 'checkpoints' / kept[0]}" in err


def test_bad_input_under_torchrun_tears_down(shards, tmp_path):
    """Both ranks stop with the same error and exit cleanly (no gloo abort)."""
    data, _ = shards
    proc = subprocess.run(torchrun_cmd(data, tmp_path / "o", "--seq-len", "1024"), capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=120)
    assert "terminate called" not in proc.stderr
    assert proc.returncode != 0 and "exceeds the model's seq_len" in proc.stderr


def test_teardown_repeatedly(shards, tmp_path):
    """gloo's rank 0 used to abort now and then at exit ("terminate called without an active
    exception") when the process group was not destroyed: two more short runs, both clean (every
    other torchrun of this file checks the same with `no_abort`)."""
    data, _ = shards
    for i in range(2):
        proc = subprocess.run(torchrun_cmd(data, tmp_path / f"o{i}", "--max-steps", "2", "--eval-every", "1"),
                              capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
        no_abort(proc)


def test_fsdp_resume_matches(shards, tmp_path):
    """FSDP2 (fully_shard, gloo on CPU) with activation checkpointing: trains, gathers the
    sharded state into a checkpoint, and resumes from it onto the identical curve."""
    data, _ = shards
    out = tmp_path / "o"
    cmd = torchrun_cmd(data, out, "--max-steps", "6", "--checkpoint-every", "3", "--keep-checkpoints", "3",
                       "--eval-every", "3", "--sample-every", "0", "--fsdp", "--activation-checkpointing")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    no_abort(first)
    import shutil
    shutil.rmtree(out / "checkpoints" / "step-000006")
    shutil.rmtree(out / "final")
    second = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    no_abort(second)
    a, b = steps_of(first.stdout), steps_of(second.stdout)
    assert sorted(b) == [4, 5, 6] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    hashes = {json.loads(line)["param_sha256"] for proc in (first, second)
              for line in proc.stderr.splitlines() if line.startswith('{"rank"')}
    assert len(hashes) == 1


def test_lr_schedules():
    from dataclasses import replace

    from model.train import lr_at, parse_args

    cfg = parse_args(["--data", "d", "--out", "o", "--max-steps", "100", "--warmup-steps", "10", "--lr", "1.0",
                      "--min-lr-ratio", "0.1"]).cfg
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[99] >= 0.1 and lrs[99] < 0.11
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))           # cosine: falls after warmup
    cfg = replace(cfg, schedule="wsd")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert set(lrs[9:80]) == {1.0} and lrs[99] < 0.15 and all(x >= y for x, y in zip(lrs[80:], lrs[81:]))


class _Payload:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_not_run(shards, tmp_path, capsys):
    data, _ = shards
    out, marker = tmp_path / "o", tmp_path / "pwned"
    args = ["--data", data, "--out", out, "--preset", "tiny", "--max-steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--eval-every", "0", "--checkpoint-every", "1", "--keep-checkpoints", "1"]
    code, err = train_inproc(capsys, *args)
    assert code == 0, err
    (step,) = (out / "checkpoints").iterdir()
    assert (step / "trainer.json").exists()
    for name in ("optimizer.pt", "rank-00000.pt"):
        original = (step / name).read_bytes()
        torch.save({"state": _Payload(marker)}, step / name)
        code, err = train_inproc(capsys, *args)  # the same run again: it resumes from the checkpoint
        assert code == 2 and f"refusing to load {step / name}" in err, err
        assert not marker.exists()  # the payload never ran
        (step / name).write_bytes(original)


def test_check_compares_a_resume_with_the_planned_world_size(shards, full_run):
    """`--check` runs before torchrun, in one process: given the launch's WORLD_SIZE it accepts
    resuming a 2-rank run (and a 1-rank launch is refused)."""
    data, tok = shards
    cmd = [sys.executable, "-m", "model.train", "--data", str(data), "--out", str(full_run[0]), "--tokenizer",
           str(tok), *TRAIN_ARGS, "--check"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env={**env(), "WORLD_SIZE": "2", "RANK": "0"})
    assert ok.returncode == 0 and "would resume from" in ok.stderr, ok.stderr[-2000:]
    single = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env())
    assert single.returncode == 2 and "world_size 2 -> 1" in single.stderr, single.stderr[-2000:]


# -- one training config ------------------------------------------------------------------

def test_every_training_setting_is_defined_once_and_reaches_the_trainer():
    """model/config.py's TrainConfig is the only definition: the pretrain stage's parameters
    (CLI --set, pipeline, Prefect form) are derived from it, and the launch hands all of them to
    model.train, which parses them back to the same config."""
    import typing
    from dataclasses import fields

    from flows.cli import build_parser
    from model.config import PRESETS, TrainConfig, settings
    from model.train import parse_args
    from tasks.pretrain import LAUNCH_FIELDS, PretrainParams, torchrun_command

    names = [f.name for f in fields(TrainConfig)]
    assert {"min_lr_ratio", "decay_fraction", "dtype", "dropout", "sample_tokens", "temperature", "top_k",
            "time_limit", "vocab_size", "bytes_per_token", "prompts"} <= set(names)
    model_fields = PretrainParams.model_fields
    assert list(model_fields) == ["rebuild", "input", *names, *LAUNCH_FIELDS]
    defaults = TrainConfig()
    for s in settings():
        f = model_fields[s.name]
        assert f.get_default(call_default_factory=True) == getattr(defaults, s.name), s.name
        assert f.description == s.help and f.description
    assert (defaults.max_steps, defaults.warmup_steps, defaults.eval_every, defaults.sample_every,
            defaults.checkpoint_every) == (200, 20, 50, 100, 100)   # the stage's user-facing defaults
    # presets: listed once, a dropdown in the form, the CLI's choices
    assert typing.get_args(model_fields["preset"].annotation) == tuple(PRESETS)
    assert PretrainParams.model_json_schema()["properties"]["preset"]["enum"] == list(PRESETS)
    assert build_parser().parse_args(["stage", "pretrain", "--preset", "mini"]).preset == "mini"
    # bounds: enforced by the stage's model and by the trainer alike
    with pytest.raises(ValueError, match="top_k"):
        PretrainParams(top_k=-1)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        TrainConfig(top_k=-1)
    # a stage's settings reach model.train whole, and the version is made of exactly them
    params = PretrainParams(preset="mini", min_lr_ratio=0.05, dtype="fp32", time_limit=60, top_k=5,
                            prompts=["--not a flag", "Zoë"], nproc_per_node=2, timeout_s=30)
    cmd = torchrun_command(params, "D", "O", "T")
    job = parse_args(cmd[cmd.index("model.train") + 1:])
    assert job.cfg == params.train_config() and (job.data, job.out, job.tokenizer) == ("D", "O", "T")
    assert job.cfg.prompts == ["--not a flag", "Zoë"] and job.cfg.time_limit == 60.0
    assert set(params.recipe()) == set(names)
    assert PretrainParams(nproc_per_node=8).recipe() == PretrainParams().recipe() != params.recipe()
    # flags override --config; unknown settings are refused
    job = parse_args(["--data", "D", "--out", "O", "--config", '{"lr": 0.01, "max_steps": 7}', "--max-steps", "9"])
    assert (job.cfg.lr, job.cfg.max_steps) == (0.01, 9)
    with pytest.raises(SystemExit):
        parse_args(["--data", "D", "--out", "O", "--config", '{"no_such_setting": 1}'])


def test_pipeline_presets_fit_their_models():
    """The `small` pipeline preset once asked the tiny model (context 128) for seq_len 256: the run
    would have failed at pretrain, after all its data stages. Now refused when the parameters
    are made, and the preset trains the mini model."""
    from model.config import PRESETS
    from tasks.pretrain import PretrainParams
    from tasks.presets import preset

    for name in ("demo", "small", "gpt2"):
        p = preset(name)["pretrain"]
        assert p.seq_len is None or p.seq_len <= PRESETS[p.preset]["seq_len"], name
    with pytest.raises(ValueError, match="(?s)seq_len.*1024 exceeds the tiny preset's context of 512"):
        PretrainParams(preset="tiny", seq_len=1024)


# -- small data on several ranks ----------------------------------------------------------

def tiny_shards(folder: Path, tok: Path, train_chars: int, val_chars: int) -> Path:
    """A shard folder of one file and one row group per split, from the start of tinyshakespeare."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    text = TEXT.read_text()
    parts = {"train": text[:train_chars], "val": text[train_chars:train_chars + val_chars]}
    meta = {"vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "dtype": "uint16", "splits": {}}
    for split, part in parts.items():
        if not part:
            continue
        rows = [[sp.bos_id()] + sp.encode(d) for d in part.split("\n\n") if d.strip()]
        (folder / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"tokens": pa.array(rows, type=pa.list_(pa.uint16()))}),
                       folder / split / "shard-00000.parquet")
        meta["splits"][split] = {"files": [f"{split}/shard-00000.parquet"], "documents": len(rows),
                                 "tokens": sum(map(len, rows))}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_two_ranks_train_on_a_single_row_group(shards, tmp_path):
    """A shard of one row group per split (a small corpus): both ranks train and evaluate on
    their own token ranges (it used to stop with `rank 1 of 2 gets no data`)."""
    _, tok = shards
    data = tiny_shards(tmp_path / "data", tok, 6000, 1500)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "model.train", "--data", str(data),
           "--out", str(tmp_path / "o"), "--tokenizer", str(tok), "--preset", "tiny", "--max-steps", "4",
           "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1", "--eval-every", "2", "--eval-steps", "2",
           "--sample-every", "0", "--checkpoint-every", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    no_abort(proc)
    steps = steps_of(proc.stdout)
    assert sorted(steps) == [1, 2, 3, 4] and "val_loss" in steps[2] and "val_loss" in steps[4]
    hashes = {json.loads(line)["param_sha256"] for line in proc.stderr.splitlines() if line.startswith('{"rank"')}
    assert len(hashes) == 1


def test_too_few_tokens_for_the_ranks_is_a_usage_error(shards, tmp_path, capsys, monkeypatch):
    """The check before a 2-rank launch (WORLD_SIZE=2) names the numbers."""
    _, tok = shards
    data = tiny_shards(tmp_path / "data", tok, 300, 0)
    tokens = json.loads((data / "meta.json").read_text())["splits"]["train"]["tokens"]
    assert 129 < tokens < 2 * 129  # enough for one rank at seq_len 128, not for two
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, err = train_inproc(capsys, "--data", data, "--out", tmp_path / "o", "--seq-len", "128", "--check")
    assert code == 2, err
    assert f"train split: {tokens} tokens in 1 shard file(s) are too few for 2 rank(s) at seq_len 128" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    code, err = train_inproc(capsys, "--data", data, "--out", tmp_path / "o", "--seq-len", "128", "--check")
    assert code == 0, err
