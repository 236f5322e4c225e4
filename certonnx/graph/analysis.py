"""Graph analysis of a torch.fx model: which nodes depend on the input, who uses them, and
which pairs of nodes a pass may fold together.

These questions are about the graph alone, so they live below the bound engine: the engine,
the op registry's support table and the reports all ask them, and none of them needs the
interpreter. What the bound rules know (e.g. that a shape query does not carry the input's
value onward) comes in as a predicate, so this module imports nothing from ``certonnx.bounds``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn
from torch.utils._pytree import tree_flatten

from certonnx.errors import UnsupportedOpError

NodePredicate = Callable[[fx.Node], bool]


def trace(module: nn.Module) -> fx.GraphModule:
    """An fx graph of ``module`` (imported ONNX models already are one)."""
    if isinstance(module, fx.GraphModule):
        return module
    try:
        return fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many types
        raise UnsupportedOpError(type(module).__name__, detail=f"cannot trace the model with torch.fx: {e}") from e


def node_inputs(node: fx.Node) -> list[object]:
    """The flattened ``(args, kwargs)`` of a node: fx nodes and literals, in a fixed order (the
    order bound rules index their operands by)."""
    leaves, _ = tree_flatten((node.args, node.kwargs))
    return leaves


def input_dependent(gm: fx.GraphModule, stops: NodePredicate | None = None) -> list[fx.Node]:
    """Nodes whose value depends on the graph's first input, in topological order.

    ``stops`` marks nodes that read the input but do not carry its value onward (shape
    queries): they and what only they feed are left out."""
    dep: set[fx.Node] = set()
    order: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not dep:
                dep.add(node)
                order.append(node)
            continue
        if node.op == "output":
            continue
        if any(isinstance(a, fx.Node) and a in dep for a in node_inputs(node)):
            if stops is not None and stops(node):
                continue
            dep.add(node)
            order.append(node)
    return order


def single_input(gm: fx.GraphModule) -> fx.Node:
    """The graph's one input node; a clear error for several (the engine bounds one input)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOpError("graph", detail=f"expected one input, found {len(placeholders)}")
    return placeholders[0]


def single_output(gm: fx.GraphModule) -> fx.Node:
    """The node the graph returns (unwrapping a one-element tuple, as ONNX importers write)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    arg = out.args[0]
    if isinstance(arg, (tuple, list)):
        if len(arg) != 1:
            raise UnsupportedOpError("graph", detail="models with several outputs are not supported")
        arg = arg[0]
    if not isinstance(arg, fx.Node):
        raise UnsupportedOpError("graph", detail="the output does not depend on the input")
    return arg


def users_within(order: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node of ``order``, the nodes of ``order`` that read it (once per operand slot:
    ``x + x`` lists the Add twice, so "a single user" means a single use)."""
    members = set(order)
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in order}
    for node in order:
        for a in node_inputs(node):
            if isinstance(a, fx.Node) and a in members:
                users[a].append(node)
    return users


def foldable_pairs(
    order: list[fx.Node],
    users: dict[fx.Node, list[fx.Node]],
    first: NodePredicate,
    second: NodePredicate,
    keep: set[fx.Node],
) -> dict[fx.Node, fx.Node]:
    """``{a: b}`` for nodes ``a`` (``first(a)``) whose single use is as the first operand of
    ``b`` (``second(b)``), where nobody else needs ``a``'s own value (``a`` not in ``keep``).
    A pass may then evaluate the pair as one op (e.g. an affine layer and the BatchNorm after
    it)."""
    pairs: dict[fx.Node, fx.Node] = {}
    for a in order:
        if a in keep or not first(a):
            continue
        us = users.get(a, [])
        if len(us) != 1 or not second(us[0]):
            continue
        b_inputs = [x for x in node_inputs(us[0]) if isinstance(x, fx.Node) and x in users]
        if b_inputs == [a] and node_inputs(us[0])[0] is a:
            pairs[a] = us[0]
    return pairs
