"""CROWN bounds under ReLU split constraints, for branch and bound on activations.

A *domain* is an input box plus a sign assignment for some ReLU inputs (pre-activations):
``+1`` means "only inputs with z >= 0", ``-1`` "only inputs with z <= 0", ``0`` free. The two
children of a split cover their parent, so proving every leaf proves the root.

Soundness of one domain's bound: the intermediate bounds are computed layer by layer with
CROWN exactly as the engine does, and after each layer the split neurons' intervals are clamped
(``lower := max(lower, 0)`` for +1, ``upper := min(upper, 0)`` for -1). Those intervals are valid
on the domain's input set (box ∩ the sign constraints), so every relaxation built from them is
valid there, and concretizing over the whole box (a superset) stays sound. A domain whose
clamped interval is empty (e.g. +1 but a sound upper bound below 0) contains no input at all.

This uses the bound engine's internals (``ibp_pass``, ``backward``, ``relaxed_inputs``) and is
only used when every relaxed node feeds ReLU-like rules.
"""

from __future__ import annotations

from typing import Any

import torch

from certonnx.bounds import InputSet, Interval
from certonnx.bounds.engine import row_count, unstable_rows


class ReluSplitBounder:
    """Batched CROWN with per-domain ReLU splits; ``splits`` is ``(B, total_neurons)`` int8."""

    def __init__(self, bm: Any, chunk_bytes: int = 1 << 27) -> None:
        self.bm = bm
        self.chunk_bytes = chunk_bytes
        nodes = [n for n in bm.relaxed_inputs if n is not bm.input_node]
        self.usable = bool(nodes) and all(bm._only_relu_users(n) for n in nodes)
        self.nodes = nodes if self.usable else []
        self.sizes: list[int] = []
        self.total = 0
        #: α/β state ``(B, P)`` of the last ``bound`` call with ``opt_steps > 0`` (warm starts)
        self.state: torch.Tensor | None = None
        #: branching scores ``(B, total)`` of the last ``bound`` call with ``opt_steps > 0``
        self.scores: torch.Tensor | None = None

    def _init_sizes(self, ctx: Any) -> None:
        if not self.sizes:
            self.sizes = [int(ctx.values[n].lower[0].numel()) for n in self.nodes]
            self.total = sum(self.sizes)

    def bound(
        self,
        lo: torch.Tensor,
        hi: torch.Tensor,
        splits: torch.Tensor | None,
        C: torch.Tensor,
        prior: tuple[torch.Tensor, torch.Tensor] | None = None,
        opt_steps: int = 0,
        lr: float = 0.1,
        warm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lb (B, S), empty (B,), pre_lo (B, total), pre_hi (B, total))`` for the domains.

        ``prior``: pre-activation bounds of the parent domains (valid on a superset of each
        domain), intersected with the new ones so children are never looser than parents.
        ``opt_steps > 0``: also optimise ReLU lower slopes (α) and split multipliers (β) for the
        final bound, keeping the best bound seen per row (every iterate is a valid bound),
        starting from ``warm`` (the parents' state) when given; the end state is ``self.state``.
        """
        bm = self.bm
        B = lo.shape[0]
        inset = InputSet.from_box(lo, hi)
        with torch.no_grad():
            ctx = bm.ibp_pass(inset)
            self._init_sizes(ctx)
            empty = torch.zeros(B, dtype=torch.bool, device=lo.device)
            pre_lo, pre_hi = [], []
            off = 0
            for node, size in zip(self.nodes, self.sizes):
                itv: Interval = ctx.values[node]
                shape = itv.lower.shape[1:]
                lo_f, hi_f = itv.lower.reshape(B, size), itv.upper.reshape(B, size)
                if prior is not None:
                    lo_f = torch.maximum(lo_f, prior[0][:, off:off + size])
                    hi_f = torch.minimum(hi_f, prior[1][:, off:off + size])
                if splits is not None:
                    sp = splits[:, off:off + size]
                    # clamp with the splits of this node before its CROWN pass too (IBP part)
                    lo_f = torch.where(sp > 0, lo_f.clamp_min(0.0), lo_f)
                    hi_f = torch.where(sp < 0, hi_f.clamp_max(0.0), hi_f)
                # each domain's own unstable neurons where that is much less than the union
                # (domains of one instance differ in which neurons their splits settled)
                idx = unstable_rows((lo_f < 0) & (hi_f > 0))
                if row_count(idx):
                    ctx.values[node] = Interval(lo_f.reshape(B, *shape), hi_f.reshape(B, *shape))
                    per_row = max(1, B * max(self.sizes + [int(lo[0].numel())]) * 16)
                    chunk = max(1, min(row_count(idx), self.chunk_bytes // per_row))
                    lo_f, hi_f = bm.tighten_rows(ctx, node, idx, lo_f, hi_f, chunk)
                if splits is not None:
                    sp = splits[:, off:off + size]
                    lo_f = torch.where(sp > 0, lo_f.clamp_min(0.0), lo_f)
                    hi_f = torch.where(sp < 0, hi_f.clamp_max(0.0), hi_f)
                # empty: the bounds hold for the float32 model's z (rounding included), so a
                # sound lower bound above a sound upper bound means no input of the domain
                # reaches it; z = 0 itself lies in both children
                bad = (lo_f > hi_f).any(1)
                empty |= bad
                # keep empty domains numerically harmless (their bound is ignored)
                hi_f = torch.where(bad[:, None], torch.maximum(lo_f, hi_f), hi_f)
                ctx.values[node] = Interval(lo_f.reshape(B, *shape), hi_f.reshape(B, *shape))
                bm.refresh_after(ctx, node)  # later layers' rounding terms follow the tighter bounds
                pre_lo.append(lo_f)
                pre_hi.append(hi_f)
                off += size
            lb, _ = bm.backward(ctx, bm.output_node, C, None)
        pl, ph = torch.cat(pre_lo, 1), torch.cat(pre_hi, 1)
        self.state = None
        self.scores = None
        if opt_steps > 0:
            best, self.state = self._optimize(ctx, C, splits, opt_steps, lr, warm)
            lb = torch.maximum(lb, best)
        return lb.detach(), empty, pl, ph

    def _optimize(self, ctx: Any, C: torch.Tensor, splits: torch.Tensor | None, steps: int,
                  lr: float, warm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """α/β optimisation of the final bound with the intermediate bounds fixed; returns the
        best bound per row and the final α/β state ``(B, P)`` (children start from it).

        Weak duality: for inputs of the domain ``s_j z_j(x) >= 0``, so for any ``β >= 0``
        ``c·f(x) >= c·f(x) - Σ β_j s_j z_j(x)``; the right side is bounded by a backward pass in
        which ``-β_j s_j`` is added to the linear coefficients when the pass reaches ``z_j``.
        Any α in [0, 1] gives a valid ReLU lower relaxation, so every iterate is a valid bound.
        """
        bm = self.bm
        B, S = C.shape[0], C.shape[1]
        alphas: dict[Any, torch.Tensor] = {}
        a_nodes = [(node, rule) for node, rule in bm.rules.items() if rule.alpha_capable]
        shapes = []
        for node, rule in a_nodes:
            itv: Interval = ctx.values[rule.leaves[rule.pert[0]]]
            shapes.append(("a", node, itv.lower.shape[1:], int(itv.lower[0].numel())))
        for node, size in zip(self.nodes, self.sizes):
            shapes.append(("b", node, ctx.values[node].lower.shape[1:], size))
        P = S * sum(sz for *_, sz in shapes)
        if warm is not None and warm.shape == (B, P):
            flat = warm.clone()
        else:
            parts = []
            for kind, node, _shape, size in shapes:
                if kind == "a":
                    rule = bm.rules[node]
                    itv = ctx.values[rule.leaves[rule.pert[0]]]
                    init = (itv.upper > -itv.lower).to(C.dtype).reshape(B, 1, size).expand(B, S, size)
                    parts.append(init.reshape(B, -1))
                else:
                    parts.append(torch.zeros(B, S * size, dtype=C.dtype, device=C.device))
            flat = torch.cat(parts, 1)
        flat = flat.detach().requires_grad_(True)
        best = torch.full((B, S), -torch.inf, dtype=C.dtype, device=C.device)
        # plain Adam by hand: constructing torch.optim.Adam imports torch._dynamo (seconds)
        m1 = torch.zeros_like(flat)
        m2 = torch.zeros_like(flat)
        sp_all = splits.to(C.dtype) if splits is not None else None
        t_step = 0
        for _ in range(steps):
            with torch.enable_grad():
                off = 0
                off_sp = 0
                inject = {}
                for kind, node, shape, size in shapes:
                    block = flat[:, off:off + S * size].reshape(B, S, size)
                    off += S * size
                    if kind == "a":
                        alphas[node] = block.reshape(B, S, *shape)
                    else:
                        if sp_all is not None:
                            sp = sp_all[:, off_sp:off_sp + size]
                            inject[node] = (-block * sp.unsqueeze(1)).reshape(B, S, *shape)
                        off_sp += size
                lb = _backward_lower(bm, ctx, C.detach(), alphas, inject)
                (g,) = torch.autograd.grad(-lb.sum(), flat)
            with torch.no_grad():
                t_step += 1
                m1.mul_(0.9).add_(g, alpha=0.1)
                m2.mul_(0.999).addcmul_(g, g, value=0.001)
                flat -= lr * (m1 / (1 - 0.9 ** t_step)) / ((m2 / (1 - 0.999 ** t_step)).sqrt() + 1e-8)
                off = 0
                for kind, _node, _shape, size in shapes:
                    blk = flat[:, off:off + S * size]
                    if kind == "a":
                        blk.clamp_(0.0, 1.0)
                    else:
                        blk.clamp_(min=0.0)
                    off += S * size
                best = torch.maximum(best, lb.detach())
        self._scores(ctx, C, alphas, inject)
        return best, flat.detach()

    def _scores(self, ctx: Any, C: torch.Tensor, alphas: dict[Any, torch.Tensor],
                inject: dict[Any, torch.Tensor]) -> None:
        """BaBSR-like branching scores ``(B, total)``: how much each unstable neuron's upper
        relaxation intercept ``u·(-l)/(u-l)`` costs the lower bound (where the coefficient
        reaching the ReLU is negative), summed over the specification rows."""
        record: dict[Any, torch.Tensor] = {}
        with torch.no_grad():
            _backward_lower(self.bm, ctx, C.detach(), {k: v.detach() for k, v in alphas.items()},
                            {k: v.detach() for k, v in inject.items()}, record)
        B = C.shape[0]
        parts = []
        for node, size in zip(self.nodes, self.sizes):
            itv: Interval = ctx.values[node]
            lo_f, hi_f = itv.lower.reshape(B, size), itv.upper.reshape(B, size)
            inter = torch.where((lo_f < 0) & (hi_f > 0), hi_f * (-lo_f) / (hi_f - lo_f).clamp_min(1e-12),
                                torch.zeros_like(lo_f))
            coef = record.get(node)
            if coef is None:
                parts.append(inter)
            else:
                parts.append((-coef.reshape(B, -1, size).clamp(max=0)).sum(1) * inter)
        self.scores = torch.cat(parts, 1)

    @staticmethod
    def choose(pre_lo: torch.Tensor, pre_hi: torch.Tensor, splits: torch.Tensor,
               scores: torch.Tensor | None = None) -> torch.Tensor:
        """Neuron to split per domain ``(B,)``; -1 when no unstable free neuron is left.

        Score: ``scores`` (BaBSR-like, from :meth:`_scores`) when given, else the intercept
        ``u·(-l)/(u-l)`` of the triangle relaxation; the intercept breaks ties (a neuron whose
        coefficient is zero may still matter after other splits).
        """
        unstable = (pre_lo < 0) & (pre_hi > 0) & (splits == 0)
        inter = pre_hi * (-pre_lo) / (pre_hi - pre_lo).clamp_min(1e-12)
        base = inter if scores is None else scores + 1e-4 * inter
        score = torch.where(unstable, base, torch.full_like(pre_lo, -1.0))
        best = score.argmax(1)
        return torch.where(unstable.any(1), best, torch.full_like(best, -1))


def _backward_lower(bm: Any, ctx: Any, lA: torch.Tensor, alphas: dict[Any, torch.Tensor],
                    inject: dict[Any, torch.Tensor], record: dict[Any, torch.Tensor] | None = None) -> torch.Tensor:
    """The engine's CROWN backward pass (lower bound only, with its rounding terms) with extra
    linear terms added at intermediate nodes (the β terms of split constraints). ``record``
    receives, for every ReLU input node, the coefficients reaching the ReLU's output (for
    branching scores)."""
    lb, _ = bm.backward(ctx, bm.output_node, lA, None, alphas=alphas, inject=inject, record=record)
    return lb
