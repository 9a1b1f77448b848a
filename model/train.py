"""Train a GPT on Parquet token shards. Pure PyTorch; runs alone on a GPU box.

    python -m model.train --data SHARDS --out OUT --preset tiny --max-steps 200
    torchrun --standalone --nproc-per-node 2 -m model.train --data SHARDS --out OUT ...

One process per device; DDP when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA), or FSDP2
(`fully_shard`) with --fsdp. Rank 0 prints one JSON object per line on stdout:
    {"step", "loss", "lr", "tokens_per_s", "stall", ["mfu"], ["val_loss", "val_bpb"]}
and {"step", "samples": [{"prompt", "text"|"ids"}]} when it samples. Everything else
(resume notices, errors) goes to stderr.

Checkpoints (every --checkpoint-every steps and at the end) live in
OUT/checkpoints/step-000123/; a run started with an existing OUT resumes from the newest
one and, on CPU, continues the identical loss curve. At the end: OUT/final/ (weights in
safetensors + config.json [+ tokenizer.model]) and OUT/metrics.json. OUT may be any fsspec URL.

Exit status: 0 done; 2 bad input (one line on stderr); 1 the run failed (e.g. NaN loss).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import queue
import re
import sys
import threading
import time

import fsspec
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.data import ShardLoader, read_meta, shard_files
from model.gpt import GPT, PRESETS, config_from_preset
from common.process import die_with_parent, is_storage_error

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class StopRun(Exception):
    """Stops the run with one line on stderr. `together`: every rank raises it at the same
    point (so they can still meet at a barrier before tearing down)."""
    status = 1

    def __init__(self, message: str, together: bool = False):
        super().__init__(message)
        self.together = together


class UsageError(StopRun):
    """Bad input: exit status 2."""
    status = 2


class RunError(StopRun):
    """The run failed (e.g. the loss diverged): exit status 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="shard folder (meta.json + Parquet), local path or fsspec URL")
    p.add_argument("--out", required=True, help="output folder (checkpoints, final weights), local path or fsspec URL")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default: the shards' vocab_size); may pad above it, never below")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per rank (sequences)")
    p.add_argument("--seq-len", type=int, default=None, help="training context (default: the preset's)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per optimizer step over all ranks; gradient accumulation reaches it "
                        "(default: batch-size * seq-len * world size)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of steps spent decaying")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--eval-every", type=int, default=100, help="0 disables evaluation")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--bytes-per-token", type=float, default=None,
                   help="for bits per byte (default: meta.json's bytes_per_token, if any)")
    p.add_argument("--sample-every", type=int, default=0, help="0 disables sampling")
    p.add_argument("--prompt", action="append", default=None, help="sampling prompt (repeatable)")
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (local or fsspec URL) to decode samples")
    p.add_argument("--checkpoint-every", type=int, default=500, help="0: only at the end; -1: never")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop (checkpoint, final weights) after the step that passes this many seconds")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 (fully_shard)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 applies on CUDA only)")
    p.add_argument("--check", action="store_true", help="validate the inputs (and resume state), then exit")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_steps", "keep_checkpoints"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# --------------------------------------------------------------------------------------
# Distributed set-up and teardown
# --------------------------------------------------------------------------------------

class Dist:
    def __init__(self, init: bool = True):
        """`init=False` (for --check): the world size of the planned launch, without a process
        group, so a resume check compares the configuration the ranks will have."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.group = self.world > 1 and init
        if self.group:
            dist.init_process_group(backend="nccl" if self.cuda else "gloo", device_id=self.device if self.cuda else None)
        self.master = self.rank == 0
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def agree(self, error: str | None) -> str | None:
        """Every rank learns the first rank's error (if any), so that all of them stop together."""
        if not self.group:
            return error
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.group:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def check_parent(self) -> None:
        """A SIGKILLed torchrun leaves its workers behind (they run in their own sessions)."""
        if self.parent is not None and os.getppid() != self.parent:
            raise RunError("the torchrun launcher is gone; stopping")

    def close(self, clean: bool) -> None:
        """Destroy the process group on every rank before exit: gloo's rank 0 otherwise
        sometimes aborts with 'terminate called without an active exception'."""
        if dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def log(d: Dist, record: dict) -> None:
    if d.master:
        print(json.dumps(record), flush=True)


