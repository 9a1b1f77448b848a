"""trafilatura's discard XPaths evaluated in Python: the same elements, a fraction of the CPU.

Profiled on the filter bench (issue 14), 38% of trafilatura's CPU was two XPath expressions of
`trafilatura.xpaths.OVERALL_DISCARD_XPATH`, each run twice per page (main extraction and the
fallback comparison): `.//*[contains(@class, "footer") or ... 80 more tests of @id and @class]`.
libxml2 evaluates every one of those tests as an XPath string function on every element; in
Python the element's attributes are read once and tested with `in` and `startswith`.

`compile_xpath` translates the small XPath subset those lists are written in:

    .//*[PRED]   .//*[(self::a or self::b ...)][PRED]   .//a
    PRED := PRED or PRED | PRED and PRED | not(PRED) | (PRED)
          | contains(S, 'lit') | starts-with(S, 'lit') | S = 'lit' | @attr
    S    := @attr | translate(@attr, 'from', 'to')

with XPath's semantics: a missing attribute is the empty string to `contains`, `starts-with`
and `translate`, false to `@attr` and to `@attr = 'lit'`; `.//*` is every descendant element of
the context element (not itself, no comments); the result is in document order. Anything else
returns None and keeps its lxml XPath. `install()` swaps the translated expressions into
trafilatura's lists in place (the modules that imported them hold the same list objects).
tests/test_curation.py checks, on every real HTML page of the shared data, that each
translation selects exactly the elements lxml selects."""

from __future__ import annotations

import re
from typing import Callable

from lxml import etree

_TOKEN = re.compile(r"""\s*(?:(?P<str>"[^"]*"|'[^']*')|(?P<attr>@[\w.-]+)|(?P<name>[a-z][\w-]*(?:::[\w-]+)?)"""
                    r"""|(?P<punct>[()\[\],=]))""")
_LISTS = ("OVERALL_DISCARD_XPATH", "PAYWALL_DISCARD_XPATH", "DISCARD_IMAGE_ELEMENTS", "TEASER_DISCARD_XPATH",
          "PRECISION_DISCARD_XPATH", "REMOVE_COMMENTS_XPATH", "COMMENTS_DISCARD_XPATH")


