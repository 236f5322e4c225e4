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
:func:`register`; nothing else in the engine changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from certonnx.bounds.core import Interval

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
ALL_METHODS = frozenset(METHODS)

Value = Any  # a concrete value (tensor, number, tuple) or an Interval for perturbed inputs
AMat = torch.Tensor | None


class Rule:
    """Base class of all bound rules. One instance per graph node.

    ``leaves`` are the flattened ``(args, kwargs)`` of the node: fx nodes or literals. The
    engine resolves them to values (an :class:`Interval` for perturbed inputs, a tensor or a
    literal otherwise) and hands the list to ``ibp``/``backward``. ``pert`` lists the indices of
    perturbed leaves; ``backward`` returns one ``(lA, uA)`` per entry of ``pert``.
    """

    label: ClassVar[str] = "?"
    methods: ClassVar[frozenset[str]] = ALL_METHODS
    #: affine in its perturbed inputs (IBP may be elided through it; CROWN needs no relaxation)
    affine: ClassVar[bool] = True
    #: output is not a perturbed float tensor (shape queries): evaluated on interval lower bounds
    shape_only: ClassVar[bool] = False

    #: rounding-error factor of the rule (``2·γ_N``, see :mod:`certonnx.bounds.rounding`) and the
    #: absolute error of underflowing terms; set by the engine before the first bound pass
    gamma: float = 0.0
    tiny: float = 0.0

    module_types: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Callable[..., Any], ...]] = ()
    method_names: ClassVar[tuple[str, ...]] = ()
    onnx2torch_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, node: fx.Node, gm: fx.GraphModule, pert: list[int]) -> None:
        self.node = node
        self.leaves, self._spec = tree_flatten((node.args, node.kwargs))
        self.pert = pert
        self.module: nn.Module | None = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            self._target: Callable[..., Any] = self.module  # type: ignore[assignment]
        elif node.op == "call_function":
            self._target = node.target  # type: ignore[assignment]
        elif node.op == "call_method":
            name = str(node.target)
            self._target = lambda obj, *a, **k: getattr(obj, name)(*a, **k)
        else:  # pragma: no cover - the engine never builds rules for other node kinds
            raise ValueError(node.op)
        self.in_shapes: list[tuple[int, ...]] = []  # per-sample shapes of perturbed inputs (set by engine)
        self.out_shape: tuple[int, ...] = ()

    # -- helpers ---------------------------------------------------------------------------
    @classmethod
    def matches(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        """Extra check after the type/function match (e.g. which arithmetic op)."""
        return True

    def check(self, gm: fx.GraphModule) -> None:
        """Raise :class:`UnsupportedOpError` for a configuration this rule cannot bound."""

    def call(self, vals: Sequence[Value]) -> Any:
        """Run the op on concrete values aligned with ``leaves``."""
        args, kwargs = tree_unflatten(list(vals), self._spec)
        return self._target(*args, **kwargs)

    def call_with(self, vals: Sequence[Value], repl: dict[int, Any]) -> Any:
        v = list(vals)
        for i, t in repl.items():
            v[i] = t
        return self.call(v)

    def describe(self) -> str:
        return f"{self.label} (node {self.node.name!r})"

    # -- bound rules -----------------------------------------------------------------------
    def ibp(self, vals: Sequence[Value]) -> Interval:
        raise NotImplementedError

    def backward(
        self, lA: AMat, uA: AMat, vals: Sequence[Value]
    ) -> tuple[list[tuple[AMat, AMat]], torch.Tensor | float, torch.Tensor | float]:
        raise NotImplementedError

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        return None

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor | float:
        """Per output element, a bound on ``|fl(op(v)) − op(v)|`` for the inputs' intervals: the
        op's own float rounding (0 for ops that are exact in floating point)."""
        return 0.0

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per output element, a bound on ``|op(v + d) − op(v)|`` when each perturbed input is
        off by at most ``errs[k]`` element-wise (``|d| ≤ errs``): how an upstream rounding error
        travels through the op. Used by :meth:`BoundedModule.error_bound`."""
        from certonnx.errors import UnsupportedOpError

        raise UnsupportedOpError(self.label, self.node.name, "no float-error propagation rule")

    def check_batch(self, vals: Sequence[Value]) -> None:
        """Raise :class:`UnsupportedOpError` if the op mixes the samples of a batch (a slice or
        flip along the batch axis, a constant with a batch dimension): the engine bounds every
        sample on its own. Called once, when the shapes are first known."""

    def fan_in(self, vals: Sequence[Value]) -> int:
        """Terms of the longest float sum behind one output element (0: the op is exact in
        floating point, like a ReLU or a reshape). The engine sizes the graph's rounding-error
        factor from the largest fan-in."""
        return 0


_RULES: list[type[Rule]] = []


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule to the registry."""
    _RULES.append(cls)
    return cls


def rules() -> list[type[Rule]]:
    _load_rules()
    return list(_RULES)


_loaded = False


def _load_rules() -> None:
    global _loaded
    if not _loaded:
        from certonnx.bounds import rules as _r  # noqa: F401  (registers on import)

        _loaded = True


def lookup(node: fx.Node, gm: fx.GraphModule) -> type[Rule] | None:
    """The rule class for an fx node, or None."""
    _load_rules()
    for cls in _RULES:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)  # type: ignore[arg-type]
            hit = isinstance(mod, cls.module_types) if cls.module_types else False
            hit = hit or type(mod).__name__ in cls.onnx2torch_names
        elif node.op == "call_function":
            hit = any(node.target is f for f in cls.functions)
        elif node.op == "call_method":
            hit = node.target in cls.method_names
        else:
            hit = False
        if hit and cls.matches(node, gm):
            return cls
    return None


def node_label(node: fx.Node, gm: fx.GraphModule) -> str:
    """A readable op name for reports (the rule's label, else the module/function name)."""
    cls = lookup(node, gm)
    if cls is not None:
        return cls.label
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__  # type: ignore[arg-type]
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def support_table(module: nn.Module, sample_shape: Sequence[int] | None = None) -> dict[str, dict[str, bool]]:
    """For each op label in the input-dependent part of the graph: which methods can bound it.

    Nodes that do not depend on the input (weights, constants) need no rule and are skipped.
    """
    from certonnx.bounds.engine import perturbed_nodes, trace

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
