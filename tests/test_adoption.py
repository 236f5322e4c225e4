"""Models as other frameworks write them: channels-last input normalized behind a Transpose
(Keras, tf2onnx), a final Softmax, a torchvision ResNet-18 at CIFAR shape; and the hint for a
model that expects normalized input. The end-to-end tests run inspect -> certify -> finetune ->
check in-process and compare every prediction with onnxruntime's on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import certonnx
from certonnx.io.normalization import detect_normalization, prepend_normalization

FIX = Path(__file__).resolve().parent / "fixtures"
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _main(monkeypatch: pytest.MonkeyPatch, cwd: Path, *args: str) -> int:
    from certonnx.cli import main

    monkeypatch.chdir(cwd)
    return main(list(args))


# --------------------------------------------------------------------------------------------
# normalization behind a Transpose
# --------------------------------------------------------------------------------------------
def _nhwc_model(before_transpose: bool) -> onnx.ModelProto:
    """(N, 8, 8, 3) -> [Sub/Div along the last axis] -> Transpose to NCHW -> [Sub/Div along
    axis 1] -> Conv -> Relu: tf2onnx writes either order, depending on the Keras layers."""
    mean, std = np.array(CIFAR_MEAN, np.float32), np.array(CIFAR_STD, np.float32)
    inits = [numpy_helper.from_array(np.full((2, 3, 3, 3), 0.1, np.float32), "w")]
    if before_transpose:
        inits += [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std.reshape(1, 1, 1, 3), "std")]
        nodes = [helper.make_node("Sub", ["x", "mean"], ["a"]), helper.make_node("Div", ["a", "std"], ["n"]),
                 helper.make_node("Transpose", ["n"], ["t"], perm=[0, 3, 1, 2])]
        conv_in = "t"
    else:
        inits += [numpy_helper.from_array(mean.reshape(3, 1, 1), "mean"),
                  numpy_helper.from_array(std.reshape(1, 3, 1, 1), "std")]
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
                 helper.make_node("Sub", ["t", "mean"], ["a"]), helper.make_node("Div", ["a", "std"], ["n"])]
        conv_in = "n"
    nodes += [helper.make_node("Conv", [conv_in, "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("before_transpose", [False, True])
def test_normalization_of_a_channels_last_input(before_transpose: bool) -> None:
    found = detect_normalization(_nhwc_model(before_transpose))
    assert found is not None
    norm = found.normalization
    np.testing.assert_allclose(norm.mean, CIFAR_MEAN, rtol=1e-6)
    np.testing.assert_allclose(norm.std, CIFAR_STD, rtol=1e-6)
    assert norm.axis == 3 and sorted(found.constants) == ["mean", "std"]
    assert "per channel of input axis 3" in norm.describe()


def test_transpose_moving_the_batch_ends_the_search() -> None:
    m = _nhwc_model(before_transpose=False)
    m.graph.node[0].attribute[0].ints[:] = [3, 0, 1, 2]  # the batch moves: not a layout change
    assert detect_normalization(m) is None


def test_declared_mean_std_reported_as_written() -> None:
    cm = certonnx.load(str(FIX / "mlp_ts.onnx"), check_parity=False)
    norm = prepend_normalization(cm, [0.1307], [0.3081]).normalization
    assert norm is not None and norm.mean == [0.1307] and norm.std == [0.3081]
    assert "[0.1307]) / [0.3081]" in norm.describe()


def _expects_normalized(path: Path) -> Path:
    """The trained MNIST MLP with the MNIST normalization folded into its first layer: it now
    expects normalized input (and scores badly on raw pixels)."""
    m = onnx.load(str(FIX / "mnist_mlp_trained.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    w, b = (numpy_helper.to_array(inits[gemm.input[k]]) for k in (1, 2))  # w: (out, 784), transB=1
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array((w * 0.3081).astype(np.float32), gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array((b + 0.1307 * w.sum(1)).astype(np.float32), gemm.input[2]))
    onnx.save(m, str(path))
    return path


def test_hint_for_a_model_that_expects_normalized_input(tmp_path: Path) -> None:
    data = FIX / "mnist_200.npz"
    if not data.exists() or not (FIX / "mnist_mlp_trained.onnx").exists():
        pytest.skip("fixtures mnist_mlp_trained.onnx / mnist_200.npz not present (tools/make_fixtures.py)")
    model = _expects_normalized(tmp_path / "m.onnx")
    from certonnx import api

    said: list[str] = []
    res = api.certify(model, data, norms="linf:0.01", method="ibp", n=100, echo=said.append)
    hint = res["normalization_hint"]
    assert hint is not None and hint["dataset"] == "MNIST"
    assert hint["accuracy_normalized"] >= hint["accuracy_raw"] + 0.5
    assert hint["accuracy_raw"] == pytest.approx(res["clean_accuracy"])
    assert hint["flags"] == "--mean 0.1307 --std 0.3081"
    assert sum("--mean 0.1307 --std 0.3081" in s for s in said) == 1
    # with the flags: no hint, and the accuracy the hint promised
    res2 = api.certify(model, data, norms="linf:0.01", method="ibp", n=100, mean=[0.1307], std=[0.3081])
    assert res2["normalization_hint"] is None
    assert res2["clean_accuracy"] == pytest.approx(hint["accuracy_normalized"])
    assert "(x - [0.1307]) / [0.3081]" in res2["input_space"]["description"]
    # a model trained on raw pixels gets none
    res3 = api.certify(FIX / "mnist_mlp_trained.onnx", data, norms="linf:0.01", method="ibp", n=100)
    assert res3["normalization_hint"] is None


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------
class _KerasStyle(nn.Module):
    """What a small Keras CNN looks like once exported: NHWC RGB input, transposed to NCHW,
    normalized per channel, conv, pool, dense, Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.permute(0, 3, 1, 2) - self.mean) / self.std
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return torch.softmax(self.fc2(torch.relu(self.fc1(x.flatten(1)))), dim=1)


