"""The cross-framework examples (``examples/*_pipeline.py``) run end to end.

Each one trains a model in its framework, exports it with that framework's ONNX exporter and
runs ``certonnx certify -> check -> finetune -> check`` on it. The slow test runs a whole
example (20-60 s each on one CPU thread) and checks what its ``summary.json`` says: the export
matches the framework, the gate fails on the plain export and passes on the fine-tuned model,
and fine-tuning raised certified accuracy. It skips, naming the packages, when the exporter is
not installed (only the PyTorch one runs in the project venv; see docs/examples.md for the
others' venvs). Run with ``CERTONNX_SLOW=1 python -m pytest tests/test_examples.py -p no:xdist``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# framework -> (script, modules it imports, what to pip install)
PIPELINES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pytorch": ("pytorch_pipeline.py", ("torch",), "torch"),
    "keras": ("keras_pipeline.py", ("tensorflow", "keras", "tf2onnx"), "tensorflow-cpu tf2onnx"),
    "jax": ("jax_pipeline.py", ("jax", "flax", "optax", "jax2onnx"), "jax flax jax2onnx"),
    "sklearn": ("sklearn_pipeline.py", ("sklearn", "skl2onnx"), "scikit-learn skl2onnx"),
}


@pytest.mark.slow
@pytest.mark.parametrize("framework", list(PIPELINES))
def test_pipeline_end_to_end(framework: str, tmp_path: Path) -> None:
    script, modules, pip = PIPELINES[framework]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}, not installed in this environment "
                    f"(pip install {pip}; see docs/examples.md)")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--out-dir", str(tmp_path), "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    log = f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["passed"], log
    assert s["export"]["max_abs_diff"] < 1e-3
    # the example's thresholds are not trivially met: the plain export fails the same gate ...
    assert s["check_plain"]["exit_code"] == 1 and s["check_plain"]["line"].startswith("FAIL"), log
    # ... that the fine-tuned model passes, from its certificate and when re-certified
    assert s["check"]["exit_code"] == 0 and s["check"]["line"].startswith("PASS"), log
    assert s["check_recertified"]["line"].startswith("PASS") and "re-certified now" in s["check_recertified"]["line"]
    for norm in ("linf", "l2"):
        assert s["after"]["certified"][norm] > s["before"]["certified"][norm], (norm, s["before"], s["after"])
    assert s["after"]["union"] > 0
    # the output shows the CLI commands a user would type, in order
    shown = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("$ certonnx ")]
    assert shown == ["certify", "check", "finetune", "check", "check"], shown
    print(f"{framework}: {s['seconds']}s; before {s['before']}; after {s['after']}")


@pytest.mark.parametrize("framework", list(PIPELINES))
def test_pipeline_help_needs_no_framework(framework: str) -> None:
    """--help works without the exporter installed: frameworks are imported only inside the
    build function, after the thread limits are set (and so the slow test can skip cleanly)."""
    script = PIPELINES[framework][0]
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--data" in proc.stdout and "--require" in proc.stdout
    assert proc.stdout.startswith(f"usage: {script}")


def test_load_mnist_writes_the_subset_certonnx_uses(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _pipeline
    finally:
        sys.path.remove(str(EXAMPLES))
    data = _pipeline.load_mnist(_pipeline.FIXTURE, 50, 30, tmp_path)
    assert data.x_train.shape == (50, 28, 28) and data.x_test.shape == (30, 28, 28)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    with np.load(data.path) as d, np.load(_pipeline.FIXTURE) as full:
        assert sorted(d.files) == ["x_test", "x_train", "y_test", "y_train"]
        np.testing.assert_array_equal(d["x_train"], full["x_train"][:50])
        np.testing.assert_array_equal(d["y_test"], full["y_test"][:30])
        np.testing.assert_allclose(data.x_test, full["x_test"][:30] / 255.0, atol=1e-7)
