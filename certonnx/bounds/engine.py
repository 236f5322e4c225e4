"""The bound engine: interprets a torch.fx graph with the registry's rules.

One ``BoundedModule`` wraps a model. ``compute`` returns sound lower/upper bounds of
``C @ f(x')`` for every ``x'`` in an :class:`InputSet`, by one of:

* ``ibp``: interval propagation; the affine tail after the last nonlinearity is folded into
  ``C`` (the usual "elision" of the last layer), which is exact for that part;
* ``crown-ibp``: intermediate bounds by IBP, the final bound by a CROWN backward pass;
* ``crown``: intermediate bounds of every nonlinearity's input by CROWN too (intersected with
  IBP, both being sound), then the final CROWN pass;
* ``alpha-crown``: CROWN, then the lower slopes of ReLUs in the final pass are optimised with
  projected Adam; the best bound seen per row is kept, so it is never looser than CROWN.

Everything is batched over samples and specification rows; nothing loops over neurons. All
bounds are differentiable w.r.t. the model's parameters, so training can backprop through them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten

from certonnx.bounds.core import InputSet, Interval
from certonnx.bounds.registry import METHODS, Rule, lookup, node_label
from certonnx.bounds.rules.common import concretize_interval
from certonnx.errors import UnsupportedOpError

FALLBACK = {"alpha-crown": "crown", "crown": "crown-ibp", "crown-ibp": "ibp"}


def trace(module: nn.Module) -> fx.GraphModule:
    """An fx graph of ``module`` (imported ONNX models already are one)."""
    if isinstance(module, fx.GraphModule):
        return module
    try:
        return fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many types
        raise UnsupportedOpError(type(module).__name__, detail=f"cannot trace the model with torch.fx: {e}") from e


def perturbed_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose value depends on the (single) graph input, in topological order."""
    pert: set[fx.Node] = set()
    order = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not pert:
                pert.add(node)
                order.append(node)
            continue
        if node.op == "output":
            continue
        leaves, _ = tree_flatten((node.args, node.kwargs))
        if any(isinstance(a, fx.Node) and a in pert for a in leaves):
            # shape queries do not carry perturbed values onward
            cls = lookup(node, gm)
            if cls is not None and cls.shape_only:
                continue
            pert.add(node)
            order.append(node)
    return order


class _Folded:
    """Marker value of an affine layer folded into the BatchNorm after it (no bounds of its own)."""

    def __repr__(self) -> str:
        return "<folded into the next BatchNorm>"


_FOLDED = _Folded()


@dataclass
class _Ctx:
    """Per-call state: values of every node (intervals for perturbed, tensors otherwise)."""

    values: dict[fx.Node, object]
    inset: InputSet


