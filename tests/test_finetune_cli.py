"""``certonnx finetune`` end to end: fine-tune a fixture model, certify, export with certificate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certonnx.utils import sha256_file
from tests.paths import FIXTURES
from tests.train_util import write_npz

FIX = FIXTURES


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(monkeypatch: pytest.MonkeyPatch, cwd: Path, *args: str) -> int:
    from certonnx.cli import main

    monkeypatch.chdir(cwd)
    return main(list(args))


def _ort_certificate(path: Path) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert "certonnx.version" in meta
    return json.loads(meta["certonnx.certificate"])


def test_finetune_fixture_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    model, data = FIX / "mnist_mlp_trained.onnx", FIX / "mnist_200.npz"
    if not model.exists() or not data.exists():
        pytest.skip("fixtures mnist_mlp_trained.onnx / mnist_200.npz not present (tools/make_fixtures.py)")
    before = sha256_file(model)
    rc = _run(monkeypatch, tmp_path, "finetune", str(model), "--data", str(data), "--norm", "linf:0.02",
              "--method", "ibp", "--epochs", "2", "--n-train", "64", "--batch-size", "32", "--eval-n", "20",
              "--eval-method", "ibp", "-o", "ft.onnx", "--json", "res.json", "--log-json", "log.json",
              "--accept-worse")
    assert rc == 0, capsys.readouterr().err
    assert sha256_file(model) == before  # the input is never written
    res = json.loads((tmp_path / "res.json").read_text())
    cert = _ort_certificate(tmp_path / "ft.onnx")
    ev = res["evaluation"]
    assert cert["n"] == ev["n"] == 20
    assert cert["norms"] == {"linf": 0.02}
    assert cert["certified_accuracy"]["linf"] == pytest.approx(ev["certified_accuracy"]["linf"])
    assert cert["clean_accuracy"] == pytest.approx(ev["clean_accuracy"])
    assert cert["clean_accuracy"] >= 0.5  # fine-tuning a trained model at a small ε keeps it accurate
    assert cert["extra"]["training"]["method"] == "ibp"
    assert cert["weights_sha256"]
    log = json.loads((tmp_path / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2]
    assert set(log[0]) >= {"epoch", "eps", "lr", "loss", "clean_acc", "cert_acc", "seconds"}
    assert not (tmp_path / "ft.onnx.ckpt").exists()  # removed after a successful run (--keep-checkpoints keeps it)

    # the exported model computes what the fine-tuned torch model computes (parity checked in export),
    # and differs from the input model (it was trained)
    import numpy as np
    import onnxruntime as ort

    x = np.random.RandomState(0).rand(4, *[d if isinstance(d, int) else 1 for d in
                                          ort.InferenceSession(str(model)).get_inputs()[0].shape[1:]])
    a = ort.InferenceSession(str(model)).run(None, {ort.InferenceSession(str(model)).get_inputs()[0].name:
                                                    x.astype(np.float32)})[0]
    s2 = ort.InferenceSession(str(tmp_path / "ft.onnx"))
    b = s2.run(None, {s2.get_inputs()[0].name: x.astype(np.float32)})[0]
    assert not np.allclose(a, b)


def test_finetune_from_scratch_json_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = write_npz(tmp_path / "d.npz", n=96, n_test=16)
    rc = _run(monkeypatch, tmp_path, "finetune", "--arch", "cnn3", "--data", str(data), "--norm", "linf:0.05",
              "--method", "sabr", "--epochs", "2", "--batch-size", "32", "--pgd-steps", "2", "--eval-method", "ibp",
              "--method-opt", "sabr_lambda=0.3", "--json", "-", "--accept-worse")
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["method"] == "sabr" and res["arch"] == "cnn3"
    assert res["output"] == "cnn3_sabr.onnx"
    cert = _ort_certificate(tmp_path / "cnn3_sabr.onnx")
    assert cert["n"] == 16
    assert res["training"]["config"]["regularize"] is True  # Shi et al. regularisers on from scratch
    # the method's options, typed, every key with its value (an unknown key is refused: test_structure.py)
    assert res["training"]["config"]["options"] == {"sabr_lambda": 0.3, "pgd_steps": 2}


def test_bad_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_npz(tmp_path / "d.npz", n=32, n_test=8)
    assert _run(monkeypatch, tmp_path, "finetune", "--data", str(data), "--norm", "linf:0.1") != 0
    assert "either MODEL.onnx" in capsys.readouterr().err
    assert _run(monkeypatch, tmp_path, "finetune", "--arch", "mlp", "--data", str(data), "--norm", "linf:0.1",
                "--epochs", "2", "--ramp-epochs", "5") != 0
    assert "exceed --epochs" in capsys.readouterr().err


def _scratch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *extra: str) -> int:
    data = tmp_path / "d.npz"
    if not data.exists():
        write_npz(data, n=32, n_test=8)
    return _run(monkeypatch, tmp_path, "finetune", "--arch", "mlp", "--data", str(data), "--norm", "linf:2/255",
                "--epochs", "1", "--batch-size", "16", "--eval-method", "ibp", "--device", "cpu", "-o", "o.onnx",
                *extra)


def test_eval_n_0_says_no_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from certonnx.io.metadata import read_certificate

    assert _scratch(monkeypatch, tmp_path, "--eval-n", "0") == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "without a certificate" in out and "with certificate" not in out, out
    assert read_certificate(tmp_path / "o.onnx") is None
    assert not (tmp_path / "o.onnx.ckpt").exists()


def test_checkpoints_removed_kept_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "o.onnx.ckpt"
    assert _scratch(monkeypatch, tmp_path) == 0
    assert "with certificate written" in capsys.readouterr().out.replace("\n", " ")
    assert not ck.exists()
    # kept on request ...
    assert _scratch(monkeypatch, tmp_path, "--keep-checkpoints") == 0
    assert (ck / "last.pt").exists() and "checkpoints kept in" in capsys.readouterr().out.replace("\n", " ")
    # ... and a resumed run that completes cleans up too
    assert _scratch(monkeypatch, tmp_path, "--resume") == 0
    assert "resumed from" in capsys.readouterr().err
    assert not ck.exists()
    # a checkpoint folder of the user's keeps the user's files (only certonnx's are removed)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _scratch(monkeypatch, tmp_path, "--checkpoint-dir", str(mine)) == 0
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "last.pt").exists()


@pytest.mark.parametrize("exc, rc", [(KeyboardInterrupt, 130), (MemoryError, 3)])
def test_checkpoints_kept_when_a_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], exc: type, rc: int) -> None:
    from certonnx import api

    def boom(*a: object, **k: object) -> None:
        raise exc()

    monkeypatch.setattr(api, "_evaluate", boom)  # after training, before the export
    assert _scratch(monkeypatch, tmp_path) == rc
    assert (tmp_path / "o.onnx.ckpt" / "last.pt").exists() and not (tmp_path / "o.onnx").exists()
    capsys.readouterr()


def test_finetune_that_does_not_improve_exits_1_and_keeps_the_old_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A fine-tune with lr 1e-9 cannot raise the certified accuracy: it is rejected (exit 1),
    the existing output keeps its bytes, the model goes to OUTPUT.rejected.onnx; --accept-worse
    writes it."""
    model, data = FIX / "mnist_mlp_trained.onnx", FIX / "mnist_200.npz"
    good = tmp_path / "robust.onnx"
    good.write_bytes(model.read_bytes())
    before = sha256_file(good)
    args = ["finetune", str(model), "--data", str(data), "--norm", "linf:0.002", "--method", "ibp", "--epochs", "1",
            "--n-train", "64", "--batch-size", "32", "--lr", "1e-9", "--eval-n", "20", "--eval-method", "ibp",
            "-o", str(good), "--json", "res.json"]
    rc = _run(monkeypatch, tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 1 and [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        next(ln for ln in err.splitlines() if ln.startswith("error: not an improvement"))], err
    assert sha256_file(good) == before
    rejected = tmp_path / "robust.rejected.onnx"
    assert rejected.exists()
    res = json.loads((tmp_path / "res.json").read_text())
    assert not res["verdict"]["accepted"] and res["output"] == str(rejected)
    assert res["evaluation"]["union_certified_accuracy"] <= res["before"]["union_certified_accuracy"]
    assert _run(monkeypatch, tmp_path, *args, "--accept-worse") == 0
    assert sha256_file(good) != before


def test_worse_reasons() -> None:
    """Collapse (no better than the majority class), no certified gain, too large a clean drop."""
    import torch

    from certonnx.api import _worse_reasons

    y = torch.tensor([0, 0, 0, 1])
    def rep(clean: float, union: float) -> dict:  # noqa: E306
        return {"clean_accuracy": clean, "union_certified_accuracy": union}
    assert _worse_reasons(rep(0.9, 0.5), rep(0.95, 0.2), y, None) == []
    assert any("collapsed" in r for r in _worse_reasons(rep(0.75, 0.75), rep(0.95, 0.2), y, None))
    assert any("not above" in r for r in _worse_reasons(rep(0.9, 0.2), rep(0.95, 0.2), y, None))
    assert any("fell 5.0 points" in r for r in _worse_reasons(rep(0.9, 0.5), rep(0.95, 0.2), y, 3.0))
    assert _worse_reasons(rep(0.9, 0.5), None, y, 3.0) == []  # from scratch: only the collapse check


def test_reach_warnings_name_the_radii_the_input_model_is_far_from() -> None:
    from certonnx.api import REACH_FRACTION, reach_warnings

    before = {"clean_accuracy": 0.98, "epsilon": {"linf": 0.1, "l2": 0.75},
              "pgd_accuracy": {"linf": 0.9, "l2": 0.98 * REACH_FRACTION - 0.01},
              "certified_accuracy": {"linf": 0.8, "l2": 0.0}}
    msgs = reach_warnings(before)
    assert len(msgs) == 1 and "l2 0.75" in msgs[0] and "PGD" in msgs[0]
    assert reach_warnings({**before, "pgd_accuracy": {"linf": 0.9, "l2": 0.9}}) == []


def test_finetune_warns_before_training_at_an_unreachable_radius(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The quick-start MLP (not L2-robust at 2.0): a note before the first epoch, and in the JSON."""
    model, data = FIX / "mnist_mlp_trained.onnx", FIX / "mnist_200.npz"
    rc = _run(monkeypatch, tmp_path, "finetune", str(model), "--data", str(data), "--norm", "l2:2.0", "--method",
              "ibp", "--epochs", "1", "--n-train", "32", "--batch-size", "32", "--eval-n", "20", "--eval-method",
              "ibp", "-o", str(tmp_path / "o.onnx"), "--json", "res.json", "--accept-worse")
    err = capsys.readouterr().err
    assert rc == 0, err
    note = next(ln for ln in err.splitlines() if "under PGD at l2 2" in ln)
    assert err.index(note) < err.index("epoch 1/1")
    assert json.loads((tmp_path / "res.json").read_text())["reach_warnings"]
