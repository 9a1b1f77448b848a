"""Words and sentences exactly as datatrove's English splitter makes them, at a fraction of the CPU.

datatrove's Gopher, C4 and FineWeb filters (and MinHash) split text with spaCy's blank English
pipeline (`datatrove.utils.word_tokenizers.SpaCyTokenizer`: the tokenizer plus the sentencizer).
Profiled on the filter bench (issue 14), that was over half of the stage's CPU: datatrove
tokenizes inside a spaCy memory zone, so every word of every document becomes a new lexeme, the
sentencizer runs even when only words are wanted, the same text is split by three filters, and C4
splits every line again into sentences.

`SpacyEnglishSplitter` is spaCy's own algorithm (`spacy/tokenizer.pyx`: `_tokenize_affixes`,
`_split_affixes`, `_attach_tokens`; `spacy/pipeline/sentencizer.pyx`: `predict`) run over spaCy's
own rules: its prefix, suffix, infix and URL expressions, its special cases and the sentencizer's
punctuation. The rules are read from spaCy once and kept as JSON in the cache folder, so a worker
does not import spaCy (seconds of CPU each). The output is token for token what datatrove's
splitter gives (`tests/test_curation.py` compares them on real pages); a document's split is
memoised for the next filter that asks for the same text, and nothing is remembered from one
document to the next.

datatrove's filters take a `WordTokenizer` in place of a language code (`language=`), which is how
the filter stage hands them this one.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata

from datatrove.pipeline.base import PipelineStep
from datatrove.utils.word_tokenizers import WordTokenizer

RULES_VERSION = 1  # of the JSON below; the spaCy version is part of its name


def _rules_path() -> str:
    from importlib.metadata import version

    from tasks.stage import cache_dir

    return os.path.join(cache_dir(), f"spacy-{version('spacy')}-en-rules-v{RULES_VERSION}.json")


def _read_spacy_rules() -> dict:
    import spacy
    from spacy.pipeline.sentencizer import Sentencizer
    from spacy.symbols import ORTH

    tok = spacy.blank("en").tokenizer

    def pattern(f) -> list | None:
        return None if f is None else [f.__self__.pattern, f.__self__.flags]

    return {"prefix": pattern(tok.prefix_search), "suffix": pattern(tok.suffix_search),
            "infix": pattern(tok.infix_finditer), "token_match": pattern(tok.token_match),
            "url_match": pattern(tok.url_match),
            "specials": {k: [piece[ORTH] for piece in v] for k, v in tok.rules.items()},
            "punct_chars": sorted(Sentencizer.default_punct_chars)}


def spacy_english_rules() -> dict:
    """spaCy's English tokenizer rules, read from spaCy the first time and cached."""
    path = _rules_path()
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    rules = _read_spacy_rules()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rules, f)
    os.replace(tmp, path)
    return rules


def _is_punct(text: str) -> bool:  # spacy.lang.lex_attrs.is_punct
    return all(unicodedata.category(c).startswith("P") for c in text)


