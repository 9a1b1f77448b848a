"""Train a GPT on Parquet token shards. Pure PyTorch; runs alone on a GPU box.

    python -m model.train --data SHARDS --out OUT --preset tiny --max-steps 200
    torchrun --standalone --nproc-per-node 2 -m model.train --data SHARDS --out OUT ...
    python -m model.train --data SHARDS --out OUT --config '{"preset": "tiny", "lr": 3e-4}'
    python -m model.train --conversations CONVS --init-from BASE/final --out OUT --max-steps 100   # SFT

Every training setting (its default, help text and bounds) is a field of model/config.py's
TrainConfig: the flags are generated from it (`--help` lists them) and `--config` takes any of
them as one JSON object (what the `pretrain` stage passes); a flag overrides --config. Only
--data, --conversations, --init-from, --out, --tokenizer and --check belong to this command alone.

Supervised fine-tuning (SFT) is the same loop on other data: --conversations names a
`conversations` artifact's folder (train.jsonl, val.jsonl), --init-from a trained model's final/
folder (its shape, weights and tokenizer); each row of a batch is one conversation rendered by
model/chat.py, and the loss counts the assistant's tokens only.

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

The file reads top to bottom: the job (config), the processes (Dist), setup (every input
checked, into a Run), the model, the training loop, checkpoints, the final weights, main.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed as torchdist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.config import PRESETS, TrainConfig, add_arguments, from_args
from model.data import Prefetcher, ShardLoader, read_meta, shard_files
from model.gpt import GPT, GPTConfig, config_from_preset
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


# --------------------------------------------------------------------------------------
# The job: the training config plus where to read and write
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    cfg: TrainConfig
    data: str | None          # shard folder (meta.json + Parquet), local path or fsspec URL
    conversations: str | None  # SFT: a conversations folder (train.jsonl, val.jsonl) instead of shards
    init_from: str | None     # a final/ folder whose weights (and shape, tokenizer) training starts from
    out: str                  # output folder (checkpoints, final weights), local path or fsspec URL
    tokenizer: str | None     # sentencepiece .model to decode samples
    check: bool               # validate the inputs (and resume state), then exit


def parse_args(argv=None) -> Job:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="shard folder (meta.json + Parquet), local path or fsspec URL")
    p.add_argument("--conversations", help="SFT: a conversations folder (train.jsonl, val.jsonl) instead of --data")
    p.add_argument("--init-from", help="a final/ folder to start from: its weights, shape and tokenizer")
    p.add_argument("--out", required=True, help="output folder (checkpoints, final weights), local path or fsspec URL")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (local or fsspec URL) to decode samples")
    p.add_argument("--check", action="store_true", help="validate the inputs (and resume state), then exit")
    add_arguments(p)  # every TrainConfig field, and --config
    ns = p.parse_args(argv)
    if (ns.data is None) == (ns.conversations is None):
        p.error("give --data (pretraining) or --conversations (SFT)")
    if bool(ns.conversations) != bool(ns.init_from):
        p.error("--conversations and --init-from go together: SFT starts from a trained model")
    try:
        cfg = from_args(ns)
    except ValueError as e:
        p.error(str(e))
    return Job(cfg=cfg, data=ns.data, conversations=ns.conversations, init_from=ns.init_from, out=ns.out,
               tokenizer=ns.tokenizer, check=ns.check)


# --------------------------------------------------------------------------------------
# The processes: distributed set-up and teardown
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
            torchdist.init_process_group(backend="nccl" if self.cuda else "gloo",
                                         device_id=self.device if self.cuda else None)
        self.master = self.rank == 0
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def agree(self, error: str | None) -> str | None:
        """Every rank learns the first rank's error (if any), so that all of them stop together."""
        if not self.group:
            return error
        errors = [None] * self.world
        torchdist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.group:
            torchdist.all_reduce(t, op=torchdist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.group:
            torchdist.barrier()

    def check_parent(self) -> None:
        """A SIGKILLed torchrun leaves its workers behind (they run in their own sessions)."""
        if self.parent is not None and os.getppid() != self.parent:
            raise RunError("the torchrun launcher is gone; stopping")

    def close(self, clean: bool) -> None:
        """Destroy the process group on every rank before exit: gloo's rank 0 otherwise
        sometimes aborts with 'terminate called without an active exception'."""
        if torchdist.is_available() and torchdist.is_initialized():
            if clean:
                torchdist.barrier()
            torchdist.destroy_process_group()


def log(dist: Dist, record: dict) -> None:
    if dist.master:
        print(json.dumps(record), flush=True)


def note(dist: Dist, text: str) -> None:
    if dist.master:
        print(f"[train] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Setup: every input checked before the model is built
# --------------------------------------------------------------------------------------

@dataclass
class Run:
    """What setup() found and decided."""
    meta: dict                        # the shards' meta.json
    gpt: GPTConfig                    # the model's shape
    seq_len: int                      # training context (T)
    tokens_per_step: int              # over all ranks
    accum: int                        # micro-steps per optimizer step
    dtype: str                        # "bf16" (autocast on CUDA) or "fp32"
    loader: Any                       # this rank's train stream (ShardLoader, or ConversationLoader in SFT)
    val_loader: Any                   # this rank's val stream, if evaluating
    bytes_per_token: float | None     # for bits per byte
    sp: Any                           # sentencepiece processor to decode samples, or None
    sp_proto: bytes | None            # its model file
    run_config: dict                  # what a resume must match (config.json of a checkpoint)
    fs: Any                           # the output's filesystem
    root: str                         # the output folder on it
    resume: str | None                # the checkpoint to resume from
    init_weights: bytes | None = None  # safetensors of --init-from, loaded before training


def load_tokenizer(path: str | None):
    if not path:
        return None, None
    import sentencepiece as spm
    with fsspec.open(path, "rb") as f:
        proto = f.read()
    return spm.SentencePieceProcessor(model_proto=proto), proto


def setup(job: Job, dist: Dist) -> Run:
    """Raises UsageError with one line naming the problem."""
    cfg = job.cfg
    init_weights, tokenizer = None, job.tokenizer
    if job.conversations:  # SFT: the base model's shape, weights and tokenizer
        try:
            with fsspec.open(f"{job.init_from}/config.json", "rt") as f:
                base = json.load(f)
            with fsspec.open(f"{job.init_from}/model.safetensors", "rb") as f:
                init_weights = f.read()
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read the model to start from, {job.init_from}: {type(e).__name__}: {e}") from None
        gpt = GPTConfig(**{k: v for k, v in base.items() if k in {f.name for f in dataclasses.fields(GPTConfig)}})
        if base.get("preset") in PRESETS:  # the base model's shape, whatever preset the settings name
            cfg = dataclasses.replace(cfg, preset=base["preset"])
        data_vocab = gpt.vocab_size
        meta = {"vocab_size": data_vocab, "bos_id": base.get("bos_id"), "splits": {}}
        tokenizer = tokenizer or (f"{job.init_from}/{base['tokenizer']}" if base.get("tokenizer") else None)
        if tokenizer is None:
            raise UsageError(f"{job.init_from} holds no tokenizer.model: SFT renders conversations with it")
    else:
        try:
            meta = read_meta(job.data)
            train_files = shard_files(job.data, "train")
        except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read the shard folder {job.data}: {type(e).__name__}: {e}") from None
        data_vocab = int(meta["vocab_size"])
        vocab = cfg.vocab_size or data_vocab
        if vocab < data_vocab:
            raise UsageError(f"model vocab_size {vocab} is smaller than the shards' vocab_size {data_vocab} "
                             f"(meta.json of {job.data})")
        gpt = config_from_preset(cfg.preset, vocab_size=vocab, dropout=cfg.dropout)
    T = cfg.seq_len or gpt.seq_len
    if T > gpt.seq_len:
        raise UsageError(f"--seq-len {T} exceeds the model's seq_len {gpt.seq_len} (preset {cfg.preset})")
    micro = cfg.batch_size * T * dist.world
    tokens_per_step = cfg.tokens_per_step or micro
    if tokens_per_step % micro:
        raise UsageError(f"--tokens-per-step {tokens_per_step} does not divide by batch-size x seq-len x "
                         f"ranks = {cfg.batch_size} x {T} x {dist.world} = {micro}")
    if cfg.fsdp and dist.world == 1:
        note(dist, "--fsdp with one process: no sharding to do")
    if cfg.dtype == "bf16" and not dist.cuda:
        note(dist, "--dtype bf16 applies on CUDA only; training in fp32 on CPU")
    dtype = "bf16" if dist.cuda and cfg.dtype in ("auto", "bf16") else "fp32"
    try:
        sp, sp_proto = load_tokenizer(tokenizer)
    except (FileNotFoundError, IsADirectoryError, PermissionError, RuntimeError) as e:  # not an outage
        raise UsageError(f"cannot load the tokenizer {tokenizer}: {e}") from None
    if job.conversations:
        loader, val_loader, data = conversation_loaders(job, dist, sp, T)
        data["init_sha256"] = hashlib.sha256(init_weights).hexdigest()
    else:
        loader, val_loader = shard_loaders(job, dist, meta, train_files, T)
        data = {"vocab_size": data_vocab, "bos_id": meta.get("bos_id"), "train_files": meta["splits"]["train"]["files"]}
    bytes_per_token = cfg.bytes_per_token or meta.get("bytes_per_token")

    run_config = {  # what shapes the run: a resume must match it
        "model": gpt.to_dict(),
        "train": {"preset": cfg.preset, "batch_size": cfg.batch_size, "seq_len": T,
                  "tokens_per_step": tokens_per_step, "world_size": dist.world, "max_steps": cfg.max_steps,
                  "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "schedule": cfg.schedule,
                  "min_lr_ratio": cfg.min_lr_ratio, "decay_fraction": cfg.decay_fraction,
                  "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "seed": cfg.seed,
                  "dtype": dtype, "fsdp": cfg.fsdp},
        "data": data,
    }
    fs, root = fsspec.core.url_to_fs(job.out)
    resume = None
    complete = [c for c in list_checkpoints(fs, root) if c[2]]
    if complete:
        step, path, _ = complete[-1]
        saved = json.loads(read_bytes(fs, f"{path}/config.json"))
        diff = config_diff(saved, run_config)
        if diff:
            raise UsageError(f"cannot resume from {path}: the run's configuration changed: " + "; ".join(diff))
        resume = path
    return Run(meta=meta, gpt=gpt, seq_len=T, tokens_per_step=tokens_per_step, accum=tokens_per_step // micro,
               dtype=dtype, loader=loader, val_loader=val_loader, bytes_per_token=bytes_per_token, sp=sp,
               sp_proto=sp_proto, run_config=run_config, fs=fs, root=root, resume=resume, init_weights=init_weights)


def shard_loaders(job: Job, dist: Dist, meta: dict, train_files: list[str], T: int):
    """(train loader, val loader or None) of a shard folder, for this rank."""
    cfg = job.cfg
    try:
        loader = ShardLoader(train_files, cfg.batch_size, T, dist.rank, dist.world)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"train split: {e}") from None
    val_loader = None
    if cfg.eval_every and meta["splits"].get("val", {}).get("files"):
        val_files = shard_files(job.data, "val")
        try:
            val_loader = ShardLoader(val_files, cfg.batch_size, T, dist.rank, dist.world)
        except ValueError as e:
            if dist.world == 1:
                raise UsageError(f"val split: {e}; or set eval_every 0") from None
            try:  # too small to share out: every rank evaluates the whole split
                val_loader = ShardLoader(val_files, cfg.batch_size, T)
            except ValueError as e:
                raise UsageError(f"val split: {e}; or set eval_every 0") from None
        except FileNotFoundError as e:
            raise UsageError(f"val split: {e}") from None
    return loader, val_loader


def conversation_loaders(job: Job, dist: Dist, sp, T: int):
    """(train loader, val loader or None, what a resume must match) of a conversations folder:
    every conversation rendered with the chat template, for this rank."""
    from model.chat import ConversationLoader, render_conversation

    cfg, pad = job.cfg, sp.piece_to_id("<|pad|>")

    def rendered(split: str) -> list:
        try:
            with fsspec.open(f"{job.conversations}/{split}.jsonl", "rt", encoding="utf-8") as f:
                return [render_conversation(sp, json.loads(line)["messages"]) for line in f if line.strip()]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise UsageError(f"cannot read the conversations {job.conversations}/{split}.jsonl: "
                             f"{type(e).__name__}: {e}") from None

    train = rendered("train")
    try:
        loader = ConversationLoader(train, cfg.batch_size, T, pad, dist.rank, dist.world, seed=cfg.seed)
    except ValueError as e:
        raise UsageError(f"train conversations: {e}") from None
    if loader.too_long:
        note(dist, f"{loader.too_long} conversation(s) left out: their first reply starts past {T + 1} tokens")
    val_loader, val = None, rendered("val") if cfg.eval_every else []
    if val:
        for ranks in ((dist.rank, dist.world), (0, 1)):  # fewer than the ranks: every rank evaluates them all
            try:
                val_loader = ConversationLoader(val, cfg.batch_size, T, pad, *ranks)
                break
            except ValueError:
                continue
    return loader, val_loader, {"vocab_size": sp.get_piece_size(), "conversations": len(train)}


def setup_together(job: Job, dist: Dist) -> Run:
    """setup() on every rank; if any rank finds a problem, all of them stop with it."""
    error, run = None, None
    try:
        run = setup(job, dist)
    except UsageError as e:
        error = str(e)
    error = dist.agree(error)
    if error:
        raise UsageError(error, together=True)
    assert run is not None
    return run


# --------------------------------------------------------------------------------------
# The model and its optimizer
# --------------------------------------------------------------------------------------

def build(cfg: TrainConfig, dist: Dist, run: Run) -> tuple[GPT, torch.optim.Optimizer]:
    """The model (sharded under FSDP) and its optimizer."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with torch.device(dist.device):  # built (and initialised) where it will train
        raw = GPT(run.gpt)
    if run.init_weights is not None:  # SFT: start from the base model (a resume then loads its checkpoint)
        raw.load_state_dict(load_safetensors(run.init_weights))
    raw.activation_checkpointing = cfg.activation_checkpointing
    if cfg.fsdp and dist.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if run.dtype == "bf16" else MixedPrecisionPolicy()
        for block in raw.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  **({"fused": True} if dist.cuda else {"foreach": True}))
    return raw, optimizer


def wrap(cfg: TrainConfig, dist: Dist, raw: GPT) -> torch.nn.Module:
    """The module the loop calls: compiled and/or in DDP (FSDP wrapped it in place)."""
    model = torch.compile(raw) if cfg.compile else raw
    if dist.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dist.local_rank] if dist.cuda else None,
                    broadcast_buffers=False)  # the only buffer (rotary table) is a constant
    return model


def autocast(run: Run):
    return torch.autocast("cuda", dtype=torch.bfloat16) if run.dtype == "bf16" else contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine decay to
    lr * min_lr_ratio, or warmup-stable-decay (linear decay over the last decay_fraction)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)
    decay_start = max(cfg.warmup_steps, cfg.max_steps - int(round(cfg.decay_fraction * cfg.max_steps)))
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return cfg.lr - (cfg.lr - min_lr) * min(1.0, progress)


def peak_flops(dist: Dist) -> float | None:
    if not dist.cuda:
        return None
    name = torch.cuda.get_device_name(dist.device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def params_sha256(raw: GPT) -> str:
    """A hash of the full weights (collective under FSDP: shards are gathered)."""
    h = hashlib.sha256()
    for name, t in sorted(raw.state_dict().items()):
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where the run is; trainer.json of a checkpoint."""
    step: int = 0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(cfg: TrainConfig, dist: Dist, run: Run, model: torch.nn.Module) -> float:
    """Mean loss over eval_steps batches of the val split, from its start, over all ranks."""
    vl = run.val_loader
    vl.rewind()
    model.eval()
    total = torch.zeros((), device=dist.device)
    for _ in range(cfg.eval_steps):
        x, y = vl.next_batch()
        with autocast(run):
            _, loss = model(x.to(dist.device), y.to(dist.device))
        total += loss.float()
    model.train()
    return dist.sum(total).item() / (cfg.eval_steps * dist.world)


@torch.no_grad()
def sample(cfg: TrainConfig, dist: Dist, run: Run, raw: GPT) -> list[dict]:
    """A continuation of each prompt (decoded with the tokenizer, or as ids without one)."""
    sp, bos = run.sp, run.meta.get("bos_id")
    prompts = cfg.prompts if sp is not None else [""]  # without a tokenizer: continue a bare BOS
    out = []
    raw.eval()
    for i, text in enumerate(prompts):
        ids = ([bos] if bos is not None else []) + (sp.encode(text) if sp and text else [])
        if not ids:
            ids = [0]
        idx = torch.tensor([ids], dtype=torch.long, device=dist.device)
        with autocast(run):
            gen = raw.generate(idx, cfg.sample_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               seed=cfg.seed + i)
        new = gen[0, len(ids):].tolist()
        if sp:
            from model.sample import continue_text
            out.append({"prompt": text, "text": continue_text(sp, text, [t for t in new if t < sp.get_piece_size()])})
        else:
            out.append({"prompt": text, "ids": new})
    raw.train()
    return out


def train(job: Job, dist: Dist) -> None:
    cfg = job.cfg
    run = setup_together(job, dist)
    if job.check:
        note(dist, "inputs are valid" + (f"; would resume from {run.resume}" if run.resume else ""))
        return

    raw, optimizer = build(cfg, dist, run)
    progress = Progress()
    if run.resume:
        progress = resume(dist, run, raw, optimizer)
        note(dist, f"resuming from {run.resume} at step {progress.step}")
    else:
        torch.manual_seed(cfg.seed + 1 + dist.rank)  # dropout differs across ranks
    model = wrap(cfg, dist, raw)
    if dist.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batches = Prefetcher(run.loader, pin=dist.cuda)
    flops_per_token, peak = raw.flops_per_token(run.seq_len), peak_flops(dist)
    vocab, accum = run.gpt.vocab_size, run.accum
    last_good = run.resume

    def micro_context(last: bool):
        """Gradients are reduced across ranks on the last micro-step only."""
        if dist.world == 1:
            return contextlib.nullcontext()
        if cfg.fsdp:
            raw.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else model.no_sync()

    note(dist, f"{raw.num_params() / 1e6:.2f}M parameters, {dist.world} rank(s) on {dist.device.type}, "
               f"{run.tokens_per_step} tokens/step ({accum} micro-step(s) of {cfg.batch_size}x{run.seq_len} "
               "per rank)")
    t_start = time.perf_counter()
    end_step = cfg.max_steps
    try:
        while progress.step < end_step:
            dist.check_parent()
            step = progress.step
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            wait = 0.0
            loss_sum = torch.zeros((), device=dist.device)
            for micro in range(accum):
                tw = time.perf_counter()
                x, y = batches.next()
                wait += time.perf_counter() - tw
                if int(x.max()) >= vocab or int(y.max()) >= vocab:
                    raise UsageError(f"the shards hold token id {max(int(x.max()), int(y.max()))} "
                                     f"beyond the model's vocab_size {vocab}")
                x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
                with micro_context(micro == accum - 1):
                    with autocast(run):
                        _, loss = model(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            dist.sum(loss_sum)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # read the loss only now, so the GPU is not idle while the update is launched; a
            # diverged step is never checkpointed, so the last checkpoint stays good
            train_loss = loss_sum.item() / (accum * dist.world)
            if not math.isfinite(train_loss):
                raise RunError(f"the loss is {train_loss} at step {step + 1}; stopping "
                               f"(last good checkpoint: {last_good or 'none'})", together=True)
            dt = time.perf_counter() - t0
            progress.step = step = step + 1
            progress.tokens += run.tokens_per_step
            if cfg.time_limit is not None and step < end_step:
                over = torch.tensor(float(time.perf_counter() - t_start > cfg.time_limit), device=dist.device)
                if dist.sum(over).item() > 0:  # every rank stops at the same step
                    end_step = step
                    note(dist, f"time limit of {cfg.time_limit:g}s reached: stopping at step {step} of "
                               f"{cfg.max_steps}")

            record = {"step": step, "loss": train_loss, "lr": lr,
                      "tokens_per_s": run.tokens_per_step / dt, "stall": wait / dt}
            if peak:
                record["mfu"] = flops_per_token * record["tokens_per_s"] / (peak * dist.world)
            if run.val_loader is not None and (step % cfg.eval_every == 0 or step == end_step):
                record["val_loss"] = evaluate(cfg, dist, run, model)
                if run.bytes_per_token:
                    record["val_bpb"] = record["val_loss"] / math.log(2) / run.bytes_per_token
            progress.history.append({k: record[k] for k in ("step", "loss", "lr", "val_loss", "val_bpb")
                                     if k in record})
            log(dist, record)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == end_step):
                if cfg.fsdp or dist.master:  # FSDP: every rank takes part in the forward passes
                    log(dist, {"step": step, "samples": sample(cfg, dist, run, raw)})
            if cfg.checkpoint_every >= 0 and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                                              or step == end_step):
                save_checkpoint(cfg, dist, run, raw, optimizer, batches, progress)
                last_good = f"{run.root}/checkpoints/step-{step:06d}"
    finally:
        batches.close()

    if os.environ.get("C2M_PARAM_HASH"):  # tests: every rank reports a hash of its weights
        line = json.dumps({"rank": dist.rank, "param_sha256": params_sha256(raw)}) + "\n"
        os.write(sys.stderr.fileno(), line.encode())  # one write: ranks' lines do not interleave
    write_final(cfg, dist, run, raw, progress)


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