class BoundedModule:
    """A model ready for bound computation.

    Construction checks that every input-dependent node has a rule, so an unsupported op fails
    at once, naming the op, before any expensive work starts.
    """

    def __init__(self, module: nn.Module, sample_shape: Sequence[int] | None = None) -> None:
        self.gm = trace(module)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError("graph", detail=f"expected one input, found {len(placeholders)}")
        self.input_node = placeholders[0]
        outs = [n for n in self.gm.graph.nodes if n.op == "output"]
        out_arg = outs[0].args[0]
        if isinstance(out_arg, (tuple, list)):
            if len(out_arg) != 1:
                raise UnsupportedOpError("graph", detail="models with several outputs are not supported")
            out_arg = out_arg[0]
        self.output_node: fx.Node = out_arg  # type: ignore[assignment]
        self.pert = perturbed_nodes(self.gm)
        pert_set = set(self.pert)
        self.rules: dict[fx.Node, Rule] = {}
        self._shape_nodes: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            leaves, _ = tree_flatten((node.args, node.kwargs))
            idx = [i for i, a in enumerate(leaves) if isinstance(a, fx.Node) and a in pert_set]
            if not idx:
                continue
            cls = lookup(node, self.gm)
            if cls is None:
                raise UnsupportedOpError(node_label(node, self.gm), node.name, "no bound rule for this op")
            rule = cls(node, self.gm, idx)
            if cls.shape_only:
                self._shape_nodes.add(node)
            else:
                rule.check(self.gm)
            self.rules[node] = rule
        if self.output_node not in pert_set:
            raise UnsupportedOpError("graph", detail="the output does not depend on the input")
        self.users: dict[fx.Node, list[fx.Node]] = {n: [] for n in self.pert}
        for node in self.pert:
            if node in self.rules:
                for i in self.rules[node].pert:
                    self.users[self.rules[node].leaves[i]].append(node)
        # nodes whose bounds CROWN needs: the inputs of every non-affine rule
        self.relaxed_inputs: list[fx.Node] = []
        for node in self.pert:
            r = self.rules.get(node)
            if r is not None and not r.affine:
                for i in r.pert:
                    src = r.leaves[i]
                    if src not in self.relaxed_inputs:
                        self.relaxed_inputs.append(src)
        self._shapes_known = False
        self._bn_pairs = self._find_bn_pairs()

    def _find_bn_pairs(self) -> dict[fx.Node, fx.Node]:
        """``{affine node: BatchNorm node}`` for a Linear/Conv/MatMul whose only user is a
        BatchNorm over its output channels. In eval mode IBP folds the pair into one layer.

        Only pairs where nothing else needs the affine layer's own bounds: its output is not
        a relaxed input, not the model output, and feeds the BatchNorm alone.
        """
        from certonnx.bounds.rules.linear import BatchNormRule, ConvRule, LinearRule, MatMulRule

        pairs: dict[fx.Node, fx.Node] = {}
        for node, rule in self.rules.items():
            if not isinstance(rule, LinearRule | ConvRule | MatMulRule) or node in self._shape_nodes:
                continue
            users = self.users.get(node, [])
            if len(users) != 1 or node is self.output_node or node in self.relaxed_inputs:
                continue
            bn = self.rules.get(users[0])
            if isinstance(bn, BatchNormRule) and bn.pert == [0] and bn.leaves[0] is node:
                pairs[node] = users[0]
        return pairs

    def _fusable(self, node: fx.Node, rule: Rule) -> bool:
        """Whether ``node`` is the affine half of a BatchNorm pair that can be folded now: eval
        mode (running statistics are constants; training uses clean-batch statistics), channel
        axis = the layer's output axis (always for Conv, only for 2-D outputs of Linear/MatMul)."""
        bn_node = self._bn_pairs.get(node)
        if bn_node is None or not self._shapes_known:
            return False
        bn = self.rules[bn_node]
        if bn.module is not None and getattr(bn.module, "training", False):
            return False
        from certonnx.bounds.rules.linear import ConvRule

        return isinstance(rule, ConvRule) or len(rule.out_shape or ()) == 1

    def _ibp_fused(self, node: fx.Node, rule: Rule, vals: list[object], env: dict[fx.Node, object]) -> Interval:
        """IBP of an affine layer and the eval-mode BatchNorm after it, as one layer."""
        bn_node = self._bn_pairs[node]
        bn = self.rules[bn_node]
        bvals = [None if a is node else (env[a] if isinstance(a, fx.Node) else a) for a in bn.leaves]
        scale, shift = bn.scale_shift(bvals)  # type: ignore[attr-defined]
        tensors = [t for t in (*bvals[1:], *(bn.module.parameters() if bn.module is not None else ()),
                               *(bn.module.buffers() if bn.module is not None else ())) if isinstance(t, torch.Tensor)]
        key = tuple(x for t in tensors for x in (t, t._version))
        wb = rule.fused_weight_bias(vals, scale, shift, key)  # type: ignore[attr-defined]
        return rule.ibp(vals, wb)  # type: ignore[call-arg]

    # -- graph evaluation --------------------------------------------------------------------
    def _const_value(self, node: fx.Node, env: dict[fx.Node, object]) -> object:
        args = map_arg(node.args, lambda n: env[n])
        kwargs = map_arg(node.kwargs, lambda n: env[n])
        if node.op == "get_attr":
            obj: object = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)  # type: ignore[arg-type]
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)  # type: ignore[arg-type]
        raise AssertionError(node.op)

    def _resolve(self, rule: Rule, env: dict[fx.Node, object]) -> list[object]:
        return [env[a] if isinstance(a, fx.Node) else a for a in rule.leaves]

    def _clean_pass(self, x: torch.Tensor) -> None:
        """Run the model on clean data, letting rules that need clean statistics observe it."""
        env: dict[fx.Node, object] = {self.input_node: x}
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            r = self.rules.get(node)
            if r is not None and getattr(r, "needs_clean", False):
                xin = env[r.leaves[0]]
                r.observe(xin)  # type: ignore[attr-defined]
                # normalise with the batch statistics without touching the running statistics
                # (the model's own forward pass already updated them for this batch)
                vals = self._resolve(r, env)
                scale, shift = r.scale_shift(vals)  # type: ignore[attr-defined]
                shp = (-1, *([1] * (xin.ndim - 2)))  # type: ignore[union-attr]
                env[node] = xin * scale.view(shp) + shift.view(shp)  # type: ignore[operator]
                continue
            env[node] = self._const_value(node, env)

    def ibp_pass(self, inset: InputSet) -> _Ctx:
        """Interval bounds of every perturbed node (and values of every constant node)."""
        if any(getattr(r, "needs_clean", False) for r in self.rules.values()):
            self._clean_pass(inset.x)
        env: dict[fx.Node, object] = {self.input_node: inset.interval()}
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            rule = self.rules.get(node)
            if rule is None:
                env[node] = self._const_value(node, env)
                continue
            vals = self._resolve(rule, env)
            if node in self._shape_nodes:
                vals = [v.lower if isinstance(v, Interval) else v for v in vals]
                env[node] = rule.call(vals)
                continue
            if node in env:  # a BatchNorm already folded into the layer before it
                continue
            if self._fusable(node, rule):
                # the folded pair's result is the BatchNorm's; the layer's own bounds are
                # never needed (see _find_bn_pairs), so it gets a marker, not an interval
                env[self._bn_pairs[node]] = self._ibp_fused(node, rule, vals, env)
                env[node] = _FOLDED
                continue
            itv = rule.ibp(vals)
            if not self._shapes_known:
                rule.in_shapes = [tuple(vals[i].lower.shape[1:]) for i in rule.pert]  # type: ignore[union-attr]
                rule.out_shape = tuple(itv.lower.shape[1:])
            env[node] = itv
        self._shapes_known = True
        return _Ctx(env, inset)

    # -- CROWN backward pass -----------------------------------------------------------------
    def backward(
        self,
        ctx: _Ctx,
        start: fx.Node,
        lA: torch.Tensor | None,
        uA: torch.Tensor | None,
        stop: Callable[[fx.Node], bool] | None = None,
        alphas: dict[fx.Node, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Bounds of ``lA·v`` (min) and ``uA·v`` (max) for the node ``start`` (value v).

        ``A`` matrices are pulled back node by node in reverse topological order. A node for
        which ``stop`` is true (and the input) is concretized with its interval / the input set.
        """
        B = ctx.inset.batch
        S = (lA if lA is not None else uA).shape[1]  # type: ignore[union-attr]
        ref = lA if lA is not None else uA
        lb = torch.zeros(B, S, device=ref.device, dtype=ref.dtype) if lA is not None else None  # type: ignore[union-attr]
        ub = torch.zeros(B, S, device=ref.device, dtype=ref.dtype) if uA is not None else None  # type: ignore[union-attr]
        pending: dict[fx.Node, list[torch.Tensor | None]] = {start: [lA, uA]}
        start_pos = self.pert.index(start)
        for node in reversed(self.pert[: start_pos + 1]):
            if node not in pending:
                continue
            nl, nu = pending.pop(node)
            if node is self.input_node:
                if nl is not None:
                    lb = lb + ctx.inset.concretize(nl, -1.0)  # type: ignore[operator]
                if nu is not None:
                    ub = ub + ctx.inset.concretize(nu, 1.0)  # type: ignore[operator]
                continue
            if stop is not None and node is not start and stop(node):
                itv = ctx.values[node]
                if nl is not None:
                    lb = lb + concretize_interval(nl, itv, -1.0)  # type: ignore[arg-type,operator]
                if nu is not None:
                    ub = ub + concretize_interval(nu, itv, 1.0)  # type: ignore[arg-type,operator]
                continue
            rule = self.rules[node]
            vals = self._resolve(rule, ctx.values)
            if alphas is not None and node in alphas:
                outs, bl, bu = rule.backward(nl, nu, vals, alpha=alphas[node])  # type: ignore[call-arg]
            else:
                outs, bl, bu = rule.backward(nl, nu, vals)
            if lb is not None:
                lb = lb + bl
            if ub is not None:
                ub = ub + bu
            for i, (al, au) in zip(rule.pert, outs):
                src = rule.leaves[i]
                acc = pending.get(src)
                if acc is None:
                    pending[src] = [al, au]
                else:
                    acc[0] = al if acc[0] is None else (acc[0] + al if al is not None else acc[0])
                    acc[1] = au if acc[1] is None else (acc[1] + au if au is not None else acc[1])
        return lb, ub

    def tighten_rows(self, ctx: _Ctx, node: fx.Node, idx: torch.Tensor, lo_flat: torch.Tensor,
                     hi_flat: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CROWN bounds of the neurons ``idx`` of ``node`` (flattened per sample), ``chunk`` rows
        of the identity specification per backward pass, intersected with the bounds given
        (both sound). Returns new flat ``(lower, upper)`` of shape ``(B, n)``."""
        B, n = lo_flat.shape
        shape = tuple(ctx.values[node].lower.shape[1:])  # type: ignore[union-attr]
        lows, ups = [], []
        for s in range(0, idx.numel(), chunk):
            rows = idx[s : s + chunk]
            A = torch.zeros(rows.numel(), n, device=lo_flat.device, dtype=lo_flat.dtype)
            A[torch.arange(rows.numel(), device=rows.device), rows] = 1.0
            A = A.reshape(-1, *shape).unsqueeze(0).expand(B, -1, *shape)
            lb, ub = self.backward(ctx, node, A, A)
            lows.append(lb)
            ups.append(ub)
        new_lo, new_hi = lo_flat.clone(), hi_flat.clone()
        new_lo[:, idx] = torch.maximum(torch.cat(lows, 1), lo_flat[:, idx])  # type: ignore[arg-type]
        new_hi[:, idx] = torch.minimum(torch.cat(ups, 1), hi_flat[:, idx])  # type: ignore[arg-type]
        return new_lo, new_hi

    def _crown_intermediate(self, ctx: _Ctx, chunk_bytes: int) -> None:
        """Tighten the interval of every relaxed node by a CROWN pass with identity spec."""
        for node in self.relaxed_inputs:
            if node is self.input_node:
                continue
            itv: Interval = ctx.values[node]  # type: ignore[assignment]
            shape = itv.lower.shape[1:]
            n = itv.lower[0].numel()
            B = itv.lower.shape[0]
            lo_flat, hi_flat = itv.lower.reshape(B, n), itv.upper.reshape(B, n)
            if self._only_relu_users(node):
                # a ReLU whose input is stable (IBP) is exact; only unstable neurons (in any
                # sample of the batch) need tighter bounds, which is most of CROWN's saving
                idx = ((lo_flat < 0) & (hi_flat > 0)).any(0).nonzero().flatten()
            else:
                idx = torch.arange(n, device=lo_flat.device)
            if idx.numel() == 0:
                continue
            widest = max(r.lower[0].numel() for r in ctx.values.values() if isinstance(r, Interval))
            per_row = max(1, B * widest * itv.lower.element_size() * 4)
            chunk = max(1, min(idx.numel(), chunk_bytes // per_row))
            new_lo, new_hi = self.tighten_rows(ctx, node, idx, lo_flat, hi_flat, chunk)
            ctx.values[node] = Interval(new_lo.reshape(B, *shape), new_hi.reshape(B, *shape))

    def _only_relu_users(self, node: fx.Node) -> bool:
        users = self.users.get(node, [])
        return bool(users) and all(getattr(self.rules[u], "alpha_capable", False) for u in users)

    def _is_stop_for_ibp(self, node: fx.Node) -> bool:
        r = self.rules.get(node)
        return r is not None and not r.affine

    # -- public API --------------------------------------------------------------------------
    def estimate_memory(self, batch: int, method: str, spec: int = 10) -> int:
        """Rough peak bytes of a bound pass (float32), used for the fallback cascade."""
        if not self._shapes_known:
            if self.sample_shape is None:
                return 0
            self.ibp_pass(InputSet(torch.zeros(1, *self.sample_shape), 0.0))
        sizes = [int(torch.tensor(r.out_shape).prod()) for r in self.rules.values() if r.out_shape]
        total = sum(sizes) + (int(torch.tensor(self.sample_shape).prod()) if self.sample_shape else 0)
        widest = max(sizes) if sizes else 1
        ibp = batch * total * 4 * 4
        if method == "ibp":
            return ibp
        final = batch * spec * widest * 4 * 4
        if method == "crown-ibp":
            return ibp + final
        # CROWN: a chunk at a time for intermediates; bounded by the chunk budget below
        inter = min(batch * widest * widest * 4 * 4, 1 << 30)
        alpha = 3 * final if method == "alpha-crown" else 0
        return ibp + final + inter + alpha

    def compute(
        self,
        inset: InputSet,
        C: torch.Tensor | None = None,
        method: str = "ibp",
        *,
        upper: bool = True,
        alpha_steps: int = 20,
        alpha_lr: float = 0.1,
        max_memory: int | None = None,
        chunk_bytes: int = 1 << 28,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sound bounds ``(lb, ub)`` of ``C @ f(x')`` over the set, each ``(B, S)``.

        ``C`` is ``(B, S, K)`` (or ``(S, K)``); ``None`` bounds the raw outputs. With
        ``upper=False`` only the lower bound is computed (``ub`` is None), which halves the
        work in training.
        """
        method = method.lower().replace("_", "-")
        if method not in METHODS:
            raise ValueError(f"unknown bound method {method!r} (expected one of {METHODS})")
        if max_memory is not None:
            while method != "ibp" and self.estimate_memory(inset.batch, method) > max_memory:
                nxt = FALLBACK[method]
                warnings.warn(f"{method} would exceed the memory budget; falling back to {nxt}", stacklevel=2)
                method = nxt
        ctx = self.ibp_pass(inset)
        out_itv: Interval = ctx.values[self.output_node]  # type: ignore[assignment]
        out_shape = out_itv.lower.shape[1:]
        B = inset.batch
        if C is None:
            K = out_itv.lower[0].numel()
            C = torch.eye(K, device=inset.x.device, dtype=inset.x.dtype).reshape(K, *out_shape)
        if C.ndim == 1 + len(out_shape):
            C = C.unsqueeze(0).expand(B, *C.shape)
        C = C.to(dtype=inset.x.dtype, device=inset.x.device)
        uC = C if upper else None
        if method == "ibp":
            return self.backward(ctx, self.output_node, C, uC, stop=self._is_stop_for_ibp)  # type: ignore[return-value]
        if method in ("crown", "alpha-crown"):
            self._crown_intermediate(ctx, chunk_bytes)
        lb, ub = self.backward(ctx, self.output_node, C, uC)
        if method == "alpha-crown":
            lb = self._optimize_alpha(ctx, C, lb, alpha_steps, alpha_lr)  # type: ignore[arg-type]
        return lb, ub  # type: ignore[return-value]

    def _optimize_alpha(
        self, ctx: _Ctx, C: torch.Tensor, lb0: torch.Tensor, steps: int, lr: float
    ) -> torch.Tensor:
        """Optimise ReLU lower slopes for the final lower bound (intermediate bounds fixed)."""
        alphas: dict[fx.Node, torch.Tensor] = {}
        S = C.shape[1]
        for node, rule in self.rules.items():
            if getattr(rule, "alpha_capable", False):
                src = rule.leaves[rule.pert[0]]
                itv: Interval = ctx.values[src]  # type: ignore[assignment]
                l, u = itv.lower.detach(), itv.upper.detach()
                init = (u > -l).to(l.dtype)  # CROWN's adaptive slope as the start
                alphas[node] = init.unsqueeze(1).expand(-1, S, *init.shape[1:]).clone().requires_grad_(True)
        if not alphas or steps <= 0:
            return lb0
        best = lb0.detach().clone()
        # intermediate bounds are constants here: detach them from the parameter graph
        values = {k: (Interval(v.lower.detach(), v.upper.detach()) if isinstance(v, Interval) else v)
                  for k, v in ctx.values.items()}
        dctx = _Ctx(values, ctx.inset)
        params = list(alphas.values())
        # a hand-written Adam: torch.optim's first use imports torch._dynamo (seconds), which
        # would dominate one-shot verifier calls
        m1 = [torch.zeros_like(a) for a in params]
        m2 = [torch.zeros_like(a) for a in params]
        b1, b2 = 0.9, 0.999
        for t in range(1, steps + 1):
            with torch.enable_grad():
                lb, _ = self.backward(dctx, self.output_node, C.detach(), None, alphas=alphas)
                assert lb is not None
                grads = torch.autograd.grad(-lb.sum(), params)
            with torch.no_grad():
                for a, g, ma, va in zip(params, grads, m1, m2):
                    ma.mul_(b1).add_(g, alpha=1 - b1)
                    va.mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = lr * (ma / (1 - b1**t)) / ((va / (1 - b2**t)).sqrt() + 1e-8)
                    a.sub_(step).clamp_(0.0, 1.0)
                best = torch.maximum(best, lb.detach())
        with torch.no_grad():
            lb, _ = self.backward(dctx, self.output_node, C.detach(), None, alphas=alphas)
            best = torch.maximum(best, lb)  # type: ignore[arg-type]
        return best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    __call__ = forward
