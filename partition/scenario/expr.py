"""The expectation language: small expressions over a run's metrics, parsed, never ``eval``'d.

Grammar (lowest precedence first)::

    expr    := and ('or' and)*
    and     := not ('and' not)*
    not     := 'not' not | compare
    compare := sum (('==' | '!=' | '<' | '<=' | '>' | '>=') sum)?
    sum     := product ('+' product)*
    product := atom ('*' atom)*
    atom    := NUMBER | STRING | 'true' | 'false' | NAME '.' METRIC | '(' expr ')'

Why a parser of our own: a scenario file is input from whoever wrote it, and the run happens as
root with pinned processes. ``eval`` (even on a restricted namespace) executes attribute walks
and calls; this language can only read metrics, add, multiply and compare.

Values are numbers, strings, booleans, or None for a metric that has no value in this run (a
fault that never fired has no ``detect_ms``). Any operation on None, and comparing a string with
a number, is an ``EvalError`` that names the operand: the expectation then fails and says why,
instead of quietly being False.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from partition.errors import InvalidSpec


class ExprError(InvalidSpec):
    """The expression is not in the language (a scenario-file error, found before any boot)."""


class EvalError(Exception):
    """The expression is well formed but cannot be decided with this run's values."""


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<str>'[^'\\]*'|"[^"\\]*")
  | (?P<ref>[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|<|>|\*|\+|\(|\))
""", re.X)
_WORDS = {"and", "or", "not", "true", "false"}
#: an expectation is a line of a file, not a program: parentheses and 'not' nest at most this
#: deep, and it holds at most this many tokens. The parser, ``refs`` and ``evaluate`` recurse
#: once a level (a chain of '+' is a left-deep tree), so without the bounds a file of 5000
#: '(' would be Python's RecursionError instead of a scenario error.
MAX_DEPTH, MAX_TOKENS = 32, 400
#: digits in a number: more than any metric has (int() refuses 4300 with a ValueError)
MAX_DIGITS = 30
_COMPARE = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Ref:
    name: str
    metric: str

    def __str__(self) -> str:
        return f"{self.name}.{self.metric}"


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


Node = Const | Ref | Unary | Binary


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExprError(f"expectation {text!r}: unexpected {text[pos]!r} at column {pos + 1}",
                            "use numbers, 'strings', name.metric, == != < <= > >=, and or "
                            "not, * + and parentheses")
        kind = m.lastgroup
        assert kind is not None
        if kind == "word" and m.group() not in _WORDS:
            raise ExprError(f"expectation {text!r}: {m.group()!r} at column {pos + 1} is not a "
                            "metric reference", "write NAME.METRIC, e.g. db.restarts")
        if kind != "ws":
            out.append((kind, m.group(), pos))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        if len(self.toks) > MAX_TOKENS:
            raise ExprError(f"expectation {_brief(text)} has {len(self.toks)} tokens, more than "
                            f"{MAX_TOKENS}", "split it into several expectations (each one a "
                                             "line of expect)")

    def _nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"expectation {_brief(self.text)} nests parentheses or 'not' more "
                            f"than {MAX_DEPTH} deep", "write it flatter, or split it into "
                                                      "several expectations")

    def _peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def _take(self) -> tuple[str, str, int]:
        if self.i >= len(self.toks):
            raise ExprError(f"expectation {self.text!r} ends too early",
                            "complete the expression")
        t = self.toks[self.i]
        self.i += 1
        return t

    def parse(self) -> Node:
        node = self._or()
        if self.i != len(self.toks):
            _, tok, pos = self.toks[self.i]
            raise ExprError(f"expectation {self.text!r}: unexpected {tok!r} at column {pos + 1}",
                            "join conditions with 'and' / 'or'")
        return node

    def _chain(self, ops: tuple[str, ...], operand: Callable[[], Node]) -> Node:
        """One left-associative precedence level: operand (op operand)*."""
        node = operand()
        while self._peek() in ops:
            op = self._take()[1]
            node = Binary(op, node, operand())
        return node

    def _or(self) -> Node:
        return self._chain(("or",), self._and)

    def _and(self) -> Node:
        return self._chain(("and",), self._not)

    def _not(self) -> Node:
        if self._peek() == "not":
            self._take()
            self._nest()
            node = Unary("not", self._not())
            self.depth -= 1
            return node
        return self._compare()

    def _compare(self) -> Node:
        node = self._sum()
        if self._peek() in _COMPARE:
            op = self._take()[1]
            node = Binary(op, node, self._sum())
            if self._peek() in _COMPARE:
                raise ExprError(f"expectation {self.text!r}: chained comparison",
                                "write a < b and b < c")
        return node

    def _sum(self) -> Node:
        return self._chain(("+",), self._product)

    def _product(self) -> Node:
        return self._chain(("*",), self._atom)

    def _atom(self) -> Node:
        kind, tok, pos = self._take()
        if kind == "num":
            if sum(c.isdigit() for c in tok) > MAX_DIGITS:
                raise ExprError(f"expectation {_brief(self.text)}: the number at column "
                                f"{pos + 1} has more than {MAX_DIGITS} digits",
                                "no metric is that large: write e.g. 1e30")
            return Const(float(tok) if any(c in tok for c in ".eE") else int(tok))
        if kind == "str":
            return Const(tok[1:-1])
        if kind == "ref":
            name, metric = tok.split(".")
            return Ref(name, metric)
        if tok in ("true", "false"):
            return Const(tok == "true")
        if tok == "(":
            self._nest()
            node = self._or()
            self.depth -= 1
            if self._peek() != ")":
                raise ExprError(f"expectation {self.text!r}: missing ')'", "close the parenthesis")
            self._take()
            return node
        raise ExprError(f"expectation {self.text!r}: unexpected {tok!r} at column {pos + 1}",
                        "an operand goes here: a number, a 'string' or name.metric")


def _brief(text: str) -> str:
    """The expectation, quoted, cut short if it is long (an error quotes it, a bound's error
    must not quote 5000 parentheses)."""
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def parse(text: str) -> Node:
    if not isinstance(text, str) or not text.strip():
        raise ExprError(f"expectation {text!r} is empty or not a string",
                        "write e.g. \"db.restarts == 1\"")
    return _Parser(text).parse()


def refs(node: Node) -> list[Ref]:
    """Every metric the expression reads, in order (validation checks each one exists)."""
    if isinstance(node, Ref):
        return [node]
    if isinstance(node, Unary):
        return refs(node.operand)
    if isinstance(node, Binary):
        return refs(node.left) + refs(node.right)
    return []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate(node: Node, lookup: Callable[[Ref], Any]) -> Any:
    """Value of ``node``; ``lookup`` gives a metric's value (None: no value in this run)."""
    if isinstance(node, Const):
        return node.value
    if isinstance(node, Ref):
        v = lookup(node)
        if v is None:
            raise EvalError(f"{node} has no value in this run")
        return v
    if isinstance(node, Unary):
        return not _truth(evaluate(node.operand, lookup), node.operand)
    left = evaluate(node.left, lookup)
    if node.op == "and":
        return _truth(left, node.left) and _truth(evaluate(node.right, lookup), node.right)
    if node.op == "or":
        return _truth(left, node.left) or _truth(evaluate(node.right, lookup), node.right)
    right = evaluate(node.right, lookup)
    if node.op in ("+", "*"):
        if not (_is_number(left) and _is_number(right)):
            raise EvalError(f"'{node.op}' needs numbers, got {left!r} and {right!r}")
        return left + right if node.op == "+" else left * right
    if node.op not in ("==", "!=") and not (
            (_is_number(left) and _is_number(right))
            or (isinstance(left, str) and isinstance(right, str))):
        raise EvalError(f"cannot order {left!r} and {right!r} with '{node.op}'")
    return _COMPARE[node.op](left, right)


def _truth(value: Any, node: Node) -> bool:
    if isinstance(value, bool):
        return value
    raise EvalError(f"{_show(node)} is {value!r}, not true or false")


def _show(node: Node) -> str:
    if isinstance(node, Ref):
        return str(node)
    if isinstance(node, Const):
        return repr(node.value)
    return "the expression"
