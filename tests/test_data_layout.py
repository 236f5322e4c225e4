"""Data layout end to end: the data reaches the model exactly as onnxruntime receives it.

Colour images are where a wrong layout shows (grey 28x28x1 data hides it: a reshape and a
transpose coincide there): NHWC data for a channels-last model (Keras / tf2onnx style) must be
used as stored, NHWC data for an NCHW model and NCHW data for an NHWC model transposed, never
reshaped. And the standing guard of ``certify``: certonnx's clean predictions must agree with
onnxruntime's on the original file, or nothing is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import certonnx
import certonnx.data as cdata
from certonnx.certify.core import certify_dataset
from certonnx.certify.ort_check import OrtRunner, check_clean_predictions, guard_indices, near_ties
from certonnx.cli import main
from certonnx.data import as_stored, check_against_model, load_npz
from certonnx.errors import DataError, ParityError
from certonnx.layout import is_reshape_view, plan_layout

N = 48
H = W = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Conv(nn.Module):
    """conv -> ReLU -> linear on (N, 3, 8, 8), or on (N, 8, 8, 3) permuted to NCHW inside."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    import warnings

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(module, example, str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, **kw)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("layout_models")
    torch.manual_seed(0)
    out = {
        "nhwc": _export(_Conv(True), torch.rand(2, H, W, 3), d / "nhwc.onnx"),
        "nchw": _export(_Conv(False), torch.rand(2, 3, H, W), d / "nchw.onnx"),
        "mlp": _export(nn.Sequential(nn.Linear(H * W * 3, 16), nn.ReLU(), nn.Linear(16, 4)),
                       torch.rand(2, H * W * 3), d / "mlp.onnx"),
    }
    return out


def _pixels(seed: int = 0) -> np.ndarray:
    """NHWC colour images whose channels differ (a scrambled layout changes predictions)."""
    rng = np.random.default_rng(seed)
    x = rng.random((N, H, W, 3)) ** rng.uniform(0.2, 5.0, (N, 1, 1, 3))  # per sample and channel contrast
    return (x * rng.uniform(0.2, 1.0, (N, 1, 1, 3))).astype(np.float32)


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x_test=x, y_test=y.astype(np.int64))
    return path


