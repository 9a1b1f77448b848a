"""Generate text from trained weights: OUT/final/{model.safetensors, config.json, tokenizer.model}.

    python -m model.sample --model OUT/final --prompt "ROMEO:" --max-new-tokens 100 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1

Weights are read from safetensors only (no pickle). The folder may be any fsspec URL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import fsspec
import torch
from safetensors.torch import load as load_safetensors

from model.gpt import GPT, GPTConfig

_loaded: dict[tuple[str, str | None], tuple] = {}


def load(model_dir, tokenizer: str | None = None, device: str | None = None, fs=None):
    """(model in eval mode, config dict, sentencepiece processor) from a final/ folder; `fs`, an
    fsspec filesystem to read it with (one that holds credentials), else its URL's default."""
    import sentencepiece as spm

    root = str(model_dir).rstrip("/")
    key = (root, tokenizer)
    if key in _loaded:
        return _loaded[key]
    open_ = fs.open if fs is not None else fsspec.open
    with open_(f"{root}/config.json", "rb") as f:
        config = json.load(f)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in config.items() if k in fields}))
    with open_(f"{root}/model.safetensors", "rb") as f:
        model.load_state_dict(load_safetensors(f.read()))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tok_path = tokenizer or (f"{root}/{config['tokenizer']}" if config.get("tokenizer") else None)
    if tok_path is None:
        raise ValueError(f"{root} holds no tokenizer.model; pass a sentencepiece model")
    with open_(tok_path, "rb") as f:
        sp = spm.SentencePieceProcessor(model_proto=f.read())
    _loaded[key] = (model, config, sp)
    return _loaded[key]


def generate_text(model_dir, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = None, seed: int | None = 0,
                  tokenizer: str | None = None, fs=None) -> str:
    """The prompt followed by its continuation, decoded."""
    model, config, sp = load(model_dir, tokenizer, fs=fs)
    device = model.wte.weight.device
    bos = config.get("bos_id")
    ids = ([bos] if bos is not None and bos >= 0 else []) + sp.encode(prompt)
    if not ids:
        raise ValueError("empty prompt and no BOS token to start from")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
    new = [t for t in out[0, len(ids):].tolist() if t < sp.get_piece_size()]  # padded vocab ids
    return continue_text(sp, prompt, new)


def continue_text(sp, prompt: str, new_ids: list[int]) -> str:
    """prompt + the decoded continuation; decoded together with the prompt so that the space
    a continuation's first piece carries ("▁word") is kept."""
    head = sp.decode(sp.encode(prompt))
    full = sp.decode(sp.encode(prompt) + new_ids)
    return prompt + full[len(head):] if full.startswith(head) else prompt + sp.decode(new_ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the final/ folder (local or fsspec URL)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the folder's)")
    a = p.parse_args(argv)
    try:
        text = generate_text(a.model, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                             a.seed, a.tokenizer)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
