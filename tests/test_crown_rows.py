"""Which intermediate nodes CROWN spends identity rows on, and that skipping the others costs
no tightness and no soundness.

The engine keeps IBP for a node that follows from already-tightened bounds through ops whose
IBP is their exact range (``Rule.ibp_intermediate``: a ReLU's output before a MaxPool) and for
an affine layer of the input itself. On conv nets with pooling these were nearly all rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet
from certonnx.bounds.engine import BoundedModule as _Engine
from tests.bounds_util import assert_sound


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5), nn.Sigmoid(), nn.Linear(5, 3),
    ).eval()


def _tightened(bm: _Engine, inset: InputSet) -> list[str]:
    names: list[str] = []
    orig = bm.tighten_rows

    def spy(ctx, node, *a, **k):  # type: ignore[no-untyped-def]
        names.append(node.name)
        return orig(ctx, node, *a, **k)

    bm.tighten_rows = spy  # type: ignore[method-assign]
    bm.compute(inset, method="crown")
    return names


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_pooled_relu_output_keeps_ibp_with_identical_bounds(norm: str, eps: float) -> None:
    model = _net()
    x = torch.rand(3, 1, 7, 7)
    inset = InputSet(x, eps, norm, (0.0, 1.0))
    fast = BoundedModule(model, (1, 7, 7))
    names = _tightened(fast, inset)
    # the second conv's output (before a ReLU) and the first linear's (before a Sigmoid) get
    # rows; the ReLU output that feeds the MaxPool does not
    kinds = [type(fast.rules[n]).__name__ for n in fast.relaxed_inputs if n.name in names]
    assert kinds == ["ConvRule", "LinearRule"]
    slow = BoundedModule(model, (1, 7, 7))
    slow._follows_by_ibp = lambda node, done: False  # type: ignore[method-assign]
    assert len(_tightened(slow, inset)) == 3
    lb_f, ub_f = fast.compute(inset, method="crown")
    lb_s, ub_s = slow.compute(inset, method="crown")
    assert ub_f is not None and ub_s is not None
    # the skipped rows could only have tightened ReLU outputs left stable and untightened
    assert torch.allclose(lb_f, lb_s, rtol=0, atol=1e-4 * (1 + float(lb_s.abs().max())))
    assert torch.allclose(ub_f, ub_s, rtol=0, atol=1e-4 * (1 + float(ub_s.abs().max())))
    assert_sound(model, torch.eye(3).expand(3, 3, 3), inset, lb_f, ub_f, n_samples=4000, label=f"pooled {norm}")


def test_chain_to_an_untightened_node_still_gets_rows() -> None:
    """A Flatten (re-view) before a ReLU, after a conv layer that nothing relaxes: its bounds
    are plain IBP of an untightened node, so CROWN rows there are not redundant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 2), nn.Flatten(), nn.ReLU(),
                          nn.Linear(18, 3)).eval()
    bm = BoundedModule(model, (1, 6, 6))
    inset = InputSet(torch.rand(2, 1, 6, 6), 0.3)
    names = _tightened(bm, inset)
    assert [type(bm.rules[n]).__name__ for n in bm.relaxed_inputs if n.name in names] == ["ReshapeRule"]
