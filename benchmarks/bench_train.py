"""Trainer throughput on CPU: model.train against a minimal single-file nanoGPT-style loop.

Same size (~5M parameters: 6 layers, 8 heads, 256 wide, vocab 1024), T=256, B=16, 2 threads,
one process each, run alternately; the figure is the median over steps (after warm-up) and
over repeats of tokens per second of a whole optimizer step (data + forward + backward + AdamW).

    python -m benchmarks.bench_train          # or: python -m benchmarks.run bench_train
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T, B, THREADS = 1024, 256, 16, 2
STEPS, WARMUP, REPEATS = 6, 2, 5

# The peer: nanoGPT's model.py + train.py boiled down (LayerNorm, learned positions, GELU MLP,
# flash attention via SDPA, tied embeddings, AdamW, random windows of an in-memory token array).
PEER = r'''
import json, math, sys, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1])); torch.manual_seed(0)
V, T, B, STEPS = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
L, H, C = 6, 8, 256
class Attn(nn.Module):
    def __init__(s):
        super().__init__(); s.c_attn = nn.Linear(C, 3 * C, bias=False); s.c_proj = nn.Linear(C, C, bias=False)
    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return s.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
class MLP(nn.Module):
    def __init__(s):
        super().__init__(); s.c_fc = nn.Linear(C, 4 * C, bias=False); s.c_proj = nn.Linear(4 * C, C, bias=False)
    def forward(s, x): return s.c_proj(F.gelu(s.c_fc(x)))
class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.ln_1 = nn.LayerNorm(C, bias=False); s.attn = Attn(); s.ln_2 = nn.LayerNorm(C, bias=False); s.mlp = MLP()
    def forward(s, x):
        x = x + s.attn(s.ln_1(x)); return x + s.mlp(s.ln_2(x))
class GPT(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte = nn.Embedding(V, C); s.wpe = nn.Embedding(T, C)
        s.h = nn.ModuleList(Block() for _ in range(L)); s.ln_f = nn.LayerNorm(C, bias=False)
        s.lm_head = nn.Linear(C, V, bias=False); s.wte.weight = s.lm_head.weight
        for n, p in s.named_parameters():
            if p.dim() == 2: nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if n.endswith("c_proj.weight") else 0.02)
    def forward(s, idx, targets):
        x = s.wte(idx) + s.wpe(torch.arange(idx.size(1)))
        for blk in s.h: x = blk(x)
        logits = s.lm_head(s.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
model = GPT()
decay = [p for p in model.parameters() if p.dim() >= 2]; nodecay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                        lr=6e-4, betas=(0.9, 0.95))
data = np.random.default_rng(0).integers(0, V, size=4_000_000, dtype=np.uint16)
def get_batch():
    ix = torch.randint(len(data) - T - 1, (B,))
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
    return x, y
print(json.dumps({"params": sum(p.numel() for p in model.parameters())}), flush=True)
for step in range(STEPS):
    t0 = time.perf_counter()
    x, y = get_batch()
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    print(json.dumps({"step": step + 1, "loss": loss.item(), "tokens_per_s": B * T / dt}), flush=True)
'''


def synthetic_shards(folder: Path, docs: int = 2000, doc_len: int = 1024) -> None:
    rng = np.random.default_rng(0)
    rows = [np.concatenate([[1], rng.integers(3, VOCAB, size=doc_len - 1)]).astype(np.uint16) for _ in range(docs)]
    (folder / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"tokens": pa.array(rows, type=pa.list_(pa.uint16()))}),
                   folder / "train" / "shard-00000.parquet", row_group_size=200)
    (folder / "meta.json").write_text(json.dumps({
        "vocab_size": VOCAB, "bos_id": 1, "dtype": "uint16",
        "splits": {"train": {"files": ["train/shard-00000.parquet"]}}}))


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**e, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT)}


def rates(stdout: str) -> list[float]:
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][WARMUP:]


def ours(data: Path, out: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-m", "model.train", "--data", str(data), "--out", str(out), "--preset", "mini",
         "--batch-size", str(B), "--seq-len", str(T), "--max-steps", str(STEPS), "--warmup-steps", "2",
         "--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0"],
        capture_output=True, text=True, env=env(), cwd=ROOT, check=True)
    return statistics.median(rates(proc.stdout))


def peer() -> float:
    proc = subprocess.run([sys.executable, "-c", PEER, str(THREADS), str(VOCAB), str(T), str(B), str(STEPS)],
                          capture_output=True, text=True, env=env(), cwd=ROOT, check=True)
    return statistics.median(rates(proc.stdout))


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="c2m-bench-train-") as tmp:
        data = Path(tmp) / "shards"
        synthetic_shards(data)
        a, b = [], []
        for i in range(REPEATS):   # alternate, so drifts in machine speed hit both
            a.append(ours(data, Path(tmp) / f"out{i}"))
            b.append(peer())
            print(f"  repeat {i + 1}: ours {a[-1]:.0f} tok/s, nanoGPT-style {b[-1]:.0f} tok/s", flush=True)
    ours_tps, peer_tps = statistics.median(a), statistics.median(b)
    from benchmarks.common import record
    record("trainer CPU tokens/s (5M params, T=256, B=16)", f"{ours_tps:.0f} tok/s",
           f"{peer_tps:.0f} tok/s (nanoGPT-style loop)", ours_tps / peer_tps,
           "python -m benchmarks.bench_train")


if __name__ == "__main__":
    run()