def note(d: Dist, text: str) -> None:
    if d.master:
        print(f"[train] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

class Prefetcher:
    """Reads the next batches in a background thread (pyarrow releases the GIL) and remembers
    the loader position after each batch, so a checkpoint records exactly what was consumed."""

    def __init__(self, loader: ShardLoader, pin: bool, depth: int = 2):
        self.loader, self.pin = loader, pin
        self.state = loader.state_dict()
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                x, y = self.loader.next_batch()
                if self.pin:
                    x, y = x.pin_memory(), y.pin_memory()
                self._put((x, y, self.loader.state_dict()))
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        x, y, self.state = item
        return x, y

    def state_dict(self) -> dict:
        return dict(self.state)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------

def lr_at(step: int, a: argparse.Namespace) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine decay to
    lr * min_lr_ratio, or warmup-stable-decay (linear decay over the last decay_fraction)."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    min_lr = a.lr * a.min_lr_ratio
    if a.schedule == "cosine":
        progress = (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (a.lr - min_lr)
    decay_start = max(a.warmup_steps, a.max_steps - int(round(a.decay_fraction * a.max_steps)))
    if step < decay_start:
        return a.lr
    progress = (step - decay_start) / max(1, a.max_steps - decay_start)
    return a.lr - (a.lr - min_lr) * min(1.0, progress)


# --------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoints/step-000123/{model.safetensors, optimizer.pt, config.json,
# rank-00000.pt ..., trainer.json}; trainer.json is written last and marks it complete.
# --------------------------------------------------------------------------------------

STEP_DIR = re.compile(r"step-(\d{6,})$")


def write_bytes(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_load_safe(fs, path: str):
    """Tensors and plain data only (weights_only): a checkpoint is data, never code to run."""
    import pickle

    try:
        return torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else "unsupported content"
        raise UsageError(f"refusing to load {path}: it holds more than tensors and plain data ({reason})") from None


def list_checkpoints(fs, root: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of every step folder, oldest first."""
    fs.invalidate_cache()
    try:
        entries = fs.ls(f"{root}/checkpoints", detail=False)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        m = STEP_DIR.search(e.rstrip("/"))
        if m:
            path = e.rstrip("/")
            found.append((int(m.group(1)), path, fs.exists(f"{path}/trainer.json")))
    return sorted(found)


def state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(d, fs, root, step, raw, optimizer, batches, run_config, trainer_state, keep):
    """All ranks call this (gathering FSDP shards is collective); rank 0 writes the shared files,
    every rank its own loader position and RNG state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model_sd = get_model_state_dict(raw, options=state_dict_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(raw, optimizer, options=state_dict_options(cpu_offload=True))
    path = f"{root}/checkpoints/step-{step:06d}"
    fs.makedirs(path, exist_ok=True)
    d.barrier()
    rank_state = {"loader": batches.state_dict(), "cpu_rng": torch.get_rng_state()}
    if d.cuda:
        rank_state["cuda_rng"] = torch.cuda.get_rng_state()
    write_bytes(fs, f"{path}/rank-{d.rank:05d}.pt", torch_bytes(rank_state))
    if d.master:
        write_bytes(fs, f"{path}/model.safetensors",
                    save_safetensors({k: v.detach().contiguous() for k, v in model_sd.items()}))
        write_bytes(fs, f"{path}/optimizer.pt", torch_bytes(optim_sd))
        write_bytes(fs, f"{path}/config.json", json.dumps(run_config, indent=2).encode())
    d.barrier()
    if d.master:
        write_bytes(fs, f"{path}/trainer.json", json.dumps(trainer_state).encode())  # the commit
        complete = [c for c in list_checkpoints(fs, root) if c[2]]
        keep_paths = {p for _, p, _ in complete[-keep:]}
        for s, p, done in list_checkpoints(fs, root):
            if p not in keep_paths and (done or s < step):
                try:
                    fs.rm(p, recursive=True)
                except FileNotFoundError:  # an S3 listing can still show a just-deleted prefix
                    pass
        note(d, f"checkpoint {path}")


def load_checkpoint(d, fs, path, raw, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state into raw/optimizer; returns (this rank's state, trainer state)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    # sorted: safetensors returns its tensors in an order that differs from process to process,
    # and under FSDP every key is a collective (scatter) that all ranks must issue alike
    model_sd = dict(sorted(load_safetensors(read_bytes(fs, f"{path}/model.safetensors")).items()))
    set_model_state_dict(raw, model_sd, options=state_dict_options())
    optim_sd = torch_load_safe(fs, f"{path}/optimizer.pt")
    built = [dict(g) for g in optimizer.param_groups]
    set_optimizer_state_dict(raw, optimizer, optim_sd, options=state_dict_options())
    # set_optimizer_state_dict hands back tuple hyperparameters (AdamW's betas) as lists; restore
    # the types the optimizer was built with, or the next optimizer.pt differs in bytes from an
    # uninterrupted run's (the random SIGKILL test compares them)
    for group, fresh in zip(optimizer.param_groups, built):
        for k, v in fresh.items():
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])
    rank_state = torch_load_safe(fs, f"{path}/rank-{d.rank:05d}.pt")
    trainer_state = json.loads(read_bytes(fs, f"{path}/trainer.json"))
    return rank_state, trainer_state


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def load_tokenizer(path: str | None):
    if not path:
        return None, None
    import sentencepiece as spm
    with fsspec.open(path, "rb") as f:
        proto = f.read()
    return spm.SentencePieceProcessor(model_proto=proto), proto


def setup(a: argparse.Namespace, d: Dist) -> dict:
    """Everything that can be wrong with the input, checked before the model is built.
    Raises UsageError with one line naming the problem."""
    try:
        meta = read_meta(a.data)
        train_files = shard_files(a.data, "train")
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read the shard folder {a.data}: {type(e).__name__}: {e}") from None
    data_vocab = int(meta["vocab_size"])
    vocab = a.vocab_size or data_vocab
    if vocab < data_vocab:
        raise UsageError(f"model vocab_size {vocab} is smaller than the shards' vocab_size {data_vocab} "
                         f"(meta.json of {a.data})")
    cfg = config_from_preset(a.preset, vocab_size=vocab, dropout=a.dropout)
    T = a.seq_len or cfg.seq_len
    if T > cfg.seq_len:
        raise UsageError(f"--seq-len {T} exceeds the model's seq_len {cfg.seq_len} (preset {a.preset})")
    micro = a.batch_size * T * d.world
    tokens_per_step = a.tokens_per_step or micro
    if tokens_per_step % micro:
        raise UsageError(f"--tokens-per-step {tokens_per_step} does not divide by batch-size x seq-len x "
                         f"ranks = {a.batch_size} x {T} x {d.world} = {micro}")
    if a.fsdp and d.world == 1:
        note(d, "--fsdp with one process: no sharding to do")
    if a.dtype == "bf16" and not d.cuda:
        note(d, "--dtype bf16 applies on CUDA only; training in fp32 on CPU")
    dtype = "bf16" if d.cuda and a.dtype in ("auto", "bf16") else "fp32"
    try:
        loader = ShardLoader(train_files, a.batch_size, T, d.rank, d.world)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"train split: {e}") from None
    val_files = meta["splits"].get("val", {}).get("files", [])
    val_loader = None
    if a.eval_every and val_files:
        val_files = shard_files(a.data, "val")
        units = len(ShardLoader(val_files, a.batch_size, T).units)
        # too few row groups for every rank: all ranks evaluate the same (whole) split
        vr, vw = (d.rank, d.world) if units >= d.world else (0, 1)
        val_loader = ShardLoader(val_files, a.batch_size, T, vr, vw)
    bytes_per_token = a.bytes_per_token or meta.get("bytes_per_token")
    try:
        sp, sp_proto = load_tokenizer(a.tokenizer)
    except (FileNotFoundError, IsADirectoryError, PermissionError, RuntimeError) as e:  # not an outage
        raise UsageError(f"cannot load the tokenizer {a.tokenizer}: {e}") from None

    run_config = {
        "model": cfg.to_dict(),
        "train": {"preset": a.preset, "batch_size": a.batch_size, "seq_len": T,
                  "tokens_per_step": tokens_per_step, "world_size": d.world, "max_steps": a.max_steps,
                  "lr": a.lr, "warmup_steps": a.warmup_steps, "schedule": a.schedule,
                  "min_lr_ratio": a.min_lr_ratio, "decay_fraction": a.decay_fraction,
                  "weight_decay": a.weight_decay, "grad_clip": a.grad_clip, "seed": a.seed,
                  "dtype": dtype, "fsdp": a.fsdp},
        "data": {"vocab_size": data_vocab, "bos_id": meta.get("bos_id"),
                 "train_files": meta["splits"]["train"]["files"]},
    }
    fs, root = fsspec.core.url_to_fs(a.out)
    resume = None
    complete = [c for c in list_checkpoints(fs, root) if c[2]]
    if complete:
        step, path, _ = complete[-1]
        saved = json.loads(read_bytes(fs, f"{path}/config.json"))
        diff = config_diff(saved, run_config)
        if diff:
            raise UsageError(f"cannot resume from {path}: the run's configuration changed: " + "; ".join(diff))
        resume = path
    return dict(meta=meta, cfg=cfg, T=T, tokens_per_step=tokens_per_step,
                accum=tokens_per_step // micro, dtype=dtype, loader=loader, val_loader=val_loader,
                bytes_per_token=bytes_per_token, sp=sp, sp_proto=sp_proto, run_config=run_config,
                fs=fs, root=root, resume=resume)


def build(a, d, s):
    """The model, wrapped for this run, and its optimizer."""
    torch.manual_seed(a.seed)  # identical initial weights on every rank
    with torch.device(d.device):  # built (and initialised) where it will train
        raw = GPT(s["cfg"])
    raw.activation_checkpointing = a.activation_checkpointing
    if a.fsdp and d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if s["dtype"] == "bf16" else MixedPrecisionPolicy()
        for block in raw.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
                                  **({"fused": True} if d.cuda else {"foreach": True}))
    return raw, optimizer


def wrap(a, d, raw):
    model = torch.compile(raw) if a.compile else raw
    if d.world > 1 and not a.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[d.local_rank] if d.cuda else None,
                    broadcast_buffers=False)  # the only buffer (rotary table) is a constant
    return model


def peak_flops(d: Dist) -> float | None:
    if not d.cuda:
        return None
    name = torch.cuda.get_device_name(d.device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def params_sha256(raw) -> str:
    """A hash of the full weights (collective under FSDP: shards are gathered)."""
    h = hashlib.sha256()
    for name, t in sorted(raw.state_dict().items()):
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(a: argparse.Namespace, d: Dist) -> None:
    error, s = None, None
    try:
        s = setup(a, d)
    except UsageError as e:
        error = str(e)
    error = d.agree(error)
    if error:
        raise UsageError(error, together=True)
    if a.check:
        note(d, "inputs are valid" + (f"; would resume from {s['resume']}" if s["resume"] else ""))
        return

    fs, root, cfg, T, accum = s["fs"], s["root"], s["cfg"], s["T"], s["accum"]
    raw, optimizer = build(a, d, s)
    history, step, tokens_seen = [], 0, 0
    if s["resume"]:
        rank_state, trainer_state = load_checkpoint(d, fs, s["resume"], raw, optimizer)
        s["loader"].load_state_dict(rank_state["loader"])
        torch.set_rng_state(rank_state["cpu_rng"])
        if d.cuda and "cuda_rng" in rank_state:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
        history, step, tokens_seen = trainer_state["history"], trainer_state["step"], trainer_state["tokens"]
        note(d, f"resuming from {s['resume']} at step {step}")
    else:
        torch.manual_seed(a.seed + 1 + d.rank)  # dropout differs across ranks
    model = wrap(a, d, raw)
    def autocast():
        return (torch.autocast("cuda", dtype=torch.bfloat16) if s["dtype"] == "bf16"
                else contextlib.nullcontext())
    if d.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batches = Prefetcher(s["loader"], pin=d.cuda)
    flops_per_token, peak = raw.flops_per_token(T), peak_flops(d)
    vocab = cfg.vocab_size
    run_config = s["run_config"]
    last_good = s["resume"]

    def micro_context(last: bool):
        if d.world == 1:
            return contextlib.nullcontext()
        if a.fsdp:
            raw.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else model.no_sync()

    @torch.no_grad()
    def evaluate() -> float:
        vl = s["val_loader"]
        vl.load_state_dict({**vl.state_dict(), "epoch": 0, "unit": 0, "row": 0, "offset": 0})
        model.eval()
        total = torch.zeros((), device=d.device)
        for _ in range(a.eval_steps):
            x, y = vl.next_batch()
            with autocast():
                _, loss = model(x.to(d.device), y.to(d.device))
            total += loss.float()
        model.train()
        return d.sum(total).item() / (a.eval_steps * d.world)

    @torch.no_grad()
    def sample() -> list[dict]:
        sp, bos = s["sp"], s["meta"].get("bos_id")
        prompts = a.prompt or ["The", "Once upon a time", "In the beginning"]
        if sp is None:
            prompts = [""]  # without a tokenizer: continue a bare BOS, print ids
        out = []
        raw.eval()
        for i, text in enumerate(prompts):
            ids = ([bos] if bos is not None else []) + (sp.encode(text) if sp and text else [])
            if not ids:
                ids = [0]
            idx = torch.tensor([ids], dtype=torch.long, device=d.device)
            with autocast():
                gen = raw.generate(idx, a.sample_tokens, temperature=a.temperature, top_k=a.top_k,
                                   seed=a.seed + i)
            new = gen[0, len(ids):].tolist()
            if sp:
                from model.sample import continue_text
                out.append({"prompt": text, "text": continue_text(sp, text, [t for t in new if t < sp.get_piece_size()])})
            else:
                out.append({"prompt": text, "ids": new})
        raw.train()
        return out

    note(d, f"{raw.num_params() / 1e6:.2f}M parameters, {d.world} rank(s) on {d.device.type}, "
            f"{s['tokens_per_step']} tokens/step ({accum} micro-step(s) of {a.batch_size}x{T} per rank)")
    t_start = time.perf_counter()
    end_step = a.max_steps
    try:
        while step < end_step:
            d.check_parent()
            lr = lr_at(step, a)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            wait = 0.0
            loss_sum = torch.zeros((), device=d.device)
            for micro in range(accum):
                tw = time.perf_counter()
                x, y = batches.next()
                wait += time.perf_counter() - tw
                if int(x.max()) >= vocab or int(y.max()) >= vocab:
                    raise UsageError(f"the shards hold token id {max(int(x.max()), int(y.max()))} "
                                     f"beyond the model's vocab_size {vocab}")
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with micro_context(micro == accum - 1):
                    with autocast():
                        _, loss = model(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            d.sum(loss_sum)
            if a.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), a.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # read the loss only now, so the GPU is not idle while the update is launched; a
            # diverged step is never checkpointed, so the last checkpoint stays good
            train_loss = loss_sum.item() / (accum * d.world)
            if not math.isfinite(train_loss):
                raise RunError(f"the loss is {train_loss} at step {step + 1}; stopping "
                               f"(last good checkpoint: {last_good or 'none'})", together=True)
            dt = time.perf_counter() - t0
            step += 1
            tokens_seen += s["tokens_per_step"]
            if a.time_limit is not None and step < end_step:
                over = torch.tensor(float(time.perf_counter() - t_start > a.time_limit), device=d.device)
                if d.sum(over).item() > 0:  # every rank stops at the same step
                    end_step = step
                    note(d, f"time limit of {a.time_limit:g}s reached: stopping at step {step} of {a.max_steps}")

            record = {"step": step, "loss": train_loss, "lr": lr,
                      "tokens_per_s": s["tokens_per_step"] / dt, "stall": wait / dt}
            if peak:
                record["mfu"] = flops_per_token * record["tokens_per_s"] / (peak * d.world)
            if s["val_loader"] is not None and (step % a.eval_every == 0 or step == end_step):
                record["val_loss"] = evaluate()
                if s["bytes_per_token"]:
                    record["val_bpb"] = record["val_loss"] / math.log(2) / s["bytes_per_token"]
            history.append({k: record[k] for k in ("step", "loss", "lr", "val_loss", "val_bpb") if k in record})
            log(d, record)
            if a.sample_every and (step % a.sample_every == 0 or step == end_step):
                if a.fsdp or d.master:  # FSDP: every rank takes part in the forward passes
                    samples = sample()
                    log(d, {"step": step, "samples": samples})
            if a.checkpoint_every >= 0 and ((a.checkpoint_every and step % a.checkpoint_every == 0)
                                            or step == end_step):
                save_checkpoint(d, fs, root, step, raw, optimizer, batches, run_config,
                                {"step": step, "tokens": tokens_seen, "history": history}, a.keep_checkpoints)
                last_good = f"{root}/checkpoints/step-{step:06d}"
    finally:
        batches.close()

    if os.environ.get("C2M_PARAM_HASH"):  # tests: every rank reports a hash of its weights
        line = json.dumps({"rank": d.rank, "param_sha256": params_sha256(raw)}) + "\n"
        os.write(sys.stderr.fileno(), line.encode())  # one write: ranks' lines do not interleave
    write_final(a, d, s, raw, history, step, tokens_seen)


def write_final(a, d, s, raw, history, step, tokens_seen) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    model_sd = get_model_state_dict(raw, options=state_dict_options(cpu_offload=True))
    if not d.master:
        return
    fs, root = s["fs"], s["root"]
    fs.makedirs(f"{root}/final", exist_ok=True)
    write_bytes(fs, f"{root}/final/model.safetensors",
                save_safetensors({k: v.detach().contiguous() for k, v in model_sd.items()}))
    config = {**s["cfg"].to_dict(), "preset": a.preset, "bos_id": s["meta"].get("bos_id"), "step": step,
              "tokenizer": "tokenizer.model" if s["sp_proto"] else None}
    write_bytes(fs, f"{root}/final/config.json", json.dumps(config, indent=2).encode())
    if s["sp_proto"]:
        write_bytes(fs, f"{root}/final/tokenizer.model", s["sp_proto"])
    last = history[-1] if history else {}
    evals = [h for h in history if "val_loss" in h]
    metrics = {"steps": step, "tokens": tokens_seen, "num_params": raw.num_params(),
               "flops_per_token": raw.flops_per_token(s["T"]), "final_loss": last.get("loss"),
               "final_val_loss": evals[-1]["val_loss"] if evals else None,
               "final_val_bpb": evals[-1].get("val_bpb") if evals else None,
               "history": history}
    # Only deterministic numbers go into the file (same run, same bytes, wherever it ran);
    # timings are on stdout, where the launcher collects them.
    write_bytes(fs, f"{root}/metrics.json", json.dumps(metrics, indent=1).encode())
    note(d, f"done: {root}/final")


def main(argv=None) -> int:
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a worker under torchrun
        die_with_parent()
        if os.getppid() == 1:  # the launcher died before we could ask
            return 1
    a = parse_args(argv)
    d = Dist(init=not a.check)
    clean = False
    try:
        train(a, d)
        clean = True
        return 0
    except StopRun as e:
        if d.master or not e.together:
            print(f"error: {e}", file=sys.stderr, flush=True)
        clean = e.together
        return e.status
    except Exception as e:
        if not is_storage_error(e):
            raise
        # storage gave up after its retries (an S3 outage, a full disk): one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: storage error at {a.out}: {type(e).__name__}: {msg} "
              "(checkpoints written so far are kept; rerun to resume)", file=sys.stderr, flush=True)
        return 1
    finally:
        d.close(clean)


if __name__ == "__main__":
    sys.exit(main())
