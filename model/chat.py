"""The chat template: one function renders a conversation to token ids, for training (with the
mask of what the model learns to say), evaluation and `crawl2model chat` (nanochat's
render_conversation, with the tokenizer's reserved tokens).

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

The markers are sentencepiece control symbols (tasks/tokenizer.py reserves them at fixed ids):
encoding plain text never produces one, so a message that contains the string "<|end|>" is
just text and cannot end its turn or start another's. The mask is 1 on each assistant reply's
tokens and its closing <|end|> (the model learns to stop), 0 on everything else.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
BOS, END = "<|bos|>", "<|end|>"


def marker(role: str) -> str:
    return f"<|{role}|>"


def special_ids(sp) -> dict[str, int]:
    """The template's reserved tokens' ids in a sentencepiece model; an error if one is missing."""
    ids = {}
    for piece in (BOS, END, *(marker(r) for r in ROLES)):
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() or not sp.is_control(i):
            raise ValueError(f"the tokenizer lacks the chat token {piece!r}")
        ids[piece] = i
    return ids


def render_conversation(sp, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation; cut to `max_tokens` when given."""
    tok = special_ids(sp)
    ids, mask = [tok[BOS]], [0]
    for m in messages:
        body = sp.encode(m["content"])
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
