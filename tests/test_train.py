"""Certified training: every method, schedules, checkpoints/resume, kill -9, NaN, early failures."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from certonnx.errors import CertonnxError, OutputPathError, UnsupportedOpError
from certonnx.train import TrainConfig, Trainer, TrainingError, eps_fraction, lr_at, smooth_ramp
from certonnx.train.methods import REGISTRY, Method, get_method
from certonnx.train.methods.base import robust_ce
from certonnx.train.methods.sabr import shrink_into_ball
from tests.train_util import one_thread, small_cnn_bn, small_mlp, subprocess_env, synthetic_xy, write_npz

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _cfg(method: str, norm: str = "linf", eps: float = 0.05, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(norms={norm: eps}, method=method, epochs=4, batch_size=32, lr=5e-3, warmup_epochs=0,
                ramp_epochs=1, num_classes=3, options={"pgd_steps": 3})
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


BUILTIN = ["standard", "pgd", "ibp", "crown-ibp", "sabr", "mtl-ibp"]  # later methods have their own tests


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
@pytest.mark.parametrize("method", BUILTIN)
def test_method_trains(method: str, norm: str, eps: float) -> None:
    x, y = synthetic_xy(64)
    gm = small_mlp()
    log = Trainer(gm, x, y, _cfg(method, norm, eps), progress=False).fit()
    losses = [e["loss"] for e in log]
    assert all(math.isfinite(v) for v in losses), losses
    # after the ramp (epochs 2..4 at full ε) the loss goes down
    assert losses[-1] < losses[1], losses
    assert log[-1]["clean_acc"] > 0.5
    if REGISTRY[method].certified:
        assert log[-1]["cert_acc"] is not None
    else:
        assert log[-1]["cert_acc"] is None


def test_certified_method_certifies_tiny_problem() -> None:
    x, y = synthetic_xy(96)
    gm = small_mlp()
    log = Trainer(gm, x, y, _cfg("ibp", epochs=8, options={"kappa_end": 0.0}), progress=False).fit()
    assert log[-1]["cert_acc"] > 0.5, log[-1]


def test_multi_norm_and_registry() -> None:
    assert set(BUILTIN) <= set(REGISTRY)
    x, y = synthetic_xy(32)
    log = Trainer(small_mlp(), x, y, _cfg("ibp", norms={"linf": 0.05, "l2": 0.3}, epochs=1),
                  progress=False).fit()
    assert set(log[0]["eps"]) == {"linf", "l2"}
    assert get_method("CROWN_IBP").name == "crown-ibp"
    with pytest.raises(CertonnxError, match="unknown training method"):
        get_method("nope")


def test_robust_ce_and_sabr_projection() -> None:
    lb = torch.tensor([[5.0, 5.0], [-5.0, 1.0]])
    loss = robust_ce(lb)
    assert float(robust_ce(torch.full((2, 2), 50.0))) < 1e-6 < float(loss)
    x = torch.full((4, 1, 3, 3), 0.02)
    x_adv = (x + 0.1 * torch.randn(x.shape).sign()).clamp(0, 1)
    eps, tau = 0.1, 0.04
    c = shrink_into_ball(x, x_adv, eps, tau, "linf", (0.0, 1.0))
    assert torch.all((c - x).abs() <= eps - tau + 1e-7)
    c2 = shrink_into_ball(x, x + torch.randn(x.shape), 0.5, 0.2, "l2", (0.0, 1.0))
    assert torch.all((c2 - x).flatten(1).norm(dim=1) <= 0.3 + 1e-6)


def test_eps_schedule_values() -> None:
    # 2 warm-up epochs, 4 ramp epochs, 10 steps each
    f = [eps_fraction(s, 10, 2, 4, "smooth") for s in range(80)]
    assert all(v == 0 for v in f[:20])
    assert f[59] == 1.0 and all(v == 1.0 for v in f[60:])
    assert all(b >= a for a, b in zip(f, f[1:], strict=False))  # monotone
    lin = [eps_fraction(s, 10, 2, 4, "linear") for s in range(80)]
    assert lin[39] == pytest.approx(0.5)
    assert f[39] < lin[39]  # smooth starts slower than linear
    assert smooth_ramp(0.0) == 0 and smooth_ramp(1.0) == pytest.approx(1.0)
    a = smooth_ramp(0.25)
    assert smooth_ramp(0.25 - 1e-6) == pytest.approx(a, abs=1e-5)  # continuous at the kink
    assert smooth_ramp(0.125) == pytest.approx(a / 16)  # exponent 4 before the kink
    assert eps_fraction(0, 10, 0, 0) == 1.0
    cfg = _cfg("ibp", epochs=10, lr=1.0, lr_milestones=[5, 8], lr_decay=0.1)
    assert [lr_at(cfg, e) for e in (0, 4, 5, 8)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cos = _cfg("ibp", epochs=10, lr=1.0, lr_schedule="cosine")
    assert lr_at(cos, 0) == 1.0 and lr_at(cos, 5) == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["ibp", "mtl-ibp"])
def test_resume_is_identical(tmp_path: Path, method: str) -> None:
    """2 epochs in one go == 1 epoch, stop, resume for 1 more (fresh process state)."""
    x, y = synthetic_xy(64)
    full = small_cnn_bn()
    Trainer(full, x, y, _cfg(method, epochs=2, checkpoint_dir=str(tmp_path / "a")), progress=False).fit()

    part = small_cnn_bn()
    Trainer(part, x, y, _cfg(method, epochs=1, checkpoint_dir=str(tmp_path / "b")), progress=False).fit()
    torch.manual_seed(1234)  # resuming must not depend on the global RNG
    resumed = small_cnn_bn(seed=99)  # different init: everything must come from the checkpoint
    tr = Trainer(resumed, x, y, _cfg(method, epochs=2, checkpoint_dir=str(tmp_path / "b")), progress=False)
    log = tr.fit(resume=True)
    assert [e["epoch"] for e in log] == [1, 2]
    sa, sb = full.state_dict(), resumed.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)  # tensors and plain data only
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "log"} <= set(ck)
    assert ck["epoch"] == 2


class _Payload:
    """An object whose unpickling runs code (here: it would create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_hostile_checkpoint_is_refused_and_never_executed(tmp_path: Path) -> None:
    """A checkpoint folder written by someone else must not run their code on --resume."""
    x, y = synthetic_xy(32)
    ck_dir = tmp_path / "ck"
    Trainer(small_mlp(), x, y, _cfg("ibp", epochs=1, checkpoint_dir=str(ck_dir)), progress=False).fit()
    st = torch.load(ck_dir / "last.pt", weights_only=True)
    marker = tmp_path / "pwned"
    st["log"].append({"note": _Payload(str(marker))})
    torch.save(st, ck_dir / "last.pt")
    tr = Trainer(small_mlp(), x, y, _cfg("ibp", epochs=2, checkpoint_dir=str(ck_dir)), progress=False)
    with pytest.raises(TrainingError, match="refusing checkpoint"):
        tr.fit(resume=True)
    assert not marker.exists()


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    x, y = synthetic_xy(32)
    Trainer(small_mlp(), x, y, _cfg("ibp", epochs=1, checkpoint_dir=str(tmp_path)), progress=False).fit()
    tr = Trainer(small_mlp(), x, y, _cfg("sabr", epochs=2, checkpoint_dir=str(tmp_path)), progress=False)
    with pytest.raises(TrainingError, match="different settings.*method"):
        tr.fit(resume=True)


class _NaNAfterFirstEpoch(Method):
    name = "nan-test"

    def loss(self, model_fn, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        out = model_fn(x).flatten(1)
        loss = torch.nn.functional.cross_entropy(out, y)
        if ctx.epoch >= 1:
            loss = loss * float("nan")
        return loss, {"clean_acc": 0.0, "cert_acc": None}


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "nan-test", _NaNAfterFirstEpoch)
    x, y = synthetic_xy(32)
    gm = small_mlp()
    tr = Trainer(gm, x, y, _cfg("nan-test", epochs=3, checkpoint_dir=str(tmp_path)), progress=False)
    with pytest.raises(TrainingError, match=r"NaN.*epoch 2.*last good checkpoint \(after epoch 1\)"):
        tr.fit()
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(REPO)
    return subprocess.run([PY, "-m", "certonnx", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _cli_inproc(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cwd: Path,
                *args: str) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up): exit code and stderr."""
    from certonnx.cli import main

    monkeypatch.chdir(cwd)
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_unsupported_op_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = numpy_helper.from_array(np.random.RandomState(0).randn(64, 3).astype(np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["h"]),
         helper.make_node("Sin", ["h"], ["out"], name="the_sin")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])], [W])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "sin.onnx")
    data = write_npz(tmp_path / "d.npz")
    rc, err = _cli_inproc(capsys, monkeypatch, tmp_path, "finetune", "sin.onnx", "--data", str(data), "--norm",
                          "linf:0.1", "--epochs", "50", "-o", "o.onnx")
    assert rc != 0
    assert "unsupported op" in err and "sin" in err.lower(), err
    assert "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.onnx.ckpt").exists()

    with pytest.raises(UnsupportedOpError):
        from certonnx.bounds import BoundedModule
        from certonnx.io import load

        BoundedModule(load(tmp_path / "sin.onnx").module, (1, 8, 8))


def test_unwritable_output_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_npz(tmp_path / "d.npz")
    t0 = time.monotonic()
    base = ("finetune", "--arch", "mlp", "--data", str(data), "--norm", "linf:0.1", "--epochs", "500")
    rc, err = _cli_inproc(capsys, monkeypatch, tmp_path, *base, "-o", str(tmp_path / "missing" / "o.onnx"))
    assert rc != 0 and "does not exist" in err, err
    rc, err = _cli_inproc(capsys, monkeypatch, tmp_path, *base, "-o", "ok.onnx", "--log-json",
                          str(tmp_path / "nope" / "log.json"))
    assert rc != 0 and "does not exist" in err, err
    rc, err = _cli_inproc(capsys, monkeypatch, tmp_path, "finetune", str(data), "--data", str(data), "--norm",
                          "linf:0.1", "-o", str(data))
    assert rc != 0 and "overwrite the input" in err, err
    assert time.monotonic() - t0 < 60  # nothing was trained
    assert not (tmp_path / "ok.onnx.ckpt").exists()
    with pytest.raises(OutputPathError):
        from certonnx.utils import check_writable

        check_writable(tmp_path / "missing" / "x")


def test_kill9_then_resume_completes(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "d.npz", n=256)
    epochs = 40  # 8 steps each: the kill (0.2 s after the first checkpoint) lands mid-run
    args = ["finetune", "--arch", "mlp", "--data", str(data), "--norm", "linf:0.05", "--method", "ibp",
            "--epochs", str(epochs), "--batch-size", "32", "-o", "out.onnx", "--checkpoint-dir", "ck",
            "--log-json", "log.json", "--eval-n", "16", "--eval-method", "ibp"]
    env = subprocess_env(REPO)
    p = subprocess.Popen([PY, "-m", "certonnx", *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ck = tmp_path / "ck" / "last.pt"
    deadline = time.monotonic() + 90
    try:
        while not ck.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert ck.exists(), "no checkpoint was written"
        time.sleep(0.2)  # somewhere in a later epoch (possibly while writing a checkpoint)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not (tmp_path / "out.onnx").exists(), "training finished before the kill; make it longer"
    epoch_at_kill = torch.load(ck, weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < epochs
    r = _cli(*args, "--resume", cwd=tmp_path, timeout=150)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    import json

    log = json.loads((tmp_path / "log.json").read_text())
    assert [e["epoch"] for e in log] == list(range(1, epochs + 1))
    assert (tmp_path / "out.onnx").exists()
    # a completed run removes its checkpoint and any temp files of interrupted writes
    # (--keep-checkpoints keeps them); nothing of the killed run is left behind
    assert not (tmp_path / "ck").exists(), list((tmp_path / "ck").iterdir())