class SpacyEnglishSplitter(WordTokenizer):
    """datatrove's `SpaCyTokenizer("en")`, token for token, without spaCy."""

    def __init__(self):
        super().__init__("en")
        self._rules = None
        self._last_text, self._last_words = None, None
        # A run's tokens, remembered for one document (from `new_document()` to the next, which
        # the `NewDocument` step calls) or, when no step says where documents start, for one text:
        # never across documents.
        self.per_document, self._runs = False, {}

    def __getstate__(self):  # the compiled rules are rebuilt in the process that uses them
        return {**self.__dict__, "_rules": None, "_last_text": None, "_last_words": None, "_runs": {}}

    def new_document(self) -> None:
        self._runs = {}
        self._last_text, self._last_words = None, None

    def _run_memo(self) -> dict[str, list[str]]:
        return self._runs if self.per_document else {}

    def _load(self) -> None:
        r = spacy_english_rules()

        def compiled(p):
            return None if p is None else re.compile(p[0], p[1])

        self._prefix, self._suffix = compiled(r["prefix"]), compiled(r["suffix"])
        self._infix, self._url = compiled(r["infix"]), compiled(r["url_match"])
        self._token_match = compiled(r["token_match"])
        self._specials = r["specials"]
        self._punct_chars = frozenset(r["punct_chars"])
        # Special cases that affix splitting would break up ("8)", "z.B."): spaCy finds their
        # affix-split token sequences in the tokens and puts the special case back (its
        # `_special_matcher`), which `_merge_specials` does within each span.
        self._rules = r
        self._split_specials: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for string in self._specials:
            if self._find(self._prefix, string) or self._find(self._suffix, string) \
                    or self._infix.search(string) or " " in string:
                pieces = tuple(self._tokenize(string, with_special_cases=False))
                self._split_specials.setdefault(pieces[0], []).append((pieces, string))
        for patterns in self._split_specials.values():
            patterns.sort(key=lambda p: -len(p[0]))  # the longest match wins

    # -- the tokenizer: spacy/tokenizer.pyx, with the same names

    def _words(self, text: str) -> list[str]:
        """The non-space tokens of `text`: each run of non-space characters, split."""
        if text is self._last_text:
            return self._last_words
        if self._rules is None:
            self._load()
        words: list[str] = []
        seen = self._run_memo()
        for run in text.split():
            pieces = seen.get(run)
            if pieces is None:
                pieces = seen[run] = self._tokenize(run)
            words.extend(pieces)
        self._last_text, self._last_words = text, words
        return words

    def _tokens(self, text: str) -> tuple[list[str], list[int]]:
        """Every token of `text` and its offset, whitespace tokens included (a single space
        between two tokens is not one: spaCy keeps it as the first one's trailing space)."""
        if self._rules is None:
            self._load()
        tokens: list[str] = []
        offsets: list[int] = []
        seen = self._run_memo()
        for m in _SPANS.finditer(text):  # runs of whitespace and of non-space characters
            span, at = m.group(), m.start()
            if span[0] == " " and at:  # the previous token's trailing space
                span, at = span[1:], at + 1
                if not span:
                    continue
            pieces = seen.get(span)
            if pieces is None:
                pieces = seen[span] = self._tokenize(span)
            for piece in pieces:
                tokens.append(piece)
                offsets.append(at)
                at += len(piece)
        return tokens, offsets

    @staticmethod
    def _find(pattern, string: str) -> int:
        m = pattern.search(string)
        return m.end() - m.start() if m else 0

    def _tokenize(self, span: str, with_special_cases: bool = True) -> list[str]:
        specials = self._specials if with_special_cases else {}
        special = specials.get(span)
        if special is not None:
            return special
        if span.isascii() and span.isalpha():  # no English affix, infix or URL rule splits a-z
            return [span]
        prefixes: list[str] = []
        suffixes: list[str] = []
        string = self._split_affixes(span, prefixes, suffixes, specials)
        tokens = self._attach_tokens(string, prefixes, suffixes, specials)
        return self._merge_specials(tokens) if with_special_cases and len(tokens) > 1 else tokens

    def _merge_specials(self, tokens: list[str]) -> list[str]:
        """spaCy's `_apply_special_cases` within one span (its tokens have no space between them):
        every match of a split special case, the longest first and then from the left, is kept
        unless a match looked at before it covers its first or last token (`_filter_special_spans`:
        a match that is not kept still covers its tokens)."""
        split_specials = self._split_specials
        if not any(t in split_specials for t in tokens):
            return tokens
        matches = [(len(pieces), i, string) for i, t in enumerate(tokens) for pieces, string in split_specials.get(t, ())
                   if tuple(tokens[i:i + len(pieces)]) == pieces]
        covered: set[int] = set()
        kept = {}
        for length, start, string in sorted(matches, key=lambda m: (-m[0], m[1])):
            if start not in covered and start + length - 1 not in covered:
                kept[start] = (length, string)
            covered.update(range(start, start + length))
        out, i = [], 0
        while i < len(tokens):
            if i in kept:
                length, string = kept[i]
                out.extend(self._specials[string])
                i += length
            else:
                out.append(tokens[i])
                i += 1
        return out

    def _split_affixes(self, string: str, prefixes: list[str], suffixes: list[str], specials: dict) -> str:
        token_match = self._token_match
        last_size = 0
        while string and len(string) != last_size:
            if token_match is not None and token_match.match(string):
                break
            if string in specials:
                break
            last_size = len(string)
            m = self._prefix.search(string)
            pre_len = m.end() - m.start() if m else 0
            if pre_len:
                prefix, minus_pre = string[:pre_len], string[pre_len:]
                if minus_pre and minus_pre in specials:
                    prefixes.append(prefix)
                    return minus_pre
            m = self._suffix.search(string[pre_len:])
            suf_len = m.end() - m.start() if m else 0
            if suf_len:
                suffix, minus_suf = string[-suf_len:], string[:-suf_len]
                if minus_suf and minus_suf in specials:
                    suffixes.append(suffix)
                    return minus_suf
            if pre_len and suf_len and pre_len + suf_len <= len(string):
                string = string[pre_len:-suf_len]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif pre_len:
                string = minus_pre
                prefixes.append(prefix)
            elif suf_len:
                string = minus_suf
                suffixes.append(suffix)
        return string

    def _attach_tokens(self, string: str, prefixes: list[str], suffixes: list[str], specials: dict) -> list[str]:
        tokens = prefixes
        if string:
            special = specials.get(string)
            if special is not None:
                tokens.extend(special)
            elif ((self._token_match is not None and self._token_match.match(string))
                  or (self._url is not None and self._url.match(string))):
                tokens.append(string)
            else:
                start = 0
                for match in self._infix.finditer(string):
                    infix_start, infix_end = match.span()
                    if infix_start == 0:  # an infix at the very start is not split off
                        continue
                    if infix_start != start:
                        tokens.append(string[start:infix_start])
                    if infix_start != infix_end:
                        tokens.append(string[infix_start:infix_end])
                    start = infix_end
                if string[start:]:
                    tokens.append(string[start:])
        tokens.extend(reversed(suffixes))
        return tokens

    # -- the sentencizer: spacy/pipeline/sentencizer.pyx

    def _sentence_starts(self, tokens: list[str]) -> list[int]:
        if not tokens:
            return []
        starts, seen_period, punct_chars = [0], False, self._punct_chars
        for i, token in enumerate(tokens):
            in_punct_chars = token in punct_chars
            if seen_period and not in_punct_chars and not _is_punct(token):
                starts.append(i)
                seen_period = False
            elif in_punct_chars:
                seen_period = True
        return starts

    # -- datatrove's WordTokenizer interface

    def word_tokenize(self, text: str) -> list[str]:
        return self._words(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        tokens, offsets = self._tokens(text)
        starts = self._sentence_starts(tokens)
        ends = starts[1:] + [len(tokens)]
        return [(offsets[a], offsets[b - 1] + len(tokens[b - 1])) for a, b in zip(starts, ends)]

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (text[a:b].strip() for a, b in self.span_tokenize(text)) if s]


class NewDocument(PipelineStep):
    """Marks where each document starts for `words`, which then remembers the document's words
    for every filter after this step (C4's per-line sentences and FineWeb's words of C4's output
    are runs already split for Gopher) and forgets them at the next document."""

    type = "✂️ - SPLIT"
    name = "new document"

    def __init__(self, words: SpacyEnglishSplitter):
        super().__init__()
        self.words = words
        words.per_document = True

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.words.new_document()
            yield doc


_SPANS = re.compile(r"\s+|\S+")
