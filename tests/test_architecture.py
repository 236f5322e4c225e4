"""The layering of the package, checked on the source: one direction of flow, no import cycle,
a bound engine that knows rules only through their declared contract, and a rule registry
that refuses a second rule for the same op.

* the import graph of ``certonnx/`` (every ``import`` statement, also those inside functions,
  except ``if TYPE_CHECKING:`` blocks) has no cycle;
* importing the registry (or the graph analysis) does not import the engine;
* the engine imports no concrete rule module;
* registering a rule for an op that already has one is an error, unless both rules tell their
  nodes apart with ``matches``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from certonnx.bounds import rule as rule_mod
from certonnx.bounds.rule import DuplicateRuleError, Rule, register

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "certonnx"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The ``certonnx`` modules a file imports (a ``from pkg import name`` of a submodule counts
    as that submodule)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in MODULES)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    head = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                    base = ".".join(head + ([child.module] if child.module else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    if sub in MODULES:
                        found.add(sub)
                    elif base in MODULES:
                        found.add(base)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(me)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    graph = {m: _imports(p) for m, p in MODULES.items()}
    assert len(graph) > 50
    assert _cycles(graph) == []


def test_engine_imports_no_concrete_rule() -> None:
    engine = _imports(PKG / "bounds" / "engine.py")
    assert not {m for m in engine if m.startswith("certonnx.bounds.rules")}, engine
    assert not {m for m in _imports(PKG / "graph" / "analysis.py") if m.startswith("certonnx.bounds")}


@pytest.mark.parametrize("module", ["certonnx.bounds.registry", "certonnx.graph.analysis", "certonnx.bounds.rule"])
def test_low_layers_import_without_the_engine(module: str) -> None:
    code = (f"import sys, {module}; "
            "bad = [m for m in sys.modules if m in ('certonnx.bounds.engine', 'certonnx.api', 'certonnx.train')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's stores copied, so that test rules do not stay registered."""
    monkeypatch.setattr(rule_mod, "_RULES", list(rule_mod._RULES))
    monkeypatch.setattr(rule_mod, "_BY_KEY", {k: list(v) for k, v in rule_mod._BY_KEY.items()})
    monkeypatch.setattr(rule_mod, "_LABELS", dict(rule_mod._LABELS))


def test_a_second_rule_for_an_op_is_refused(fresh_registry: None) -> None:
    import certonnx.bounds.registry  # noqa: F401 - the built-in rules are registered

    class AnotherReLU(Rule):
        label = "AnotherRelu"
        module_types = (nn.ReLU,)

    with pytest.raises(DuplicateRuleError, match="ReLU.*claimed by both"):
        register(AnotherReLU)

    class SameLabel(Rule):
        label = "Relu"
        module_types = (nn.Softsign,)

    with pytest.raises(DuplicateRuleError, match="labelled 'Relu'"):
        register(SameLabel)

    class NoKey(Rule):
        label = "NoKey"

    with pytest.raises(DuplicateRuleError, match="claims no"):
        register(NoKey)


def test_rules_sharing_a_key_must_both_discriminate(fresh_registry: None) -> None:
    class First(Rule):
        label = "TestFirst"
        onnx2torch_names = ("TestSharedWrapper",)

        @classmethod
        def matches(cls, node, gm):  # type: ignore[no-untyped-def]
            return False

    class Second(Rule):
        label = "TestSecond"
        onnx2torch_names = ("TestSharedWrapper",)

        @classmethod
        def matches(cls, node, gm):  # type: ignore[no-untyped-def]
            return True

    class Third(Rule):
        label = "TestThird"
        onnx2torch_names = ("TestSharedWrapper",)

    register(First)
    register(Second)
    with pytest.raises(DuplicateRuleError):
        register(Third)
    assert rule_mod.candidates_for(("onnx2torch", "TestSharedWrapper")) == [First, Second]


def test_type_ignores_stay_few() -> None:
    """Every ``# type: ignore`` hides a hole in the rule contract or the typing; keep them rare
    (mypy runs in CI with ``warn_unused_ignores``)."""
    n = sum(p.read_text().count("type: ignore") for p in PKG.rglob("*.py"))
    assert n < 30, f"{n} '# type: ignore' comments in certonnx/"
