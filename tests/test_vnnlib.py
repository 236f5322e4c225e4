"""VNN-LIB parser: semantics of boxes / disjunctions, line-numbered errors, fuzzing, real specs."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certonnx.certify.vnnlib import parse_vnnlib, parse_vnnlib_file
from certonnx.data import find_data
from certonnx.errors import PropertyError

SIMPLE = """; two inputs, three outputs
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (<= X_0 0.5))
(assert (>= X_0 -0.5))
(assert (and (<= X_1 1) (>= X_1 0)))
(assert (or (and (>= Y_1 Y_0)) (and (<= Y_2 3.0) (>= Y_2 Y_1))))
"""


def test_simple_semantics():
    p = parse_vnnlib(SIMPLE)
    assert p.n_inputs == 2 and p.n_outputs == 3 and len(p.regions) == 1
    lo, hi, dis = p.regions[0]
    assert lo.tolist() == [-0.5, 0.0] and hi.tolist() == [0.5, 1.0]
    assert len(dis) == 2
    A0, b0 = dis[0]
    # Y_1 >= Y_0  <=>  Y_0 - Y_1 <= 0
    assert A0.tolist() == [[1.0, -1.0, 0.0]] and b0.tolist() == [0.0]
    A1, b1 = dis[1]
    assert A1.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, -1.0]] and b1.tolist() == [3.0, 0.0]


def test_condition_meaning_on_points():
    from certonnx.certify.ort_check import condition_holds

    _, _, dis = parse_vnnlib(SIMPLE).regions[0]
    ys = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 2.0], [2.0, 1.0, 4.0]])
    assert condition_holds(ys, dis).tolist() == [True, True, False]


def test_several_input_boxes_and_linear_terms():
    text = """
(declare-const X_0 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (or (and (>= X_0 0) (<= X_0 1) (<= Y_0 (+ Y_1 (* 2 0.5))))
            (and (>= X_0 2) (<= X_0 3) (>= (- Y_0 Y_1) 4))))
"""
    p = parse_vnnlib(text)
    assert len(p.regions) == 2
    (lo0, hi0, d0), (lo1, hi1, d1) = p.regions
    assert (lo0[0], hi0[0], lo1[0], hi1[0]) == (0, 1, 2, 3)
    assert d0[0][0].tolist() == [[1, -1]] and d0[0][1].tolist() == [1.0]
    assert d1[0][0].tolist() == [[-1, 1]] and d1[0][1].tolist() == [-4.0]


def test_no_output_condition_means_any_output():
    p = parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 1))(assert (>= X_0 0))")
    (A, b), = p.regions[0][2]
    assert np.all(A == 0) and np.all(b == 0)


def test_empty_box_is_dropped():
    p = parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 0))(assert (>= X_0 1))"
                     "(assert (<= Y_0 0))")
    assert len(p.regions) == 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("(declare-const X_0 Real)\n(assert (<= X_0 1)", "line 2: unbalanced"),
        ("(declare-const X_0 Real))", "line 1: unbalanced"),
        ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (<= Z_3 1))",
         "line 4"),
        ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
         "(assert (<= X_1 1))", "line 5: variable X_1 is used but not declared"),
        ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))", "no finite lower bound"),
        ("(declare-const X_0 Int)", "only Real"),
        ("(declare-const X_0 Real)(declare-const X_0 Real)", "declared twice"),
        ("(declare-const X_1 Real)(declare-const Y_0 Real)", "without gaps"),
        ("(declare-const Y_0 Real)", "no input variables"),
        ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (foo X_0 1))", "unknown operator 'foo'"),
        ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= (* X_0 X_0) 1))", "nonlinear"),
        ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= (+ X_0 Y_0) 1))", "mixing"),
        ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 abc))", "expected a number"),
        ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 nan))", "NaN"),
        ("(declare-const X_0 Real)(declare-const Y_0 Real)", "no \\(assert"),
        ("hello", "outside parentheses"),
        ("(" * 500 + ")" * 500, "nested deeper"),
    ],
)
def test_errors_name_the_problem(text, match):
    with pytest.raises(PropertyError, match=match):
        parse_vnnlib(text)


def test_file_errors(tmp_path):
    with pytest.raises(PropertyError, match="not found"):
        parse_vnnlib_file(tmp_path / "none.vnnlib")
    b = tmp_path / "bin.vnnlib"
    b.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PropertyError, match="UTF-8"):
        parse_vnnlib_file(b)
    ok = tmp_path / "ok.vnnlib"
    ok.write_text(SIMPLE)
    assert parse_vnnlib_file(ok).n_inputs == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, len(SIMPLE)), junk=st.text(alphabet="()XY_0123456789 .-+*<=>andorassert\n;", max_size=40),
       pos=st.integers(0, len(SIMPLE)))
def test_fuzz_truncation_and_garbage_only_property_errors(cut, junk, pos):
    for text in (SIMPLE[:cut], SIMPLE[:pos] + junk + SIMPLE[pos:]):
        try:
            p = parse_vnnlib(text)
        except PropertyError as e:
            assert "\n" not in str(e)
        else:  # whatever parses must be a well-formed structure
            for lo, hi, dis in p.regions:
                assert lo.shape == hi.shape == (p.n_inputs,) and np.all(lo <= hi)
                for A, b in dis:
                    assert A.shape[1] == p.n_outputs and A.shape[0] == b.shape[0]


def _shared_specs() -> list[str]:
    base = find_data("vnncomp")
    if base is None:
        return []
    return sorted(glob.glob(str(base / "**" / "*.vnnlib"), recursive=True))


def test_parse_all_shared_vnncomp_specs():
    files = _shared_specs()
    if not files:
        pytest.skip("shared data vnncomp/ not found: set CERTONNX_DATA or provide ../shared/data")
    for f in files:
        p = parse_vnnlib_file(f)
        assert p.n_inputs == 784 and p.n_outputs == 10, f
        assert len(p.regions) == 1, f
        lo, hi, dis = p.regions[0]
        assert np.all(lo >= 0) and np.all(hi <= 1) and np.all(hi - lo <= 0.1 + 1e-6), f
        assert len(dis) == 9, f
        # each disjunct: one row "Y_j - Y_label >= 0" written as A y <= 0
        label = int(np.argmax(dis[0][0][0] == 1.0))  # the true class has +1 in every row
        for A, b in dis:
            assert A.shape == (1, 10) and b.tolist() == [0.0] and A[0, label] == 1.0 and A.sum() == 0 and A.min() == -1.0
        assert Path(f).suffix == ".vnnlib"
