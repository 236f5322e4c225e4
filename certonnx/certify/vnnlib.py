"""VNN-LIB v1 parser: input boxes plus an output condition in disjunctive normal form.

A ``.vnnlib`` file describes a *counterexample*: inputs ``X_i`` in a box (or a union of boxes)
whose outputs ``Y_j`` meet a condition. We turn the conjunction of all assertions into a list of
regions ``(lo, hi, disjuncts)``: the counterexample exists iff for some region there is an
``x`` in ``[lo, hi]`` with ``A y <= b`` (all rows) for some disjunct ``(A, b)``.

Everything a user can get wrong (unbalanced parentheses, unknown operators, undeclared or
unbounded variables, nonlinear terms) is a :class:`PropertyError` naming the line. The parser is
iterative with a depth limit, so hostile input cannot crash it with a RecursionError.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from certonnx.errors import PropertyError

__all__ = ["VnnlibProperty", "parse_vnnlib", "parse_vnnlib_file", "Region"]

MAX_DEPTH = 200
MAX_TERMS = 100_000
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"^([XY])_(\d+)$")

Region = tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]


@dataclass
class VnnlibProperty:
    """A parsed property. ``regions``: list of ``(lo (n_in,), hi (n_in,), [(A (m, n_out), b (m,))])``.

    The property is violated (``sat``) iff some region holds an input whose output satisfies
    ``A y <= b`` on every row of some disjunct.
    """

    n_inputs: int
    n_outputs: int
    regions: list[Region] = field(default_factory=list)
    path: str | None = None

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)


@dataclass
class _Node:
    items: list[object]
    line: int


@dataclass
class _Atom:
    """One linear constraint ``sum coef[v] * v + const <= 0``."""

    coef: dict[str, float]
    const: float
    line: int


def _tokenize(text: str) -> list[tuple[str, int]]:
    """Tokens with their line numbers (comments run from ';' to the end of the line)."""
    out: list[tuple[str, int]] = []
    for ln, line in enumerate(text.split("\n"), 1):
        cut = line.find(";")
        if cut >= 0:
            line = line[:cut]
        out.extend((tok, ln) for tok in _TOKEN.findall(line))
    return out


def _sexprs(tokens: list[tuple[str, int]]) -> list[_Node]:
    """Iterative s-expression reader (no recursion, bounded depth)."""
    top: list[object] = []
    stack: list[_Node] = []
    for tok, line in tokens:
        if tok == "(":
            if len(stack) >= MAX_DEPTH:
                raise PropertyError(f"line {line}: expressions nested deeper than {MAX_DEPTH}")
            stack.append(_Node([], line))
        elif tok == ")":
            if not stack:
                raise PropertyError(f"line {line}: unbalanced ')'")
            node = stack.pop()
            (stack[-1].items if stack else top).append(node)
        else:
            if not stack:
                raise PropertyError(f"line {line}: unexpected {tok!r} outside parentheses")
            stack[-1].items.append((tok, line))
    if stack:
        raise PropertyError(f"line {stack[-1].line}: unbalanced '(' (file ends inside this expression)")
    return [t for t in top if isinstance(t, _Node)]


def _head(node: _Node) -> str:
    if not node.items or not isinstance(node.items[0], tuple):
        raise PropertyError(f"line {node.line}: expected an operator after '('")
    return str(node.items[0][0])


def _number(tok: str, line: int) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise PropertyError(f"line {line}: expected a number or variable, got {tok!r}") from None
    if math.isnan(v):
        raise PropertyError(f"line {line}: NaN is not a valid constant")
    return v


class _Parser:
    def __init__(self) -> None:
        self.declared: dict[str, int] = {}

    def linear(self, t: object, line: int) -> tuple[dict[str, float], float]:
        """A linear term -> (coefficients, constant)."""
        if isinstance(t, tuple):
            tok, ln = t
            if tok in self.declared:
                return {tok: 1.0}, 0.0
            if _VAR.match(tok):
                raise PropertyError(f"line {ln}: variable {tok} is used but not declared")
            return {}, _number(tok, ln)
        assert isinstance(t, _Node)
        op = _head(t)
        args = [self.linear(a, t.line) for a in t.items[1:]]
        if op == "+":
            if not args:
                raise PropertyError(f"line {t.line}: '+' needs arguments")
            return _sum(args, [1.0] * len(args))
        if op == "-":
            if not args:
                raise PropertyError(f"line {t.line}: '-' needs arguments")
            if len(args) == 1:
                return _sum(args, [-1.0])
            return _sum(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*":
            if len(args) < 2:
                raise PropertyError(f"line {t.line}: '*' needs at least two arguments")
            with_vars = [a for a in args if a[0]]
            if len(with_vars) > 1:
                raise PropertyError(f"line {t.line}: nonlinear product of variables")
            scale = 1.0
            for c, k in args:
                if not c:
                    scale *= k
            if not with_vars:
                return {}, scale
            c, k = with_vars[0]
            coef, const = {v: w * scale for v, w in c.items()}, k * scale
            return coef, const
        raise PropertyError(f"line {t.line}: unknown operator {op!r} in a term")

    def formula(self, t: object) -> object:
        """-> _Atom list (conjunction) | ('or', [formula...]) | ('and', [formula...])."""
        if not isinstance(t, _Node):
            assert isinstance(t, tuple)
            tok, ln = t
            raise PropertyError(f"line {ln}: expected a constraint, got {tok!r}")
        op = _head(t)
        args = t.items[1:]
        if op in ("and", "or"):
            if not args:
                raise PropertyError(f"line {t.line}: empty ({op})")
            return (op, [self.formula(a) for a in args])
        if op in ("<=", ">=", "<", ">", "="):
            if len(args) != 2:
                raise PropertyError(f"line {t.line}: ({op} ...) needs exactly two arguments, got {len(args)}")
            (ca, ka), (cb, kb) = self.linear(args[0], t.line), self.linear(args[1], t.line)
            diff = dict(ca)
            for v, w in cb.items():
                diff[v] = diff.get(v, 0.0) - w
            const = ka - kb  # a - b (<= 0 for "<=")
            le = _Atom(diff, const, t.line)
            ge = _Atom({v: -w for v, w in diff.items()}, -const, t.line)
            if op in ("<=", "<"):
                return ("and", [le])
            if op in (">=", ">"):
                return ("and", [ge])
            return ("and", [le, ge])
        raise PropertyError(f"line {t.line}: unknown operator {op!r} in an assertion")


def _sum(args: list[tuple[dict[str, float], float]], signs: list[float]) -> tuple[dict[str, float], float]:
    coef: dict[str, float] = {}
    const = 0.0
    for (c, k), s in zip(args, signs):
        for v, w in c.items():
            coef[v] = coef.get(v, 0.0) + s * w
        const += s * k
    return coef, const


def _var_index(name: str) -> int:
    """The index of a declared ``X_<i>``/``Y_<j>`` (names were checked against ``_VAR``)."""
    m = _VAR.match(name)
    assert m is not None
    return int(m.group(2))


def _dnf(f: object) -> list[list[_Atom]]:
    """Disjunctive normal form of a formula tree (list of conjunctions)."""
    assert isinstance(f, tuple)
    op, parts = f
    if op == "or":
        out: list[list[_Atom]] = []
        for p in parts:
            out.extend(_dnf(p) if isinstance(p, tuple) else [[p]])
            if len(out) > MAX_TERMS:
                raise PropertyError(f"the property has more than {MAX_TERMS} disjuncts")
        return out
    # and
    terms: list[list[_Atom]] = [[]]
    for p in parts:
        sub = _dnf(p) if isinstance(p, tuple) else [[p]]
        if len(terms) * len(sub) > MAX_TERMS:
            raise PropertyError(f"the property has more than {MAX_TERMS} disjuncts")
        terms = [a + b for a in terms for b in sub] if len(sub) > 1 else [a + sub[0] for a in terms]
    return terms


def parse_vnnlib(text: str, path: str | None = None) -> VnnlibProperty:
    """Parse VNN-LIB text (see the module docstring for the result)."""
    if not isinstance(text, str):
        raise PropertyError("property text must be a string")
    where = f"{path}: " if path else ""
    try:
        return _parse(text, path)
    except PropertyError as e:
        if where and not str(e).startswith(where):
            raise PropertyError(f"{where}{e}") from None
        raise


def _parse(text: str, path: str | None) -> VnnlibProperty:
    exprs = _sexprs(_tokenize(text))
    p = _Parser()
    asserts: list[_Node] = []
    for e in exprs:
        head = _head(e)
        if head == "declare-const":
            if len(e.items) != 3 or not all(isinstance(a, tuple) for a in e.items[1:]):
                raise PropertyError(f"line {e.line}: expected (declare-const NAME Real)")
            name, typ = e.items[1][0], e.items[2][0]  # type: ignore[index]
            if typ != "Real":
                raise PropertyError(f"line {e.line}: only Real variables are supported, got {typ!r}")
            if not _VAR.match(name):
                raise PropertyError(f"line {e.line}: variable names must be X_<i> or Y_<j>, got {name!r}")
            if name in p.declared:
                raise PropertyError(f"line {e.line}: {name} declared twice")
            p.declared[name] = e.line
        elif head == "assert":
            if len(e.items) != 2:
                raise PropertyError(f"line {e.line}: (assert ...) takes exactly one formula")
            asserts.append(e)
        elif head in ("set-logic", "set-info", "check-sat", "get-model", "exit", "set-option"):
            continue
        else:
            raise PropertyError(f"line {e.line}: unknown command {head!r}")
    xs = sorted(_var_index(v) for v in p.declared if v[0] == "X")
    ys = sorted(_var_index(v) for v in p.declared if v[0] == "Y")
    if not xs:
        raise PropertyError("no input variables (declare-const X_0 Real ...) declared")
    if not ys:
        raise PropertyError("no output variables (declare-const Y_0 Real ...) declared")
    if xs != list(range(len(xs))):
        raise PropertyError(f"input variables must be X_0..X_{len(xs) - 1} without gaps")
    if ys != list(range(len(ys))):
        raise PropertyError(f"output variables must be Y_0..Y_{len(ys) - 1} without gaps")
    n_in, n_out = len(xs), len(ys)
    if not asserts:
        raise PropertyError("the property has no (assert ...)")

    base_lo = np.full(n_in, -np.inf)
    base_hi = np.full(n_in, np.inf)
    base_rows: list[_Atom] = []
    ors: list[list[list[_Atom]]] = []
    pending = [p.formula(a.items[1]) for a in asserts]
    while pending:
        f = pending.pop()
        assert isinstance(f, tuple)
        op, parts = f
        if op == "and":
            for q in parts:
                if isinstance(q, _Atom):
                    if _apply_x(q, base_lo, base_hi) is False:
                        base_rows.append(q)
                else:
                    pending.append(q)
        else:
            ors.append(_dnf(f))
    total = 1
    for o in ors:
        total *= len(o)
        if total > MAX_TERMS:
            raise PropertyError(f"the property has more than {MAX_TERMS} disjuncts")

    groups: dict[bytes, tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]] = {}
    for combo in product(*ors) if ors else [()]:
        lo, hi = base_lo.copy(), base_hi.copy()
        rows = list(base_rows)
        for term in combo:
            for atom in term:
                if _apply_x(atom, lo, hi) is False:
                    rows.append(atom)
        bad = np.where(~np.isfinite(lo) | ~np.isfinite(hi))[0]
        if bad.size:
            side = "lower" if not np.isfinite(lo[bad[0]]) else "upper"
            raise PropertyError(f"input X_{bad[0]} has no finite {side} bound")
        if np.any(lo > hi):
            continue  # an empty box: this part of the property cannot be met
        A, b = _rows(rows, n_out)
        key = lo.tobytes() + hi.tobytes()
        if key not in groups:
            groups[key] = (lo, hi, [])
        groups[key][2].append((A, b))
    regions = [(lo.astype(np.float64), hi.astype(np.float64), dis) for lo, hi, dis in groups.values()]
    return VnnlibProperty(n_in, n_out, regions, path)


def _apply_x(atom: _Atom, lo: np.ndarray, hi: np.ndarray) -> bool | None:
    """Apply a single-input bound to the box. False: not an input bound (an output row)."""
    xs = [v for v, w in atom.coef.items() if v[0] == "X" and w != 0.0]
    ys = [v for v, w in atom.coef.items() if v[0] == "Y" and w != 0.0]
    if not xs:
        return False
    if ys:
        raise PropertyError(f"line {atom.line}: constraints mixing inputs and outputs are not supported")
    if len(xs) > 1:
        raise PropertyError(f"line {atom.line}: only bounds on single inputs are supported (X_i <= c)")
    v = xs[0]
    i = int(v[2:])
    w = atom.coef[v]
    c = -atom.const / w + 0.0  # w * x + const <= 0 (+ 0.0: no negative zeros)
    if w > 0:
        hi[i] = min(hi[i], c)
    else:
        lo[i] = max(lo[i], c)
    return None


def _rows(rows: list[_Atom], n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Output rows as ``A y <= b``; no rows means "any output" (one trivially true row)."""
    if not rows:
        return np.zeros((1, n_out)), np.zeros(1)
    A = np.zeros((len(rows), n_out))
    b = np.zeros(len(rows))
    for r, atom in enumerate(rows):
        for v, w in atom.coef.items():
            A[r, int(v[2:])] += w
        b[r] = -atom.const
    return A, b


def parse_vnnlib_file(path: str | os.PathLike[str]) -> VnnlibProperty:
    """Read and parse a ``.vnnlib`` file (PropertyError when it is missing or unreadable)."""
    pth = Path(path)
    if not pth.exists():
        raise PropertyError(f"property file not found: {pth}")
    if not pth.is_file():
        raise PropertyError(f"property path is not a file: {pth}")
    try:
        text = pth.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PropertyError(f"{pth} is not a text (UTF-8) VNN-LIB file") from None
    except OSError as e:
        raise PropertyError(f"cannot read {pth}: {e.strerror or e}") from None
    return parse_vnnlib(text, str(pth))
