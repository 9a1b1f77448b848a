"""A decoder-only transformer (GPT), readable top to bottom. Pure PyTorch.

Token embedding -> n_layer x [RMSNorm -> causal self-attention with rotary positions (+ residual),
RMSNorm -> MLP (GELU, 4x) (+ residual)] -> RMSNorm -> logits over the vocabulary.

Parallelism (DDP, FSDP) and compilation are applied from outside this class, by the trainer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import PRESETS  # the model sizes by name (listed there: no torch needed to read them)


@dataclass
class GPTConfig:
    vocab_size: int = 50304      # GPT-2's 50257 rounded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    seq_len: int = 1024          # the longest context the model is trained for
    tie_embeddings: bool = True  # the output projection reuses the token embedding matrix
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or torch.compiler.is_compiling():  # a fused kernel there
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return _RMSNormCPU.apply(x, self.weight, self.eps)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm with a hand-written backward: in eager mode on CPU F.rms_norm is decomposed
    into many elementwise passes and costs ~4x more (about 10% of a small model's step)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * x_hat).sum(dim=tuple(range(grad.dim() - 1)))
        g = grad * weight
        # d/dx of x_hat = rstd * (g - x_hat * mean(g * x_hat))
        dot = torch.linalg.vecdot(g, x_hat, dim=-1).unsqueeze(-1).div_(-x_hat.size(-1))
        return torch.addcmul(g, x_hat, dot).mul_(rstd), grad_weight, None


def rotary_table(head_dim: int, seq_len: int, theta: float) -> torch.Tensor:
    """(seq_len, head_dim/2, 2): cos and sin of the angle t * theta^(-2i/head_dim) by which
    position t turns the i-th pair of a query's or key's dimensions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, ..., head_dim) by position: each pair of dimensions, read as a complex
    number, is multiplied by e^(i angle). table: (T, head_dim/2, 2), the rows for x's positions."""
    turn = torch.view_as_complex(table).view(table.size(0), *[1] * (x.dim() - 3), table.size(1))
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * turn).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding."""

    def __init__(self, config: GPTConfig, batch_size: int):
        self.shape = (batch_size, config.n_head, config.seq_len, config.n_embd // config.n_head)
        self.k: list[torch.Tensor | None] = [None] * config.n_layer
        self.v: list[torch.Tensor | None] = [None] * config.n_layer
        self.pos = 0  # how many positions are filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:  # allocated at first use, in the dtype attention runs in
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        start, end = self.pos, self.pos + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must divide by n_head"
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.residual = True  # scaled init, see GPT._init_weights

    def forward(self, x, rope, cache: KVCache | None = None):
        B, T, C = x.shape
        qk, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).split([2, 1], dim=2)
        q, k = apply_rotary(qk, rope).unbind(2)  # queries and keys rotated in one go
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.squeeze(2)))  # (B, n_head, T, head_dim)
        if cache is not None:
            causal = cache.pos == 0  # the prompt attends causally; a new token sees everything
            k, v = cache.update(self.layer, k, v)
            assert causal or T == 1, "after the prompt, decode one token at a time"
        else:
            causal = True
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.proj.residual = True
        self.dropout = config.dropout

    def forward(self, x):
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache: KVCache | None = None):
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # the trainer may switch it on
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        rope = rotary_table(config.n_embd // config.n_head, config.seq_len, config.rope_theta)
        self.register_buffer("rope", rope, persistent=False)  # derived from the config, not saved
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2: normal(0, 0.02); projections into the residual stream scaled by 1/sqrt(2 n_layer)."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy loss or None).
        With a cache, idx continues the sequence held in it (used by generate)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's seq_len {self.config.seq_len}")
        rope = self.rope[start:start + T]
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        x = self.norm(x)
        if cache is not None:
            cache.pos += T
        if targets is None:
            x = x[:, -1:]  # inference: only the last position's logits are needed
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)
        loss = None
        if targets is not None:
            # -1: a position the model is not taught (a prompt's token in SFT, padding)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -- sizes and cost ----------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in PaLM / nanoGPT: 6N for the
        matmuls with N = every weight a token is multiplied by (the embedding lookup is not a
        matmul, the output projection is), plus 12 * L * T * n_embd for attention scores."""
        c = self.config
        T = seq_len or c.seq_len
        n_matmul = self.num_params(non_embedding=True)
        if self.lm_head is None:
            n_matmul += c.vocab_size * c.n_embd  # the tied matrix is used as the output projection
        return 6 * n_matmul + 12 * c.n_layer * T * c.n_embd

    # -- sampling ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens with a KV cache. temperature 0 is greedy;
        top_k keeps the k likeliest tokens, top_p the smallest set holding probability p.
        Random draws come from `generator` (or a fresh one seeded with `seed`), never from the
        global RNG, so sampling during training does not change the training run."""
        if generator is None and seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        L = self.config.seq_len
        out = idx
        cache, logits = None, None
        for _ in range(max_new_tokens):
            if cache is None or cache.pos >= L:
                # (Re)fill the cache from the most recent tokens; when the context is full,
                # keep its last half so that refills are rare.
                context = out[:, -L:] if cache is None else out[:, -(L // 2):]
                cache = KVCache(self.config, out.size(0))
                logits, _ = self(context, cache=cache)
            logits = logits[:, -1, :].float()
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, next_id], dim=1)
            if cache.pos < L:
                logits, _ = self(next_id, cache=cache)
            # else: the next iteration refills the cache, including next_id
        return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row (B, 1) from logits (B, vocab)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the first token past p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
