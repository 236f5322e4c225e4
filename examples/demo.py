"""`make demo`: the whole certonnx workflow on a bundled MNIST model, in a few minutes on a CPU.

1. inspect the model (ops, normalization, what can be bounded);
2. certify it at L∞ and L2 (clean / PGD / certified accuracy);
3. fine-tune it with a certified loss (IBP) for a short while;
4. certify the result, and read its certificate back with plain onnxruntime.

Uses ../shared/data/mnist.npz (or $CERTONNX_DATA) for training when present, else the 200
bundled MNIST images. Every step is the same CLI command a user would type.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certonnx.cli import main as certonnx_main  # noqa: E402
from certonnx.data import find_data  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "mnist_cnn_trained.onnx"
TEST = ROOT / "tests" / "fixtures" / "mnist_200.npz"
OUT = ROOT / "out"
NORMS = "linf:0.1,l2:0.5"


def run(args: list[str]) -> None:
    print(f"\n$ certonnx {shlex.join(args)}", flush=True)
    code = certonnx_main(args)
    if code != 0:
        sys.exit(f"demo step failed with exit code {code}")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    mnist = find_data("mnist.npz")
    train_data = str(mnist) if mnist else str(TEST)
    # with full MNIST: 4 epochs on 12k images; with only the 200 bundled images: more epochs
    schedule = (["--n-train", "12000", "--epochs", "4", "--ramp-epochs", "3", "--lr", "5e-4"] if mnist
                else ["--epochs", "40", "--ramp-epochs", "30", "--lr", "1e-3", "--batch-size", "50"])
    if not mnist:
        print("(../shared/data/mnist.npz not found: fine-tuning on the 200 bundled images only)")
    before, after = OUT / "demo_before.json", OUT / "demo_after.json"
    robust = OUT / "demo_robust.onnx"

    run(["inspect", str(MODEL)])
    run(["certify", str(MODEL), "--data", str(TEST), "--norm", NORMS, "--method", "crown-ibp", "--json", str(before)])
    run(["finetune", str(MODEL), "--data", train_data, *schedule, "--norm", "linf:0.1", "--method", "ibp",
         "--eval-n", "200", "--eval-method", "crown-ibp", "-o", str(robust)])
    run(["certify", str(robust), "--data", str(TEST), "--norm", NORMS, "--method", "crown-ibp", "--json", str(after)])

    import onnxruntime as ort

    meta = ort.InferenceSession(str(robust), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    b, a = json.loads(before.read_text()), json.loads(after.read_text())
    print("\nSummary (200 MNIST test images, ε in pixels [0, 1]):")
    print(f"{'':24s}{'clean':>8s}{'cert L∞ 0.1':>14s}{'cert L2 0.5':>14s}")
    for name, r in (("before (normal training)", b), ("after certonnx finetune", a)):
        ca = r["certified_accuracy"]
        print(f"{name:24s}{r['clean_accuracy']:8.1%}{ca['linf']:14.1%}{ca['l2']:14.1%}")
    print(f"\n{robust.relative_to(ROOT)} metadata keys read back by onnxruntime: {sorted(meta)}")
    cert = json.loads(meta["certonnx.certificate"]) if "certonnx.certificate" in meta else {}
    if cert:
        print("certificate:", json.dumps({k: cert[k] for k in ("norms", "clean_accuracy", "certified_accuracy")
                                          if k in cert}))


if __name__ == "__main__":
    main()
