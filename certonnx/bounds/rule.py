"""The contract between the bound engine and the rules: what a rule declares and implements.

A rule bounds one node of the torch.fx graph. The engine owns the traversal (IBP forward, the
CROWN backward pass, α optimisation, float-error accounting) and talks to rules only through
the methods and flags declared here, so a new op is one new class and nothing in the engine
changes. Three capabilities refine the base class:

* :class:`Rule` — every op: ``ibp``, ``backward``, and the soundness hooks (``fan_in``,
  ``forward_error``, ``propagate_error``, ``check_batch``);
* :class:`AffineLayer` — a layer with weights (Linear, MatMul by a constant, Conv) that can
  absorb a per-channel affine map after it, so IBP evaluates e.g. Conv+BatchNorm as one layer;
* :class:`ChannelAffine` — a per-channel affine map (BatchNorm), possibly with statistics of
  the clean batch (``needs_clean``/``observe``).

Shapes: a value of a perturbed node is an :class:`Interval` of shape ``(B, *s)``; a bound
matrix ``A`` is ``(B, S, *s)`` for ``S`` specification rows; a bias term is ``(B, S)`` (or the
float 0.0 when there is none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from certonnx.bounds.core import AMat, Interval

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
ALL_METHODS = frozenset(METHODS)

Value = Any  # a concrete value (tensor, number, tuple) or an Interval for perturbed inputs
Bias = torch.Tensor | float
#: what ``backward`` returns: one ``(lA, uA)`` per perturbed input, and the lower/upper bias
BackwardResult = tuple[list[tuple[AMat, AMat]], Bias, Bias]


class Rule:
    """Base class of all bound rules. One instance per graph node.

    ``leaves`` are the flattened ``(args, kwargs)`` of the node: fx nodes or literals. The
    engine resolves them to values (an :class:`Interval` for perturbed inputs, a tensor or a
    literal otherwise) and hands the list to ``ibp``/``backward``. ``pert`` lists the indices of
    perturbed leaves; ``backward`` returns one ``(lA, uA)`` per entry of ``pert``.
    """

    #: the op's name in reports (an instance may refine it, e.g. Add/Sub/Mul of one rule)
    label: str = "?"
    methods: ClassVar[frozenset[str]] = ALL_METHODS
    #: affine in its perturbed inputs (IBP may be elided through it; CROWN needs no relaxation)
    affine: ClassVar[bool] = True
    #: output is not a perturbed float tensor (shape queries): evaluated on interval lower bounds
    shape_only: ClassVar[bool] = False
    #: only re-views each sample's elements in the same order (Reshape, Flatten, Identity): the
    #: set of values after it is the set before it, so an affine layer after it still sees the
    #: input set itself (the engine skips CROWN rows that IBP already bounds exactly there)
    reorders_only: ClassVar[bool] = False
    #: the op's IBP interval is the exact range of its output given its input's interval
    #: (an elementwise monotone activation, a re-view, a slice, a sign flip): when its inputs'
    #: bounds are already CROWN-tight, CROWN identity rows for its output cannot beat IBP by
    #: much, so the engine keeps IBP there (auto_LiRPA's ``ibp_intermediate``)
    ibp_intermediate: ClassVar[bool] = False
    #: a ReLU-like op (a kink at 0, a free lower slope per neuron): branch and bound splits its
    #: neurons and tightens only the rows its unstable neurons need
    alpha_capable: ClassVar[bool] = False
    #: how many α-CROWN variables per neuron the op's relaxation has (0: none; ReLU-like: 1,
    #: the lower slope; S-shaped: 2, the lower and upper tangent points): ``backward`` then
    #: honours its ``alpha`` argument, values in [0, 1] (see ``ActivationRule.alpha_init``)
    alpha_slopes: ClassVar[int] = 0
    #: an addend (bias, residual) that an inference engine may fuse into its producer's
    #: accumulation: its rounding factor is sized from the producer's fan-in
    fusable_addend: ClassVar[bool] = False

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
        self.module: nn.Module | None = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        self._target: Callable[..., Any]
        if self.module is not None:
            self._target = self.module
        elif node.op == "call_function" and callable(node.target):
            self._target = node.target
        elif node.op == "call_method":
            name = str(node.target)
            self._target = lambda obj, *a, **k: getattr(obj, name)(*a, **k)
        else:  # pragma: no cover - the engine never builds rules for other node kinds
            raise ValueError(node.op)
        self.in_shapes: list[tuple[int, ...]] = []  # per-sample shapes of perturbed inputs (set by engine)
        self.out_shape: tuple[int, ...] = ()

    # -- matching and checks -----------------------------------------------------------------
    @classmethod
    def matches(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        """Extra check after the type/function match (e.g. which arithmetic op). A rule that
        shares a match key with another must override this to tell its nodes apart."""
        return True

    def check(self, gm: fx.GraphModule) -> None:
        """Raise :class:`UnsupportedOpError` for a configuration this rule cannot bound."""

    def check_batch(self, vals: Sequence[Value]) -> None:
        """Raise :class:`UnsupportedOpError` if the op mixes the samples of a batch (a slice or
        flip along the batch axis, a constant with a batch dimension): the engine bounds every
        sample on its own. Called once, when the shapes are first known."""

    # -- running the op ------------------------------------------------------------------------
    def call(self, vals: Sequence[Value]) -> Any:
        """Run the op on concrete values aligned with ``leaves``."""
        args, kwargs = tree_unflatten(list(vals), self._spec)
        return self._target(*args, **kwargs)

    def call_with(self, vals: Sequence[Value], repl: dict[int, Any]) -> Any:
        """Run the op with the leaves ``repl`` replaced (e.g. a bound in place of an interval)."""
        v = list(vals)
        for i, t in repl.items():
            v[i] = t
        return self.call(v)

    def describe(self) -> str:
        return f"{self.label} (node {self.node.name!r})"

    # -- bound rules ---------------------------------------------------------------------------
    def ibp(self, vals: Sequence[Value]) -> Interval:
        """Interval bounds of the output, ``(B, *out)``, from the inputs' intervals.

        Args:
            vals: the node's leaves resolved: an :class:`Interval` at each index of ``pert``,
                concrete values (weights, literals) elsewhere.
        Returns:
            an interval that contains the op's float32 output for every input in the intervals,
            however the inference engine rounds (the rule adds its own rounding allowance).
        """
        raise NotImplementedError

    def ibp_stop(self) -> bool:
        """Whether IBP's elision of the affine tail (``C`` pulled back from the output) may stop
        at this node and take its interval. Always for a relaxed op; an affine op may say so
        where its interval gives the same bound as pulling through it onto its input's interval
        (the pull-back is then work for nothing), e.g. pooling whose windows tile the input;
        the engine stops there only when that input is itself read by its interval (a relaxed
        op), see ``BoundedModule._is_stop_for_ibp``."""
        return not self.affine

    def has_alpha(self) -> bool:
        """Whether this op's relaxation takes α-CROWN variables: ``alpha_slopes > 0``, unless
        the rule supports them only for some parameters (max pooling: tiling windows)."""
        return self.alpha_slopes > 0

    def alpha_project(self, alpha: torch.Tensor) -> None:
        """Project α-CROWN's variables (``(B, S, *shape)``, already clamped to [0, 1]) in place
        onto the set the rule optimises over after each step; by default [0, 1] itself."""

    def alpha_init(self, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """α-CROWN's starting variables for input bounds ``(B, *shape)``, only for rules with
        ``alpha_slopes > 0`` (see ``ActivationRule.alpha_init``)."""
        raise NotImplementedError(f"{type(self).__name__} has no alpha-CROWN variables")

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value], alpha: torch.Tensor | None = None) -> BackwardResult:
        """One CROWN step: pull the bound matrices of the output back to the perturbed inputs.

        Args:
            lA: ``(B, S, *out)`` coefficients of the lower bound (``None``: not wanted), so that
                ``lA·y ≥ Σ_k lA_k·x_k + bl``; ``uA`` likewise for the upper bound (``≤``).
            vals: the resolved leaves, as for :meth:`ibp` (intervals of the inputs: the
                relaxation's domain).
            alpha: α-CROWN variables, only for rules with ``alpha_slopes > 0`` (others ignore it).
        Returns:
            ``([(lA_k, uA_k) per entry of pert], bl, bu)``: matrices ``(B, S, *in_k)`` (``None``
            where the corresponding output matrix was ``None``) and biases ``(B, S)`` or 0.0,
            moved outward by the op's rounding error.
        """
        raise NotImplementedError

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        """A proven upper bound of the op's Lipschitz constant in ``norm`` ("l2"/"linf") on its
        perturbed input, or ``None`` when the op has no useful one (the Lipschitz certificate
        then refuses the model)."""
        return None

    def compose_lipschitz(self, vals: Sequence[Value], norm: str, ins: Sequence[float]) -> float | None:
        """The Lipschitz constant of this node as a function of the model input, from those of
        its perturbed operands ``ins`` (one per entry of ``pert``). The default is the chain rule
        for one operand; ops that join several branches (Add, Concat) override it."""
        if len(ins) != 1:
            return None
        lip = self.lipschitz(vals, norm)
        return None if lip is None else float(lip) * ins[0]

    # -- float soundness -------------------------------------------------------------------------
    def fan_in(self, vals: Sequence[Value]) -> int:
        """Terms of the longest float sum behind one output element (0: the op is exact in
        floating point, like a ReLU or a reshape). The engine sizes the graph's rounding-error
        factor from the largest fan-in."""
        return 0

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor | float:
        """Per output element, a bound on ``|fl(op(v)) − op(v)|`` for the inputs' intervals: the
        op's own float rounding (0 for ops that are exact in floating point)."""
        return 0.0

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per output element, a bound on ``|op(v + d) − op(v)|`` when each perturbed input is
        off by at most ``errs[k]`` element-wise (``|d| ≤ errs``): how an upstream rounding error
        travels through the op. Used by ``BoundedModule.error_bound``."""
        from certonnx.errors import UnsupportedOpError

        raise UnsupportedOpError(self.label, self.node.name, "no float-error propagation rule")

    # -- clean-batch statistics --------------------------------------------------------------------
    @property
    def needs_clean(self) -> bool:
        """Whether the op needs statistics of the clean batch before a bound pass (a BatchNorm in
        training mode): the engine then runs the model on clean data first and calls
        :meth:`observe` with the op's clean input."""
        return False

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of the clean input ``x`` (see :attr:`needs_clean`)."""


class ChannelAffine(Rule):
    """A per-channel affine map ``y = s·x + t`` over axis 1 (BatchNorm), which an
    :class:`AffineLayer` before it may absorb."""

    def scale_shift(self, vals: Sequence[Value]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)``, one value per channel (clean-batch statistics after :meth:`observe`)."""
        raise NotImplementedError

    def shift_magnitude(self, vals: Sequence[Value]) -> torch.Tensor:
        """Per channel, the magnitude of the terms behind ``t`` (which may cancel to ~0 while
        their rounding does not): what the fused layer's rounding allowance must cover."""
        raise NotImplementedError


class AffineLayer(Rule):
    """A layer ``y = W x + b`` with constant weights (Linear, MatMul by a constant, Conv)."""

    #: a dense layer: :meth:`dense_matrix` gives its weights as an ``(out, in)`` matrix
    dense: ClassVar[bool] = False

    def ball_bound_exact(self, norm: str) -> bool:
        """Whether the layer's IBP bound on an input ball of ``norm`` uses each output's exact
        dual norm, so that it is what a CROWN row of that output gives (the engine then skips
        those rows): true for dense layers; a convolution says for which norms."""
        return self.dense

    def weight_bias(self, vals: Sequence[Value]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's ``(W, b)`` (``b`` may be ``None``)."""
        raise NotImplementedError

    def fused_weight_bias(self, vals: Sequence[Value], scale: torch.Tensor, shift: torch.Tensor,
                          shift_mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights, bias and bias magnitude of this layer followed by ``y ↦ scale·y + shift`` per
        output channel (see :meth:`ChannelAffine.shift_magnitude` for ``shift_mag``)."""
        raise NotImplementedError

    def ibp(self, vals: Sequence[Value], wb: tuple[torch.Tensor, torch.Tensor | None] | None = None,
            bmag: torch.Tensor | None = None) -> Interval:
        """IBP of the layer, or with ``wb``/``bmag`` of :meth:`fused_weight_bias`, of the layer
        and the channel map after it as one layer."""
        raise NotImplementedError

    def absorbs_channel_map(self) -> bool:
        """Whether a per-channel map over axis 1 of the output acts on this layer's output
        channels: true for a dense layer's ``(B, out)`` output; convolutions override it."""
        return len(self.out_shape) == 1

    def dense_matrix(self, vals: Sequence[Value]) -> torch.Tensor:
        """The weights as an ``(out, in)`` matrix for a dense layer (``y = M x + b``), whose rows
        give per-margin Lipschitz constants (only for ``dense`` layers)."""
        raise NotImplementedError

    def backward_rows(self, idx: torch.Tensor, sign: torch.Tensor, lower: bool, upper: bool,
                      vals: Sequence[Value], batch: int) -> BackwardResult | None:
        """The backward step for *selection* rows, the start of every intermediate CROWN pass:
        row ``r`` is ``sign[r]`` times output neuron ``idx[r]`` (flat; ``(S,)`` for every sample,
        or ``(B, S)``, each sample's own rows). Same result as
        :meth:`backward` with that one-hot matrix (for ``lower``/``upper``), without the
        matrix product: a dense layer slices its weights. ``None``: no shortcut, the engine
        multiplies the one-hot matrix."""
        return None


# -- registration: a rule joins the registry by its keys ----------------------------------------
Key = tuple[str, object]


class DuplicateRuleError(ValueError):
    """Two rules claim the same op without telling their nodes apart."""


_RULES: list[type[Rule]] = []  # registration order
_BY_KEY: dict[Key, list[type[Rule]]] = {}
_LABELS: dict[str, type[Rule]] = {}


def keys_of(cls: type[Rule]) -> list[Key]:
    """The match keys a rule claims."""
    keys: list[Key] = [("module", t) for t in cls.module_types]
    keys += [("function", f) for f in cls.functions]
    keys += [("method", m) for m in cls.method_names]
    keys += [("onnx2torch", n) for n in cls.onnx2torch_names]
    return keys


def _discriminates(cls: type[Rule]) -> bool:
    return any("matches" in vars(c) for c in cls.__mro__ if c is not Rule)


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule to the registry under its label and match keys.

    Raises :class:`DuplicateRuleError` for a label already registered, a rule that claims no
    key, or a key already claimed, unless both rules override ``matches``."""
    if cls.label in _LABELS:
        raise DuplicateRuleError(f"two rules are labelled {cls.label!r}: {_LABELS[cls.label].__qualname__} "
                                 f"and {cls.__qualname__}")
    keys = keys_of(cls)
    if not keys:
        raise DuplicateRuleError(f"{cls.__qualname__} claims no module type, function, method or onnx2torch name")
    for k in keys:
        for other in _BY_KEY.get(k, []):
            if not (_discriminates(cls) and _discriminates(other)):
                raise DuplicateRuleError(f"{k[0]} {getattr(k[1], '__name__', k[1])!r} is claimed by both "
                                         f"{other.__qualname__} and {cls.__qualname__}; give both a matches()")
    _LABELS[cls.label] = cls
    for k in keys:
        _BY_KEY.setdefault(k, []).append(cls)
    _RULES.append(cls)
    return cls


def registered() -> list[type[Rule]]:
    """Every registered rule class, in registration order."""
    return list(_RULES)


def candidates_for(key: Key) -> list[type[Rule]]:
    """The rules claiming a match key, in registration order (raises TypeError for an
    unhashable key: no rule can claim it)."""
    return _BY_KEY.get(key, [])