def _certify(capsys: pytest.CaptureFixture[str], model: Path, data: Path, *extra: str) -> dict:
    rc = main(["certify", str(model), "--data", str(data), "--norm", "linf:0.002", "--method", "ibp",
               "--pgd-steps", "2", "--json", "-", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


# (model, how the data is stored, how onnxruntime gets the stored data for that model)
CASES = {
    "nhwc-model-nhwc-data": ("nhwc", lambda x: x, lambda x: x),
    "nchw-model-nhwc-data": ("nchw", lambda x: x, lambda x: x.transpose(0, 3, 1, 2)),
    "nhwc-model-nchw-data": ("nhwc", lambda x: x.transpose(0, 3, 1, 2), lambda x: x.transpose(0, 2, 3, 1)),
    "mlp-flat-data": ("mlp", lambda x: x.reshape(N, -1), lambda x: x),
    "mlp-nhwc-data": ("mlp", lambda x: x, lambda x: x.reshape(N, -1)),  # a re-view: same element order
}


@pytest.mark.parametrize("case", list(CASES))
def test_certify_matches_onnxruntime_sample_for_sample(case, models, tmp_path, capsys):
    kind, store, to_model = CASES[case]
    xs = np.ascontiguousarray(store(_pixels()))
    logits = _ort(models[kind], np.ascontiguousarray(to_model(xs)))
    y = logits.argmax(1)
    assert len(set(y.tolist())) > 1  # a constant prediction would hide a scramble
    data = _npz(tmp_path / "d.npz", xs, y)

    r = _certify(capsys, models[kind], data)
    assert r["clean_accuracy"] == 1.0
    assert r["ort_clean_check"] == {"samples": N, "agree": N, "near_ties": 0}

    # library path, sample for sample: predictions = onnxruntime's, inputs = the stored data
    cm = certonnx.load(str(models[kind]))
    x, yy, info = load_npz(data, num_classes=cm.num_classes)
    xm, _ = check_against_model(x, cm.sample_shape, info)
    assert np.array_equal(xm.numpy(), np.ascontiguousarray(to_model(xs)))  # no value moved elsewhere
    res = certify_dataset(cm, xm, yy, {"linf": 0.0}, "ibp", onnx_path=str(models[kind]), progress=False,
                          per_sample=True, ort_inputs=as_stored(x, info))
    assert res["per_sample"]["prediction"] == y.tolist()


def test_declared_normalization_with_nhwc_data_for_nchw_model(models, tmp_path, capsys):
    """--mean/--std per channel: the torch model prepends them, the guard's onnxruntime run
    applies them to the same (transposed) channels."""
    mean, std = [0.2, 0.4, 0.5], [0.3, 0.25, 0.2]
    xs = _pixels(1)
    xn = (xs.transpose(0, 3, 1, 2) - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    y = _ort(models["nchw"], xn).argmax(1)
    data = _npz(tmp_path / "d.npz", xs, y)
    r = _certify(capsys, models["nchw"], data, "--mean", "0.2,0.4,0.5", "--std", "0.3,0.25,0.2")
    assert r["clean_accuracy"] == 1.0 and r["ort_clean_check"]["agree"] == N


def test_lipschitz_path_is_guarded(models, tmp_path, capsys):
    xs = _pixels()
    y = _ort(models["mlp"], xs.reshape(N, -1)).argmax(1)
    data = _npz(tmp_path / "d.npz", xs, y)
    r = _certify(capsys, models["mlp"], data, "--method", "lipschitz")
    assert r["clean_accuracy"] == 1.0 and r["ort_clean_check"]["agree"] == N


def _old_reshape(x, sample_shape, info=None):  # the bug: NCHW-converted data reshaped back to NHWC
    want = tuple(int(d) for d in sample_shape)
    return (x if tuple(x.shape[1:]) == want else x.reshape(x.shape[0], *want)), ""


def test_guard_fires_on_wrongly_prepared_data(models, tmp_path, capsys, monkeypatch):
    xs = _pixels()
    data = _npz(tmp_path / "d.npz", xs, _ort(models["nhwc"], xs).argmax(1))
    monkeypatch.setattr(cdata, "check_against_model", _old_reshape)
    rc = main(["certify", str(models["nhwc"]), "--data", str(data), "--norm", "linf:0.002", "--method", "ibp"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "onnxruntime" in lines[0] and "no result is reported" in lines[0], err


def test_guard_fires_in_the_library_and_for_check(models, tmp_path, capsys, monkeypatch):
    cm = certonnx.load(str(models["nhwc"]))
    xs = _pixels()
    y = torch.as_tensor(_ort(models["nhwc"], xs).argmax(1))
    scrambled = torch.from_numpy(np.ascontiguousarray(xs.transpose(0, 3, 1, 2))).reshape(N, H, W, 3)
    with pytest.raises(ParityError, match="another class"):  # onnxruntime gets the pixels as stored
        certify_dataset(cm, scrambled, y, {"linf": 0.0}, "ibp", onnx_path=str(models["nhwc"]), progress=False,
                        ort_inputs=xs)
    # the same data, prepared correctly, passes
    ok = certify_dataset(cm, torch.from_numpy(xs), y, {"linf": 0.0}, "ibp", onnx_path=str(models["nhwc"]),
                         progress=False, ort_inputs=xs)
    assert ok["clean_accuracy"] == 1.0
    # a torch model that no longer computes what the file computes (same inputs on both sides)
    import copy

    bad = copy.deepcopy(cm)
    with torch.no_grad():
        for p in bad.module.parameters():
            p.mul_(-1.0)
    with pytest.raises(ParityError, match="another class"):
        certify_dataset(bad, torch.from_numpy(xs), y, {"linf": 0.0}, "ibp", onnx_path=str(models["nhwc"]),
                        progress=False)
    # check --data goes through the same guard
    data = _npz(tmp_path / "d.npz", xs, y.numpy())
    assert main(["check", str(models["nhwc"]), "--data", str(data), "--require", "clean>=0.99", "--require", "linf:0.001>=0", "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(cdata, "check_against_model", _old_reshape)
    rc = main(["check", str(models["nhwc"]), "--data", str(data), "--require", "clean>=0.99", "--require", "linf:0.001>=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "onnxruntime" in err and "Traceback" not in err


def test_finetune_is_guarded_before_training(models, tmp_path, capsys, monkeypatch):
    xs = _pixels()
    y = _ort(models["nhwc"], xs).argmax(1)
    np.savez(tmp_path / "d.npz", x_train=xs, y_train=y, x_test=xs[:8], y_test=y[:8])
    from certonnx.train import Trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cdata, "check_against_model", _old_reshape)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started on scrambled data"))
    rc = main(["finetune", str(models["nhwc"]), "--data", "d.npz", "--norm", "linf:0.01", "--epochs", "1",
               "-o", "ft.onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and "onnxruntime" in err, err


def test_finetune_certifies_nhwc_data_as_stored(models, tmp_path, capsys, monkeypatch):
    xs = _pixels()
    y = _ort(models["nhwc"], xs).argmax(1)
    np.savez(tmp_path / "d.npz", x_train=xs, y_train=y, x_test=xs[:16], y_test=y[:16])
    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", str(models["nhwc"]), "--data", "d.npz", "--norm", "linf:0.001", "--method", "standard",
               "--epochs", "1", "--lr", "1e-9", "--batch-size", "16", "--eval-method", "ibp", "-o", "ft.onnx",
               "--json", "res.json", "--accept-worse"])  # lr 1e-9: the layout is under test, not a gain
    assert rc == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "res.json").read_text())["evaluation"]
    assert ev["clean_accuracy"] == 1.0  # (a learning rate of 1e-9 leaves the predictions as they were)


# -- the layout rules ----------------------------------------------------------------------------


def test_check_against_model_uses_the_stored_layout(tmp_path):
    xs = _pixels()
    p = _npz(tmp_path / "d.npz", xs, np.zeros(N))
    x, _, info = load_npz(p)
    assert x.shape == (N, 3, H, W) and info["stored_shape"] == [H, W, 3]
    assert np.array_equal(as_stored(x, info).numpy(), xs)
    same, note = check_against_model(x, (H, W, 3), info)  # NHWC model: the pixels untouched
    assert np.array_equal(same.numpy(), xs) and note == "" and info["layout"] == "NHWC (as stored)"
    chw, note = check_against_model(x, (3, H, W), dict(info))  # NCHW model: load_npz's transpose
    assert np.array_equal(chw.numpy(), xs.transpose(0, 3, 1, 2)) and note == ""
    flat, note = check_against_model(x, (H * W * 3,), dict(info))  # flat MLP: the stored order
    assert np.array_equal(flat.numpy(), xs.reshape(N, -1)) and "reshaped" in note
    cf, note = check_against_model(x, (3, H * W), dict(info))  # channels first, spatial merged
    assert np.array_equal(cf.numpy(), xs.transpose(0, 3, 1, 2).reshape(N, 3, -1)) and "transposed" in note
    with pytest.raises(DataError, match="another arrangement"):
        check_against_model(x, (6, 32), dict(info))  # same count, no order-preserving fit
    with pytest.raises(DataError, match=r"values\)"):
        check_against_model(x, (3, H, H + 1), dict(info))


def test_nchw_data_for_nhwc_model_without_info():
    x = torch.rand(2, 3, 4, 5)
    out, note = check_against_model(x, (4, 5, 3))
    assert torch.equal(out, x.permute(0, 2, 3, 1)) and "transposed" in note


def test_ambiguous_shape_prefers_the_model_shape(tmp_path):
    """(N, 3, 4, 3): could be NCHW or NHWC; the model's own shape wins, nothing is converted."""
    xa = np.random.default_rng(0).random((4, 3, 4, 3)).astype(np.float32)
    x, _, info = load_npz(_npz(tmp_path / "d.npz", xa, np.zeros(4)))
    out, note = check_against_model(x, (3, 4, 3), info)
    assert np.array_equal(out.numpy(), xa) and note == ""


def test_grey_images_reach_any_grey_layout(tmp_path):
    xa = np.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    x, _, info = load_npz(_npz(tmp_path / "d.npz", xa, np.zeros(5)))
    ref = xa.astype(np.float32) / 255
    for want in [(1, 6, 7), (6, 7, 1), (6, 7), (42,), (42, 1)]:
        out, _ = check_against_model(x, want, dict(info))
        assert np.array_equal(out.numpy().reshape(5, 6, 7), ref), want


def test_plan_layout_rules():
    assert plan_layout((8, 8, 3), (8, 8, 3)) == ([], "")
    assert plan_layout((8, 8, 3), (3, 8, 8))[0] == [("transpose", (0, 3, 1, 2))]
    assert plan_layout((3, 8, 8), (8, 8, 3))[0] == [("transpose", (0, 2, 3, 1))]
    assert plan_layout((8, 8, 3), (192,))[0] == [("reshape", (192,))]
    assert plan_layout((3, 32, 32), (32, 96))[0] == [("transpose", (0, 2, 3, 1)), ("reshape", (32, 96))]
    assert plan_layout((3, 32, 32), (6, 512)) is None
    assert is_reshape_view((28, 28), (784, 1)) and is_reshape_view((1, 28, 28), (28, 28, 1))
    assert is_reshape_view((8, 8, 3), (64, 3)) and not is_reshape_view((8, 8, 3), (3, 64))
    assert not is_reshape_view((4, 6), (6, 4)) and not is_reshape_view((4, 6), (25,))


def test_near_ties_and_guard_tolerance(models):
    runner = OrtRunner(models["mlp"])
    x = np.random.default_rng(0).random((6, H * W * 3)).astype(np.float32)
    o = runner(x)
    assert check_clean_predictions(runner, x, o)["agree"] == 6
    wrong = o.copy()
    wrong[:, :] = 0
    wrong[np.arange(6), (o.argmax(1) + 1) % o.shape[1]] = 1  # a different class everywhere
    with pytest.raises(ParityError, match="6 of 6"):
        check_clean_predictions(runner, x, wrong)
    assert near_ties(np.array([[1.0, 1.0 - 1e-6, 0.0], [1.0, 0.5, 0.0]])).tolist() == [True, False]
    assert guard_indices(10).tolist() == list(range(10)) and len(guard_indices(10_000)) == 256
    with pytest.raises(DataError, match="onnxruntime's input"):
        check_clean_predictions(runner, x.reshape(6, 3, 64)[:, :, :63], o)
