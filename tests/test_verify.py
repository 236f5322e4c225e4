"""verify(): sat only with a checked counterexample, unsat only when every sub-box is proven,
input splitting closes what the root bound cannot, and the CLI's VNN-COMP results file."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import fx, nn

from certonnx.certify.verify import VerifyStats, verify
from certonnx.certify.vnnlib import parse_vnnlib
from certonnx.cli import main
from certonnx.graph.model import CertModel

MLP = "tests/fixtures/mnist_mlp_trained.onnx"
DATA = "tests/fixtures/mnist_200.npz"


def _cert(net: nn.Module, n_in: int, n_out: int) -> CertModel:
    return CertModel(module=fx.symbolic_trace(net), input_name="x", output_name="y",
                     input_shape=(None, n_in), output_shape=(None, n_out))


def SumNet() -> nn.Module:  # noqa: N802 - reads like a class
    """y = [x0 + x1, 1]."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 1.0]))
    return lin


class SelfDiff(nn.Module):
    """y0 = relu(x) - relu(x) = 0 exactly; IBP sees [-u, u] (dependency problem)."""

    def forward(self, x):
        return torch.relu(x) - torch.relu(x)


def _box_prop(lo, hi, cond: str, n_out: int) -> str:
    decl = [f"(declare-const X_{i} Real)" for i in range(len(lo))] + [f"(declare-const Y_{j} Real)" for j in
                                                                      range(n_out)]
    box = [f"(assert (>= X_{i} {a}))\n(assert (<= X_{i} {b}))" for i, (a, b) in enumerate(zip(lo, hi))]
    return "\n".join(decl + box + [f"(assert {cond})"])


def test_unsat_and_sat_on_linear_model():
    m = _cert(SumNet(), 2, 2)
    unsat = parse_vnnlib(_box_prop([0.6, 0.6], [0.9, 0.9], "(<= Y_0 Y_1)", 2))
    assert verify(m, unsat, 5)[0] == "unsat"
    sat = parse_vnnlib(_box_prop([0.3, 0.3], [0.9, 0.9], "(<= Y_0 Y_1)", 2))
    res, cex = verify(m, sat, 5)
    assert res == "sat"
    x = cex["x"]
    assert np.all(x >= 0.3) and np.all(x <= 0.9) and x.sum() <= 1.0
    assert cex["y"][0] <= cex["y"][1]


def test_splitting_proves_what_ibp_cannot():
    m = _cert(SelfDiff(), 1, 1)
    prop = parse_vnnlib(_box_prop([-1.0], [1.0], "(>= Y_0 0.5)", 1))
    st = VerifyStats()
    res, _ = verify(m, prop, 10, method="ibp", stats=st)
    assert res == "unsat"
    assert st.boxes_split > 0  # the root box alone is not enough for IBP


def test_several_boxes_counterexample_in_the_right_one():
    m = _cert(SumNet(), 2, 2)
    text = """(declare-const X_0 Real)(declare-const X_1 Real)(declare-const Y_0 Real)(declare-const Y_1 Real)
    (assert (or (and (>= X_0 0.6) (<= X_0 0.9) (>= X_1 0.6) (<= X_1 0.9))
                (and (>= X_0 0.0) (<= X_0 0.2) (>= X_1 0.0) (<= X_1 0.2))))
    (assert (<= Y_0 Y_1))"""
    res, cex = verify(m, parse_vnnlib(text), 5)
    assert res == "sat" and np.all(cex["x"] <= 0.2)