def save_checkpoint(cfg: TrainConfig, dist: Dist, run: Run, raw: GPT, optimizer: torch.optim.Optimizer,
                    batches: Prefetcher, progress: Progress) -> None:
    """All ranks call this (gathering FSDP shards is collective); rank 0 writes the shared files,
    every rank its own loader position and RNG state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    fs, root, step = run.fs, run.root, progress.step
    model_sd = get_model_state_dict(raw, options=state_dict_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(raw, optimizer, options=state_dict_options(cpu_offload=True))
    path = f"{root}/checkpoints/step-{step:06d}"
    fs.makedirs(path, exist_ok=True)
    dist.barrier()
    rank_state = {"loader": batches.state_dict(), "cpu_rng": torch.get_rng_state()}
    if dist.cuda:
        rank_state["cuda_rng"] = torch.cuda.get_rng_state()
    write_bytes(fs, f"{path}/rank-{dist.rank:05d}.pt", torch_bytes(rank_state))
    if dist.master:
        write_bytes(fs, f"{path}/model.safetensors",
                    save_safetensors({k: v.detach().contiguous() for k, v in model_sd.items()}))
        write_bytes(fs, f"{path}/optimizer.pt", torch_bytes(optim_sd))
        write_bytes(fs, f"{path}/config.json", json.dumps(run.run_config, indent=2).encode())
    dist.barrier()
    if dist.master:
        write_bytes(fs, f"{path}/trainer.json", json.dumps(dataclasses.asdict(progress)).encode())  # the commit
        complete = [c for c in list_checkpoints(fs, root) if c[2]]
        keep_paths = {p for _, p, _ in complete[-cfg.keep_checkpoints:]}
        for s, p, done in list_checkpoints(fs, root):
            if p not in keep_paths and (done or s < step):
                try:
                    fs.rm(p, recursive=True)
                except FileNotFoundError:  # an S3 listing can still show a just-deleted prefix
                    pass
        note(dist, f"checkpoint {path}")


def resume(dist: Dist, run: Run, raw: GPT, optimizer: torch.optim.Optimizer) -> Progress:
    """Model, optimizer, this rank's loader position and RNG state from run.resume."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    fs, path = run.fs, run.resume
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
    rank_state = torch_load_safe(fs, f"{path}/rank-{dist.rank:05d}.pt")
    run.loader.load_state_dict(rank_state["loader"])
    torch.set_rng_state(rank_state["cpu_rng"])
    if dist.cuda and "cuda_rng" in rank_state:
        torch.cuda.set_rng_state(rank_state["cuda_rng"])
    trainer_state = json.loads(read_bytes(fs, f"{path}/trainer.json"))
    return Progress(step=trainer_state["step"], tokens=trainer_state["tokens"], history=trainer_state["history"])


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
# The final weights and metrics
# --------------------------------------------------------------------------------------