class _Unsupported(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise _Unsupported(f"cannot read {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Predicate:
    """Recursive descent over the tokens of one predicate, emitting a Python expression over
    `a` (the element's attribute mapping); `attrs` collects the attributes it reads."""

    def __init__(self, tokens: list[tuple[str, str]], consts: dict):
        self.t, self.i, self.consts = tokens, 0, consts
        self.locals: dict[str, str] = {}  # expression -> local name: each attribute read once per element

    def local(self, expression: str) -> str:
        if expression not in self.locals:
            self.locals[expression] = f"_v{len(self.locals)}"
        return self.locals[expression]

    def peek(self) -> tuple[str, str] | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind is not None and tok[0] != kind):
            raise _Unsupported(f"expected {value or kind}, found {tok}")
        self.i += 1
        return tok[1]

    def const(self, value) -> str:
        name = f"_k{len(self.consts)}"
        self.consts[name] = value
        return name

    def expr(self) -> str:
        return self.chain("or", self.conj)

    def conj(self) -> str:
        return self.chain("and", self.atom)

    def chain(self, op: str, operand) -> str:
        """operand (op operand)*: `or` binds looser than `and`, as in XPath."""
        parts = [operand()]
        while self.peek() == ("name", op):
            self.take(op)
            parts.append(operand())
        return parts[0] if len(parts) == 1 else "(" + f" {op} ".join(parts) + ")"

    def string(self) -> str:
        """A string argument: `@attr` or `translate(@attr, 'from', 'to')`, as an expression."""
        kind, value = self.peek() or ("", "")
        if kind == "attr":
            self.take()
            return self.local(f'(a.get({value[1:]!r}) or "")')
        if (kind, value) == ("name", "translate"):
            self.take()
            self.take("(")
            inner = self.string()
            self.take(",")
            src = self.take(kind="str")[1:-1]
            self.take(",")
            dst = self.take(kind="str")[1:-1]
            self.take(")")
            table = {ord(c): (dst[i] if i < len(dst) else None) for i, c in reversed(list(enumerate(src)))}
            return self.local(f"{inner}.translate({self.const(table)})")
        raise _Unsupported(f"unsupported string {value!r}")

    def atom(self) -> str:
        kind, value = self.peek() or ("", "")
        if value == "(":
            self.take("(")
            e = self.expr()
            self.take(")")
            return e
        if (kind, value) == ("name", "not"):
            self.take()
            self.take("(")
            e = self.expr()
            self.take(")")
            return f"(not {e})"
        if kind == "name" and value in ("contains", "starts-with"):
            self.take()
            self.take("(")
            s = self.string()
            self.take(",")
            lit = self.take(kind="str")[1:-1]
            self.take(")")
            return f"({lit!r} in {s})" if value == "contains" else f"{s}.startswith({lit!r})"
        if kind == "attr":
            self.take()
            if self.peek() == ("punct", "="):
                self.take("=")
                lit = self.take(kind="str")[1:-1]
                return f"(a.get({value[1:]!r}) == {lit!r})"
            return f"({value[1:]!r} in a)"
        raise _Unsupported(f"unsupported {value!r}")


def _self_tags(tokens: list[tuple[str, str]]) -> list[str]:
    """`(self::a or self::b ...)` -> ['a', 'b', ...]."""
    if not tokens or tokens[0][1] != "(" or tokens[-1][1] != ")":
        raise _Unsupported("not a self:: list")
    tags, expect_tag = [], True
    for kind, value in tokens[1:-1]:
        if expect_tag and kind == "name" and value.startswith("self::"):
            tags.append(value[len("self::"):])
        elif not expect_tag and (kind, value) == ("name", "or"):
            pass
        else:
            raise _Unsupported("not a self:: list")
        expect_tag = not expect_tag
    if expect_tag:
        raise _Unsupported("not a self:: list")
    return tags


def _brackets(text: str) -> list[str]:
    """The bracketed predicates of `.//*[...][...]` (strings may hold brackets)."""
    out, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "[":
            depth += 1
            if depth == 1:
                start = i + 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
            elif depth < 0:
                raise _Unsupported("unbalanced brackets")
        elif depth == 0 and not c.isspace():
            raise _Unsupported(f"text between predicates: {c!r}")
    if depth or quote:
        raise _Unsupported("unbalanced brackets")
    return out


def compile_xpath(path: str) -> Callable | None:
    """A function `f(element) -> [elements]` that selects what `etree.XPath(path)` selects from
    `element`, or None when the path is outside the subset above."""
    path = path.strip()
    try:
        if re.fullmatch(r"\.//[a-z][\w-]*", path):  # .//header: every descendant of one tag
            tag = path[3:]

            def by_tag(el, _tag=tag):
                return list(_root(el).iterdescendants(_tag))

            by_tag.path = path  # like select's: what it stands for, for whoever reads the lists
            return by_tag
        if not path.startswith(".//*["):
            return None
        preds = _brackets(path[len(".//*"):])
        tags = _self_tags(_tokens(preds[0])) if len(preds) == 2 else None
        if len(preds) not in (1, 2):
            return None
        consts: dict = {}
        parser = _Predicate(_tokens(preds[-1]), consts)
        body = parser.expr()
        if parser.peek() is not None:
            raise _Unsupported(f"trailing {parser.peek()}")
    except _Unsupported:
        return None
    # Most elements carry none of the attributes tested: when the predicate is false on an
    # element without attributes, those are skipped without evaluating it.
    lines = [f"    {name} = {expression}" for expression, name in parser.locals.items()]
    source = "def test(a):\n" + "\n".join(lines) + f"\n    return {body}\n"
    scope = dict(consts)
    exec(source, scope)  # noqa: S102 (our own generated code, from the subset above)
    test = scope["test"]
    skip_bare = not test({})
    iter_args = tuple(tags) if tags else (etree.Element,)

    def select(el, _test=test, _skip=skip_bare, _args=iter_args):
        out = []
        for node in _root(el).iterdescendants(*_args):
            a = node.attrib
            if _skip and not a:
                continue
            if _test(a):
                out.append(node)
        return out

    select.path = path
    return select


def _root(el):
    return el.getroot() if isinstance(el, etree._ElementTree) else el


_installed = False


def install() -> int:
    """Swap every translatable expression of trafilatura's discard lists for its Python form;
    how many were swapped (0 once done: cheap to call before every extraction)."""
    global _installed
    if _installed:
        return 0
    from trafilatura import xpaths

    _installed, swapped = True, 0
    for name in _LISTS:
        exprs = getattr(xpaths, name)
        for i, x in enumerate(exprs):
            if isinstance(x, etree.XPath) and (fast := compile_xpath(x.path)) is not None:
                exprs[i] = fast
                swapped += 1
    return swapped
