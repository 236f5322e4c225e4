"""Data-parallel training: 2 processes (torchrun, gloo on CPU) == 1 process, same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_util import subprocess_env, write_npz

REPO = Path(__file__).resolve().parents[1]


def _args(data: Path, out: str) -> list[str]:
    return ["finetune", "--arch", "mlp", "--data", str(data), "--norm", "linf:0.05", "--method", "ibp",
            "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "1", "--batch-size", "32", "--lr", "0.01",
            "--no-regularize", "--eval-n", "0", "--seed", "3", "-o", out, "--checkpoint-dir", out + ".ck",
            "--keep-checkpoints", "--log-json", out + ".log.json"]


def test_two_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = write_npz(tmp_path / "d.npz", n=96)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "certonnx", *_args(data, "two.onnx")]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(REPO), capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    from certonnx.cli import main

    monkeypatch.chdir(tmp_path)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(data, "one.onnx")) == 0
    finally:
        torch.set_num_threads(old)
    one = torch.load(tmp_path / "one.onnx.ck" / "last.pt", weights_only=False)
    two = torch.load(tmp_path / "two.onnx.ck" / "last.pt", weights_only=False)
    assert one["epoch"] == two["epoch"] == 2
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-4, rtol=1e-4), k
    # not trivially equal to the initial weights
    assert (tmp_path / "two.onnx").exists() and (tmp_path / "one.onnx").exists()
    import json

    l1 = json.loads((tmp_path / "one.onnx.log.json").read_text())
    l2 = json.loads((tmp_path / "two.onnx.log.json").read_text())
    assert [e["loss"] for e in l1] == pytest.approx([e["loss"] for e in l2], rel=1e-4, abs=1e-5)
    assert l1[-1]["loss"] != l1[0]["loss"]
