"""Bound tightness against golden references (``tests/fixtures/golden_bounds.json``, written by
``tools/make_golden.py``).

Soundness tests cannot tell a tight CROWN from one that quietly degraded to IBP; this test can.
For small fixed nets covering each rule family (ReLU, LeakyReLU, Sigmoid, Tanh, Clip, residual
Add, Concat, Conv+BatchNorm with average and max pooling, the bundled MNIST nets), the mean
output-bound width of every method must match the reference: looser fails, and markedly tighter
fails too (check soundness — the adversarial suite — then regenerate the references).
"""

from __future__ import annotations

import json

import pytest

from tests.paths import FIXTURES
from tools.make_golden import compute_all

#: relative slack for summation-order noise between platforms and torch versions
LOOSER = 1e-4
#: a bound this much tighter than its reference is a change to look at, not noise
TIGHTER = 1e-2


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, dict[str, float]]]:
    return compute_all()


def _golden() -> dict[str, dict[str, dict[str, float]]]:
    return json.loads((FIXTURES / "golden_bounds.json").read_text())["widths"]


def test_references_cover_every_method_and_family() -> None:
    g = _golden()
    assert {"mlp_relu", "mlp_sigmoid", "mlp_tanh", "residual", "concat", "conv_maxpool", "mnist_cnn"} <= set(g)
    for rows in g.values():
        for widths in rows.values():
            assert set(widths) == {"ibp", "crown-ibp", "crown", "alpha-crown"}
            # the references themselves are ordered: α-CROWN ≤ CROWN ≤ IBP
            assert widths["alpha-crown"] <= widths["crown"] * (1 + 1e-9) <= widths["ibp"] * (1 + 1e-9)


@pytest.mark.parametrize("net", sorted(_golden()))
def test_bounds_match_their_golden_reference(measured: dict[str, dict[str, dict[str, float]]], net: str) -> None:
    golden = _golden()[net]
    bad = []
    for norm, widths in golden.items():
        for method, ref in widths.items():
            got = measured[net][norm][method]
            if got > ref * (1 + LOOSER) + 1e-9:
                bad.append(f"{norm} {method}: width {got:.6g} looser than the reference {ref:.6g}")
            elif got < ref * (1 - TIGHTER):
                bad.append(f"{norm} {method}: width {got:.6g} much tighter than the reference {ref:.6g}: "
                           "check soundness, then run tools/make_golden.py")
    assert not bad, f"{net}: " + "; ".join(bad)

