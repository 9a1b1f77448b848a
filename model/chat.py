"""The chat template: one function renders a conversation to token ids, for training (with the
mask of what the model learns to say), evaluation and `crawl2model chat` (nanochat's
render_conversation, with the tokenizer's reserved tokens).

    <|bos|> [<|system|> text <|end|>] [<|passage|> text <|end_passage|> ...] <|user|> text <|end|>
    <|assistant|> text <|end|> ...

A `passage` message is corpus text put in the context (working memory: `chat --context`, and
the conversations that teach the model to use it); it is marked, never learned.

The markers are sentencepiece control symbols (tasks/tokenizer.py reserves them at fixed ids):
encoding plain text never produces one, so a message that contains the string "<|end|>" is
just text and cannot end its turn or start another's. The mask is 1 on each assistant reply's
tokens and its closing <|end|> (the model learns to stop), 0 on everything else.
"""

from __future__ import annotations

from typing import Iterator

import torch

ROLES = ("system", "user", "assistant")
BOS, END = "<|bos|>", "<|end|>"
PASSAGE, END_PASSAGE = "<|passage|>", "<|end_passage|>"


def marker(role: str) -> str:
    return f"<|{role}|>"


def _piece_id(sp, piece: str) -> int:
    i = sp.piece_to_id(piece)
    if i == sp.unk_id() or not sp.is_control(i):
        raise ValueError(f"the tokenizer lacks the chat token {piece!r}")
    return i


def special_ids(sp) -> dict[str, int]:
    """The template's reserved tokens' ids in a sentencepiece model; an error if one is missing."""
    return {piece: _piece_id(sp, piece) for piece in (BOS, END, *(marker(r) for r in ROLES))}


def system_messages(text: str | None) -> list[dict]:
    """The conversation's opening: a system message when there is a prompt, none when it is empty."""
    return [{"role": "system", "content": text}] if text else []


def render_conversation(sp, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation; cut to `max_tokens` when given."""
    tok = special_ids(sp)
    ids, mask = [tok[BOS]], [0]
    for m in messages:
        body = sp.encode(m["content"])
        if m["role"] == "passage":
            ids += [_piece_id(sp, PASSAGE), *body, _piece_id(sp, END_PASSAGE)]
            mask += [0] * (len(body) + 2)
            continue
        learn = int(m["role"] == "assistant")
        ids += [tok[marker(m["role"])], *body, tok[END]]
        mask += [0, *[learn] * len(body), learn]
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_reply(sp, messages: list[dict]) -> list[int]:
    """The ids that ask the model for the assistant's next reply: the conversation so far (its last
    message the user's) and <|assistant|>. The reply ends when the model emits <|end|>."""
    ids, _ = render_conversation(sp, messages)
    return ids + [special_ids(sp)[marker("assistant")]]


class ConversationLoader:
    """An endless stream of (x, y) int64 batches of shape (B, W) of rendered conversations for
    one rank, as nanochat's SFT feeds them: one conversation a row, cut to T + 1 tokens, padded
    with <|pad|> (x) and -1 (y) to W, the batch's longest row (at most T); y is the next token where the mask says the model should say it
    (the assistant's replies and their <|end|>), -1 elsewhere (the loss ignores -1). Conversation
    i belongs to rank i % world_size (those whose first reply starts past T + 1 tokens are left out
    and counted: `too_long`); every epoch walks this rank's in a seeded order; the state (epoch,
    position) resumes at the exact next row."""

    def __init__(self, rendered: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        mine = [r for i, r in enumerate(rendered) if i % world_size == rank]
        # a conversation whose first reply starts past T + 1 tokens teaches nothing at this length
        self.rows = [r for r in mine if any(r[1][1:seq_len + 1])]
        self.too_long = len(mine) - len(self.rows)
        if not self.rows:
            raise ValueError(f"{len(rendered)} conversation(s) are too few for {world_size} rank(s)")
        self.B, self.T, self.pad, self.rank, self.world, self.seed = batch_size, seq_len, pad_id, rank, world_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "rank": self.rank, "world_size": self.world,
                "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"], state["rows"]) != (self.rank, self.world, len(self.rows)):
            raise ValueError("loader state is from other conversations or another world size")
        self.epoch, self.pos = state["epoch"], state["pos"]

    def rewind(self) -> None:
        """Back to the start of this rank's conversations (an evaluation reads the same batches each time)."""
        self.epoch, self.pos = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order, rows = self._order(), []
        for _ in range(self.B):
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            ids, mask = self.rows[order[self.pos]]
            self.pos += 1
            rows.append((ids[:self.T + 1], mask[:self.T + 1]))
        # as wide as the batch's longest row, not T: short conversations cost no padded compute
        width = max(len(ids) - 1 for ids, _ in rows)
        x = torch.full((self.B, width), self.pad, dtype=torch.int64)
        y = torch.full((self.B, width), -1, dtype=torch.int64)
        for b, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[b, :n] = torch.tensor(ids[:-1])
            y[b, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


def fit_context(sp, messages: list[dict], limit: int) -> tuple[list[dict], int]:
    """The conversation cut to leave room for a reply within `limit` tokens: the system message
    and passages (if any) and the newest turns, the oldest dropped first, a user/assistant pair at a time;
    (the messages kept, how many were dropped). The last message, the user's, is always kept:
    a ValueError when it alone does not fit."""
    lead = 0  # the system prompt and the passages stay; turns go
    while lead < len(messages) and messages[lead]["role"] in ("system", "passage"):
        lead += 1
    system, turns, dropped = messages[:lead], messages[lead:], 0
    while len(render_for_reply(sp, system + turns)) > limit:
        if len(turns) <= 1:
            n = len(render_for_reply(sp, system + turns))
            raise ValueError(f"the message needs {n} tokens with the system prompt; the model's context holds "
                             f"{limit} with room for a reply")
        cut = 2 if len(turns) > 2 else 1
        turns, dropped = turns[cut:], dropped + cut
    return system + turns, dropped


@torch.no_grad()
def stream_reply(model, sp, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = None, seed: int | None = None) -> Iterator[int]:
    """The assistant's reply to `messages` (the last one the user's), token by token, with a KV
    cache; it ends at <|end|>, at max_new_tokens, or when the context is full."""
    from model.gpt import KVCache, sample_next

    device = model.wte.weight.device
    ids = render_for_reply(sp, messages)
    end, L = special_ids(sp)[END], model.config.seq_len
    if len(ids) >= L:
        raise ValueError(f"the conversation is {len(ids)} tokens; the model's context is {L} (fit_context cuts it)")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, 1)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache)
    for _ in range(max_new_tokens):
        next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
        token = int(next_id)
        if token == end:
            return
        yield token
        if cache.pos >= L:
            return
        logits, _ = model(next_id, cache=cache)


def stream_text(sp, tokens: Iterator[int]) -> Iterator[str]:
    """Decoded text as tokens arrive: each piece once its characters are whole (byte-fallback
    tokens of one character arrive separately)."""
    ids, shown = [], ""
    for t in tokens:
        ids.append(t)
        text = sp.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = sp.decode(ids)
    if len(text) > len(shown):
        yield text[len(shown):]


def reply_text(model, sp, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.8,
               top_k: int | None = 50, top_p: float | None = None, seed: int | None = None) -> str:
    """The assistant's whole reply to `messages`, decoded (`stream_reply` for those who need not stream)."""
    return "".join(stream_text(sp, stream_reply(model, sp, messages, max_new_tokens, temperature, top_k, top_p, seed)))