def write_final(cfg: TrainConfig, dist: Dist, run: Run, raw: GPT, progress: Progress) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    model_sd = get_model_state_dict(raw, options=state_dict_options(cpu_offload=True))
    if not dist.master:
        return
    fs, root, history = run.fs, run.root, progress.history
    fs.makedirs(f"{root}/final", exist_ok=True)
    write_bytes(fs, f"{root}/final/model.safetensors",
                save_safetensors({k: v.detach().contiguous() for k, v in model_sd.items()}))
    config = {**run.gpt.to_dict(), "preset": run.run_config["train"]["preset"], "bos_id": run.meta.get("bos_id"), "step": progress.step,
              "tokenizer": "tokenizer.model" if run.sp_proto else None}
    write_bytes(fs, f"{root}/final/config.json", json.dumps(config, indent=2).encode())
    if run.sp_proto:
        write_bytes(fs, f"{root}/final/tokenizer.model", run.sp_proto)
    last = history[-1] if history else {}
    evals = [h for h in history if "val_loss" in h]
    metrics = {"steps": progress.step, "tokens": progress.tokens, "num_params": raw.num_params(),
               "flops_per_token": raw.flops_per_token(run.seq_len), "final_loss": last.get("loss"),
               "final_val_loss": evals[-1]["val_loss"] if evals else None,
               "final_val_bpb": evals[-1].get("val_bpb") if evals else None,
               "history": history}
    # Only deterministic numbers go into the file (same run, same bytes, wherever it ran);
    # timings are on stdout, where the launcher collects them.
    write_bytes(fs, f"{root}/metrics.json", json.dumps(metrics, indent=1).encode())
    note(dist, f"done: {root}/final")


def main(argv=None) -> int:
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a worker under torchrun
        die_with_parent()
        if os.getppid() == 1:  # the launcher died before we could ask
            return 1
    job = parse_args(argv)
    dist = Dist(init=not job.check)
    clean = False
    try:
        train(job, dist)
        clean = True
        return 0
    except StopRun as e:
        if dist.master or not e.together:
            print(f"error: {e}", file=sys.stderr, flush=True)
        clean = e.together
        return e.status
    except Exception as e:
        if not is_storage_error(e):
            raise
        # storage gave up after its retries (an S3 outage, a full disk): one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: storage error at {job.out}: {type(e).__name__}: {msg} "
              "(checkpoints written so far are kept; rerun to resume)", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.close(clean)


if __name__ == "__main__":
    sys.exit(main())
