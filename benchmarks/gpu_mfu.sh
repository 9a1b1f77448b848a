#!/usr/bin/env bash
# GPU throughput of model.train: tokens/s, MFU (against the GPU's bf16 peak) and loader stall %.
#
#   benchmarks/gpu_mfu.sh                 # gpt2-small on synthetic tokens, ~2 minutes
#   benchmarks/gpu_mfu.sh SHARD_DIR       # ... and then on real shards (meta.json + Parquet)
#
# Needs only python with torch (CUDA build), pyarrow, fsspec, numpy, safetensors, sentencepiece;
# no Prefect, no install of this project (runs from the repository root via `python -m`).
# Knobs (environment): PRESET=gpt2-small SECONDS_PER_RUN=120 BATCH=16 SEQ=1024 COMPILE=1
#   NPROC=1 (GPUs; >1 runs torchrun) PYTHON=python SKIP=20 (steps left out of the medians).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
PRESET=${PRESET:-gpt2-small}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-120}
BATCH=${BATCH:-16}
SEQ=${SEQ:-1024}
COMPILE=${COMPILE:-1}
NPROC=${NPROC:-1}
SKIP=${SKIP:-20}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/c2m-gpu-mfu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Synthetic shards: uniform random tokens in the shard format (GPT-2's vocab, 2048-token documents).
"$PY" - "$WORK/synthetic" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
root = Path(sys.argv[1]); (root / "train").mkdir(parents=True)
V, docs, n = 50257, 2048, 2048
rng = np.random.default_rng(0)
for f in range(2):
    flat = rng.integers(0, V, size=docs * n, dtype=np.uint16).reshape(docs, n)
    flat[:, 0] = 50256
    col = pa.ListArray.from_arrays(pa.array(np.arange(0, docs * n + 1, n, dtype=np.int32)), pa.array(flat.ravel()))
    pq.write_table(pa.table({"tokens": col}), root / "train" / f"shard-{f:05d}.parquet", row_group_size=256)
(root / "meta.json").write_text(json.dumps({"vocab_size": V, "bos_id": 50256, "dtype": "uint16",
    "splits": {"train": {"files": ["train/shard-00000.parquet", "train/shard-00001.parquet"]}}}))
EOF

run() {  # run NAME DATA: train for SECONDS_PER_RUN seconds, then summarise its JSON lines
  local name=$1 data=$2
  local launch=("$PY" -m model.train)
  if [ "$NPROC" -gt 1 ]; then launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m model.train); fi
  local extra=()
  if [ "$COMPILE" = 1 ]; then extra+=(--compile); fi
  echo "== $name: $PRESET, $NPROC GPU(s), batch $BATCH x $SEQ per GPU, ${SECONDS_PER_RUN}s" >&2
  "${launch[@]}" --data "$data" --out "$WORK/out-$name" --preset "$PRESET" --batch-size "$BATCH" \
      --seq-len "$SEQ" --max-steps 1000000 --warmup-steps 100 --eval-every 0 --sample-every 0 --checkpoint-every -1 \
      --time-limit "$SECONDS_PER_RUN" --dtype bf16 "${extra[@]}" > "$WORK/$name.jsonl"
  "$PY" - "$WORK/$name.jsonl" "$name" "$SKIP" <<'EOF'
import json, statistics, sys
path, name, skip = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = [r for r in map(json.loads, open(path)) if "loss" in r]
if len(steps) <= skip:
    sys.exit(f"{name}: only {len(steps)} steps ran; lower SKIP or raise SECONDS_PER_RUN")
body = steps[skip:]
tps = statistics.median(r["tokens_per_s"] for r in body)
mfu = [r["mfu"] for r in body if "mfu" in r]
stall = 100 * statistics.mean(r["stall"] for r in body)
mfu_s = f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a (unknown GPU peak)"
print(f"{name:10s} steps {len(steps):5d}  tokens/s {tps:12,.0f}  MFU {mfu_s}  loader stall {stall:.2f}%  "
      f"loss {steps[0]['loss']:.2f} -> {steps[-1]['loss']:.2f}")
EOF
}

run synthetic "$WORK/synthetic"
if [ $# -ge 1 ]; then
  run shards "$1"
fi