def _export(module: nn.Module, sample: tuple[int, ...], path: Path, in_name: str, out_name: str) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), (torch.rand(1, *sample),), str(path), dynamo=False, opset_version=17,
                      input_names=[in_name], output_names=[out_name],
                      dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}})
    return path


def _data(model: Path, sample: tuple[int, ...], path: Path, n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    """Random images in [0, 1] labelled with onnxruntime's predictions on the file: certify's
    clean accuracy is then exactly the fraction of samples where certonnx predicts what
    onnxruntime predicts."""
    rng = np.random.default_rng(0)
    x = rng.random((n_train, *sample), dtype=np.float32)
    xt = rng.random((n_test, *sample), dtype=np.float32)
    y, yt = _ort(model, x).argmax(1), _ort(model, xt).argmax(1)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return x, y, xt, yt


def _pipeline(tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], src: Path,
              sample: tuple[int, ...], *, eps: str, n_train: int, n_test: int) -> dict:
    """inspect -> certify (-o) -> finetune -> check, with the assertions common to every model."""
    from certonnx import api

    data = tmp / "data.npz"
    _, _, xt, yt = _data(src, sample, data, n_train, n_test)
    # inspect
    assert _main(monkeypatch, tmp, "inspect", str(src), "--json", "--strict") == 0
    info = json.loads(capsys.readouterr().out)
    # certify: every clean prediction agrees with onnxruntime's (labels are its predictions)
    assert _main(monkeypatch, tmp, "certify", str(src), "--data", str(data), "--norm", f"linf:{eps}", "--method",
                 "ibp", "--pgd-steps", "5", "--json", "cert.json", "-o", "certified.onnx") == 0
    capsys.readouterr()
    res = json.loads((tmp / "cert.json").read_text())
    assert res["n"] == n_test and res["clean_accuracy"] == 1.0
    assert res["ort_clean_check"] == {"samples": n_test, "agree": n_test, "near_ties": 0}
    assert res["normalization_hint"] is None
    # the certified copy computes exactly what the original computes
    np.testing.assert_array_equal(_ort(tmp / "certified.onnx", xt), _ort(src, xt))
    # finetune: one short epoch on a few samples, certified on the test split, exported
    cm, rep = api.finetune(src, data, norms={"linf": float(eps)}, method="ibp", epochs=1, n_train=n_train,
                           batch_size=n_train, eval_n=n_test, eval_method="ibp", output=str(tmp / "ft.onnx"),
                           eval_radius=False, accept_worse=True)
    assert rep is not None and rep["certified"]
    ev = rep["evaluation"]
    with torch.no_grad():
        logits = cm.module(torch.from_numpy(xt)).flatten(1)
    expected = cm.head.apply(logits).numpy() if cm.head is not None else logits.numpy()
    np.testing.assert_allclose(_ort(tmp / "ft.onnx", xt), expected, rtol=1e-3, atol=1e-5)
    assert ev["clean_accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == yt).mean()))
    # check: the stored numbers pass at their own values and fail above; a re-certification
    # of the file as written gives the same numbers
    clean, certified = ev["clean_accuracy"], ev["certified_accuracy"]["linf"]
    req = ["--require", f"clean>={clean}", "--require", f"linf:{eps}>={certified}"]
    assert _main(monkeypatch, tmp, "check", "ft.onnx", *req, "--json", "check.json", "-q") == 0
    verdict = json.loads((tmp / "check.json").read_text())
    assert verdict["passed"] and verdict["certificate"]["weights_match"]
    capsys.readouterr()
    # (a certificate at ε says nothing about a larger ε)
    assert _main(monkeypatch, tmp, "check", "ft.onnx", "--require", "linf:0.5>=0", "-q") == 1
    assert _main(monkeypatch, tmp, "check", "ft.onnx", *req, "--data", str(data), "--method", "ibp",
                 "--json", "recheck.json", "-q") == 0
    fresh = json.loads((tmp / "recheck.json").read_text())["recertified"]
    assert fresh["clean_accuracy"] == pytest.approx(clean)
    assert fresh["certified_accuracy"]["linf"] == pytest.approx(certified)
    return {"info": info, "certify": res, "finetune": rep, "model": cm}


def test_keras_style_channels_last_softmax_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    src = _export(_KerasStyle(), (8, 8, 3), tmp_path / "keras_style.onnx", "image", "probs")
    assert [n.op_type for n in onnx.load(str(src)).graph.node][:3] == ["Transpose", "Sub", "Div"]
    out = _pipeline(tmp_path, monkeypatch, capsys, src, (8, 8, 3), eps="0.001", n_train=16, n_test=24)
    info = out["info"]
    # inspect: the normalization behind the Transpose is found (no --mean/--std invitation) and
    # the head named
    assert info["normalization"] == {"mean": CIFAR_MEAN, "std": [0.247, 0.2435, 0.2616], "inside": True, "axis": 3}
    assert "--mean" not in info["eps_meaning"]
    assert info["head"] == "Softmax (certified on the logits before it)"
    assert out["certify"]["head"] == info["head"]
    assert out["finetune"]["evaluation"]["head"] == info["head"]
    # the normalization constants stayed frozen through training; the exported file keeps the head
    assert out["model"].normalization is not None and out["model"].normalization.inside
    ft = onnx.load(str(tmp_path / "ft.onnx"))
    assert ft.graph.node[-1].op_type == "Softmax" and [o.name for o in ft.graph.output] == ["probs"]
    consts = {t.name: numpy_helper.to_array(t) for t in ft.graph.initializer}
    assert any(v.size == 3 and np.allclose(v.reshape(-1), CIFAR_MEAN) for v in consts.values())
    probs = _ort(tmp_path / "ft.onnx", np.random.default_rng(3).random((5, 8, 8, 3), dtype=np.float32))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


class _GeluTanh(nn.Module):
    """A transformer-style MLP block: Linear, GELU (exact, erf), Linear, Tanh, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 24), nn.Linear(24, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.fc1(x.flatten(1)))
        return self.fc3(torch.tanh(self.fc2(h)))


@pytest.mark.parametrize("opset", [17, 20])
def test_gelu_and_tanh_mlp_end_to_end(opset: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """GELU exported as its Erf pattern (opset 17) and as the opset-20 ``Gelu`` op, next to
    ``Tanh``: the whole pipeline, with every op bounded (no unsupported op in inspect)."""
    torch.manual_seed(0)
    path = tmp_path / "gelu_tanh.onnx"
    torch.onnx.export(_GeluTanh().eval(), (torch.rand(1, 6, 6),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Tanh" in ops and ("Gelu" in ops if opset == 20 else "Erf" in ops), ops
    out = _pipeline(tmp_path, monkeypatch, capsys, path, (6, 6), eps="0.002", n_train=16, n_test=24)
    support = {r["op"]: r for r in out["info"]["ops"]}
    # the file's Gelu (opset 20) or Erf pattern becomes one GELU node at import, bounded by its rule
    assert support["Gelu (fused at import)"]["count"] == 1
    assert support["Erf" if opset == 17 else "Gelu"]["support"] == "removed"
    for op in ("Tanh", "Gelu (fused at import)"):
        assert op in support and all(support[op]["support"][m] is True for m in ("ibp", "crown", "alpha-crown")), \
            support.get(op)
    assert out["info"]["unsupported"] == []


def test_resnet18_cifar_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    src = _export(net, (3, 32, 32), tmp_path / "resnet18.onnx", "input", "logits")
    out = _pipeline(tmp_path, monkeypatch, capsys, src, (3, 32, 32), eps="0.00001", n_train=8, n_test=8)
    info = out["info"]
    assert info["imported"]["input_shape"] == [None, 3, 32, 32] and info["imported"]["num_classes"] == 10
    assert info["head"] is None and info["unsupported"] == []


class _ChannelsLastNoNorm(nn.Module):
    """A channels-last RGB CNN trained on normalized input: no normalization in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(torch.relu(self.conv(x.permute(0, 3, 1, 2))).flatten(1)), dim=1)


