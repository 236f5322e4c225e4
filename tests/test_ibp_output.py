"""IBP of a net whose output node is itself a nonlinearity (ERAN's nets end in a ReLU).

The elided IBP pass folds the specification ``C`` into the affine tail after the last
nonlinearity; when the output *is* the nonlinearity, the pass relaxes it linearly, which is
looser than the output's own interval (for an elementwise op that interval gives the exact
minimum of ``C·y`` over the box). The engine keeps the tighter of the two."""

from __future__ import annotations

import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from certonnx.bounds.core import concretize_interval
from tests.bounds_util import assert_sound


def test_ibp_of_a_relu_output_is_at_least_the_interval_bound() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5), nn.ReLU()).eval()
    x = torch.rand(6, 8)
    C = margin_matrix(net(x).argmax(1), 5)
    inset = InputSet(x, 0.3)
    bm = BoundedModule(net, (8,))
    lb, ub = bm.compute(inset, C, "ibp")
    out = bm.ibp_pass(inset).values[bm.output_node]
    assert ub is not None
    assert (lb >= concretize_interval(C, out, -1.0) - 1e-6).all()
    assert (ub <= concretize_interval(C, out, 1.0) + 1e-6).all()
    # and strictly better than the relaxation alone somewhere (the case the fix is for)
    relaxed, _ = bm.backward(bm.ibp_pass(inset), bm.output_node, C, None, stop=bm._is_stop_for_ibp)
    assert relaxed is not None and (lb > relaxed + 1e-4).any()
    assert_sound(net, C, inset, lb, ub, n_samples=4000, label="ibp relu output")
