"""The op registry: one bound rule per op family.

A rule says how to bound one node of the torch.fx graph:

* ``ibp``: interval bounds of the output from interval bounds of the inputs;
* ``backward``: the CROWN step, pulling linear bound matrices ``A`` from the output back to the
  perturbed inputs (plus a constant bias);
* ``lipschitz``: an upper bound of its Lipschitz constant (used by the Lipschitz certificate);
  ``None`` where the op has no useful one.

Rules are matched to fx nodes by module type, function, method name or (for onnx2torch's own
modules) class name, so the many spellings of one op (``nn.ReLU``, ``torch.relu``,
``x.relu()``, ``F.relu``) land in one place. Adding an op means adding one class decorated with
:func:`register`; nothing else in the engine changes. The contract a rule implements is in
:mod:`certonnx.bounds.rule`.

Registration is by key: every module type, function, method name and onnx2torch class name
a rule claims is a key, and a key claimed twice is refused at import time (as onnx2torch's
converter registry refuses a second converter), unless every rule on it tells its nodes apart
with :meth:`Rule.matches` (e.g. onnx2torch's generic ``OnnxFunction`` wrapper, which holds a
different function per node).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from certonnx.bounds import rules as _rules  # noqa: F401 - the built-in rules register on import
from certonnx.bounds.core import AMat
from certonnx.bounds.rule import (
    ALL_METHODS,
    METHODS,
    BackwardResult,
    DuplicateRuleError,
    Key,
    Rule,
    Value,
    candidates_for,
    register,
    registered,
)
from certonnx.graph.analysis import input_dependent, trace

__all__ = ["ALL_METHODS", "METHODS", "AMat", "BackwardResult", "DuplicateRuleError", "Rule", "Value",
           "lookup", "node_label", "perturbed_nodes", "register", "rules", "support_table"]

def rules() -> list[type[Rule]]:
    """Every registered rule class, in registration order."""
    return registered()


def _node_keys(node: fx.Node, gm: fx.GraphModule) -> list[Key]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        # a subclass of a registered module type matches too (isinstance semantics)
        return [("module", t) for t in type(mod).__mro__] + [("onnx2torch", type(mod).__name__)]
    if node.op == "call_function":
        return [("function", node.target)]
    if node.op == "call_method":
        return [("method", node.target)]
    return []


def lookup(node: fx.Node, gm: fx.GraphModule) -> type[Rule] | None:
    """The rule class for an fx node, or None."""
    for k in _node_keys(node, gm):
        try:
            candidates = candidates_for(k)
        except TypeError:  # an unhashable call target: no rule can claim it
            return None
        for cls in candidates:
            if cls.matches(node, gm):
                return cls
    return None


def perturbed_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose value depends on the (single) graph input, in topological order; shape
    queries (``shape_only`` rules) do not carry the input's value onward."""

    def shape_query(node: fx.Node) -> bool:
        cls = lookup(node, gm)
        return cls is not None and cls.shape_only

    return input_dependent(gm, stops=shape_query)


def node_label(node: fx.Node, gm: fx.GraphModule) -> str:
    """A readable op name for reports (the rule's label, else the module/function name)."""
    cls = lookup(node, gm)
    if cls is not None:
        return cls.label
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def support_table(module: nn.Module, sample_shape: Sequence[int] | None = None) -> dict[str, dict[str, bool]]:
    """For each op label in the input-dependent part of the graph: which methods can bound it.

    Nodes that do not depend on the input (weights, constants) need no rule and are skipped.
    """
    gm = trace(module)
    table: dict[str, dict[str, bool]] = {}
    for node in perturbed_nodes(gm):
        if node.op in ("placeholder", "output"):
            continue
        cls = lookup(node, gm)
        label = node_label(node, gm)
        row = table.setdefault(label, {m: True for m in METHODS})
        for m in METHODS:
            row[m] = row[m] and cls is not None and m in cls.methods
    return table