@pytest.mark.parametrize("seed", range(6))
def test_never_unsat_when_sampling_finds_a_counterexample(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    m = _cert(net, 2, 3)
    lo, hi = np.array([-0.3, -0.3]), np.array([0.3, 0.3])
    grid = torch.cartesian_prod(torch.linspace(-0.3, 0.3, 121), torch.linspace(-0.3, 0.3, 121))
    with torch.no_grad():
        out = net(grid)
    # counterexample: class 1 scores at least as high as class 0
    sampled_sat = bool((out[:, 1] - out[:, 0] >= 0).any())
    prop = parse_vnnlib(_box_prop(lo, hi, "(>= Y_1 Y_0)", 3))
    res, cex = verify(m, prop, 3)
    if sampled_sat:
        assert res != "unsat"
    if res == "sat":
        assert np.all(cex["x"] >= lo) and np.all(cex["x"] <= hi) and cex["y"][1] >= cex["y"][0]
    if res == "unsat":
        assert not sampled_sat


def test_timeout_is_respected():
    # y = sum_i relu(x_i) - relu(x_i) == 0, but CROWN cannot see it on [-1, 1]^20 and input
    # splitting needs ~2^20 boxes: the property (y >= 0.5, impossible) must end in a timeout
    n = 20
    net = nn.Sequential(nn.Linear(n, 2 * n), nn.ReLU(), nn.Linear(2 * n, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.cat([torch.eye(n), torch.eye(n)]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.cat([torch.ones(n), -torch.ones(n)])[None])
        net[2].bias.zero_()
    m = _cert(net, n, 1)
    prop = parse_vnnlib(_box_prop([-1.0] * n, [1.0] * n, "(>= Y_0 0.5)", 1))
    # warm-up (first use of torch's optimizers and autograd is slow)
    verify(m, parse_vnnlib(_box_prop([-1.0] * n, [1.0] * n, "(>= Y_0 50)", 1)), 5)
    from certonnx.bounds import BoundedModule, InputSet

    BoundedModule(net, (n,)).compute(InputSet(torch.zeros(1, n), 0.1), method="alpha-crown", alpha_steps=2)
    st = VerifyStats()
    t = time.monotonic()
    res, _ = verify(m, prop, 4.0, stats=st)
    elapsed = time.monotonic() - t
    assert res == "timeout"
    # the deadline holds even on a loaded machine (generous slack); splitting must have started
    assert elapsed < 8.0
    assert st.boxes_split > 0 or st.phase == "attack"


def test_shape_mismatch_is_a_property_error():
    from certonnx.errors import PropertyError

    m = _cert(SumNet(), 2, 2)
    with pytest.raises(PropertyError, match="3 inputs"):
        verify(m, parse_vnnlib(_box_prop([0, 0, 0], [1, 1, 1], "(<= Y_0 Y_1)", 2)), 1)


def _image_prop(tmp_path, eps: float):
    d = np.load(DATA)
    x = d["x_test"][0].reshape(-1).astype(np.float64) / 255
    lab = int(d["y_test"][0])
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    cond = "(or " + " ".join(f"(and (>= Y_{j} Y_{lab}))" for j in range(10) if j != lab) + ")"
    p = tmp_path / f"p_{eps}.vnnlib"
    p.write_text(_box_prop(lo, hi, cond, 10))
    return p, lab


def test_cli_sat_results_file_checked_with_onnxruntime(tmp_path, capsys):
    import onnxruntime as ort

    from certonnx.certify.vnnlib import parse_vnnlib_file

    prop, lab = _image_prop(tmp_path, 0.3)
    res_file = tmp_path / "out.txt"
    rc = main(["verify", MLP, str(prop), "--timeout", "30", "--results-file", str(res_file)])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().splitlines()[-1] == "sat"
    text = res_file.read_text()
    assert text.startswith("sat\n(")
    vals = dict((tok.strip("()").split()[0], float(tok.strip("()").split()[1]))
                for tok in text.split("\n")[1:] if tok.strip())
    x = np.array([vals[f"X_{i}"] for i in range(784)], dtype=np.float32)
    lo, hi, _ = parse_vnnlib_file(prop).regions[0]
    assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)
    sess = ort.InferenceSession(MLP, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    y = sess.run(None, {inp.name: x.reshape(shape)})[0].reshape(-1)
    assert np.max(np.delete(y, lab)) >= y[lab]
    assert np.allclose(y, [vals[f"Y_{j}"] for j in range(10)], atol=1e-5)


def test_cli_unsat_and_json(tmp_path, capsys):
    import json

    prop, _ = _image_prop(tmp_path, 0.001)
    rc = main(["verify", MLP, str(prop), "--timeout", "30", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["result"] == "unsat" and payload["counterexample"] is None


@pytest.mark.parametrize("bad", ["garbage", "missing", "shape"])
def test_cli_bad_property(tmp_path, capsys, bad):
    p = tmp_path / "bad.vnnlib"
    if bad == "garbage":
        p.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1)")
    elif bad == "shape":
        p.write_text(_box_prop([0, 0], [1, 1], "(<= Y_0 Y_1)", 2))
    res_file = tmp_path / "r.txt"
    rc = main(["verify", MLP, str(p), "--results-file", str(res_file)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
    assert res_file.read_text() == "error\n"


def test_cli_bad_timeout_flag(capsys):
    rc = main(["verify", MLP, "x.vnnlib", "--timeout", "-3"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and "timeout" in err.lower()


@pytest.mark.parametrize("seed", [0, 4, 5])  # unsat needing splits, sat, unsat needing many splits
def test_relu_branch_and_bound_agrees_with_milp(seed):
    """20 inputs -> ReLU splitting with α/β; the exact MILP minimum is the ground truth."""
    from certonnx.bounds.milp import exact_min

    torch.manual_seed(100 + seed)
    n = 20
    net = nn.Sequential(nn.Linear(n, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 2))
    m = _cert(net, n, 2)
    x0 = torch.rand(n) * 0.5
    with torch.no_grad():
        y0 = net(x0[None])[0]
    lab = int(y0.argmax())
    eps = 0.15
    lo, hi = (x0 - eps).numpy(), (x0 + eps).numpy()
    c = np.zeros(2)
    c[lab], c[1 - lab] = 1.0, -1.0
    true_min = exact_min(net, lo, hi, c)  # min of y_lab - y_other over the box
    prop = parse_vnnlib(_box_prop(lo.astype(np.float64), hi.astype(np.float64), f"(>= Y_{1 - lab} Y_{lab})", 2))
    st = VerifyStats()
    res, cex = verify(m, prop, 30, stats=st)
    assert st.phase.startswith("bab (relu") or res == "sat"
    if true_min > 1e-4:
        assert res in ("unsat", "timeout"), (true_min, res)
    if true_min < -1e-4:
        assert res in ("sat", "timeout"), (true_min, res)
    if res == "sat":
        assert cex["y"][1 - lab] >= cex["y"][lab]
    # these are small: branch and bound settles them well within the time
    if abs(true_min) > 1e-3:
        assert res in ("sat", "unsat"), (true_min, res, st)
    if seed in (0, 5):
        assert res == "unsat", (true_min, st)
    if seed == 5:  # neither CROWN nor the root alpha-CROWN bound is enough here: ReLU splits were needed
        assert st.boxes_split > 0, (true_min, st)


def test_relu_split_bounds_are_sound_by_sampling():
    """Random splits, α/β-optimised bounds: never above a sampled value in the split domain."""
    from certonnx.bounds import BoundedModule
    from certonnx.certify.relu_split import ReluSplitBounder

    torch.manual_seed(0)
    for _ in range(10):
        net = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
        rb = ReluSplitBounder(BoundedModule(net, (3,)))
        assert rb.usable
        B = 8
        lo = torch.rand(B, 3) - 1
        hi = lo + torch.rand(B, 3)
        C = torch.tensor([[[1.0, -1.0]]]).expand(B, 1, 2)
        lb0, _, _, _ = rb.bound(lo, hi, None, C)
        splits = torch.randint(-1, 2, (B, rb.total), dtype=torch.int8)
        splits[:, torch.rand(rb.total) < 0.7] = 0
        lb, empty, _, _ = rb.bound(lo, hi, splits, C, opt_steps=15, lr=0.3)
        x = lo[:, None] + torch.rand(B, 20000, 3) * (hi - lo)[:, None]
        with torch.no_grad():
            h1 = net[0](x)
            z2 = net[2](torch.relu(h1))
            out = net[4](torch.relu(z2))
        pre = torch.cat([h1, z2], -1)
        sp = splits[:, None, :].float()
        outside = ((sp > 0) & (pre < 0)).any(-1) | ((sp < 0) & (pre > 0)).any(-1)
        val = (out[..., 0] - out[..., 1]).masked_fill(outside, float("inf")).min(1).values
        assert torch.all(empty | (val >= lb[:, 0] - 1e-5))
        assert not bool((empty & torch.isfinite(val)).any())  # "empty" domains really are empty


def test_relu_split_per_domain_rows_match_the_union(monkeypatch: pytest.MonkeyPatch) -> None:
    """Branch and bound's intermediate CROWN rows per domain (each its own unstable neurons,
    ``unstable_rows``) compute the same rows as the batch's union for those neurons; the union
    only adds rows for neurons stable in that domain, so it may be tighter, never looser."""
    import certonnx.bounds.engine as E
    from certonnx.bounds import BoundedModule
    from certonnx.certify.relu_split import ReluSplitBounder

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 2))
    B = 16
    lo = torch.rand(B, 3) - 1
    hi = lo + torch.rand(B, 3) * 0.5
    C = torch.tensor([[[1.0, -1.0]]]).expand(B, 1, 2)
    rb = ReluSplitBounder(BoundedModule(net, (3,)))
    seen: list[int] = []
    orig = E.BoundedModule.tighten_rows

    def spy(self, ctx, node, idx, *a):  # type: ignore[no-untyped-def]
        seen.append(idx.ndim)
        return orig(self, ctx, node, idx, *a)

    monkeypatch.setattr(E.BoundedModule, "tighten_rows", spy)
    per_domain, *_ = rb.bound(lo, hi, None, C)
    assert 2 in seen, "the case must exercise per-domain rows"
    monkeypatch.setattr(E, "PER_SAMPLE_ROWS", 0.0)  # never per domain: the union
    seen.clear()
    union, *_ = rb.bound(lo, hi, None, C)
    assert 2 not in seen
    assert (per_domain <= union + 1e-6).all()
    assert torch.allclose(per_domain, union, atol=1e-3 * float(union.abs().mean()) + 1e-6)