def test_mean_std_for_a_channels_last_model(tmp_path: Path) -> None:
    # per-channel --mean/--std of an (N, H, W, C) input run along its last axis, in the torch model
    # and in the onnxruntime checks alike: the clean predictions agree with onnxruntime's on
    # inputs normalized the same way
    torch.manual_seed(0)
    src = _export(_ChannelsLastNoNorm(), (8, 8, 3), tmp_path / "m.onnx", "image", "probs")
    rng = np.random.default_rng(0)
    x = rng.random((24, 8, 8, 3), dtype=np.float32)
    y = _ort(src, ((x - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)).astype(np.float32)).argmax(1)
    np.savez(tmp_path / "d.npz", x_test=x, y_test=y)
    from certonnx import api

    res = api.certify(src, tmp_path / "d.npz", norms="linf:0.001", method="ibp", mean=CIFAR_MEAN, std=CIFAR_STD)
    assert res["clean_accuracy"] == 1.0 and res["ort_clean_check"]["agree"] == 24
    assert res["input_space"]["normalization"] == {"mean": CIFAR_MEAN, "std": CIFAR_STD, "inside": False, "axis": 3}
    cm = prepend_normalization(certonnx.load(str(src)), CIFAR_MEAN, CIFAR_STD)
    with torch.no_grad():
        z = cm.module(torch.from_numpy(x)).flatten(1).numpy()
    assert (z.argmax(1) == y).all()
