"""Train a small CNN in plain PyTorch, export it to ONNX, make it certifiably robust with
certonnx and certify it.

    python examples/pytorch_finetune.py [--n-train 10000] [--eps 0.1] [--epochs 2] [--out /tmp/robust.onnx]

Uses MNIST from $CERTONNX_DATA or ../shared/data/mnist.npz; without it, the 200-image fixture
subset in tests/fixtures (numbers are then only a smoke test). The same fine-tuning from the
command line:

    certonnx finetune plain.onnx --data mnist.npz --norm linf:0.1 --method ibp --epochs 2 -o robust.onnx
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import certonnx  # noqa: E402
from certonnx.certify.core import certify_dataset  # noqa: E402
from certonnx.data import find_data, load_npz  # noqa: E402
from certonnx.io.metadata import make_certificate, read_certificate  # noqa: E402
from certonnx.train import TrainConfig, Trainer  # noqa: E402


def plain_pytorch_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2, help="certified fine-tuning epochs")
    ap.add_argument("--method", default="ibp")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    data = find_data("mnist.npz") or ROOT / "tests" / "fixtures" / "mnist_200.npz"
    print(f"data: {data}")
    x, y, _ = load_npz(data, "train", a.n_train)
    xt, yt, info = load_npz(data, "test", a.n_test)
    tmp = Path(tempfile.mkdtemp(prefix="certonnx_example_"))

    # 1. plain PyTorch training (2 epochs of Adam)
    net = plain_pytorch_model()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    t0 = time.monotonic()
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    print(f"1. trained in plain PyTorch ({time.monotonic() - t0:.0f}s): test accuracy {acc:.2%}")

    # 2. export to ONNX like any PyTorch user would
    plain = tmp / "plain.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(plain), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    print(f"2. exported to {plain}")

    # 3. certonnx: import, certify before, fine-tune, certify after, export with certificate
    cm = certonnx.load(plain)
    norms = {"linf": a.eps}
    before = certify_dataset(cm, xt, yt, norms, "crown-ibp", progress=False)
    print(f"3. before: clean {before['clean_accuracy']:.2%}, certified (CROWN-IBP, L∞ {a.eps}) "
          f"{before['certified_accuracy']['linf']:.2%}")
    for p in cm.module.parameters():
        p.requires_grad_(True)
    cfg = TrainConfig(norms=norms, method=a.method, epochs=a.epochs, lr=2e-4, warmup_epochs=0,
                      ramp_epochs=max(1, a.epochs // 2), checkpoint_dir=str(tmp / "ckpt"))
    t0 = time.monotonic()
    log = Trainer(cm.module, x, y, cfg, sample_shape=cm.sample_shape, progress=True,
                  echo=lambda s: print("   " + s)).fit()
    cm.module.eval()
    after = certify_dataset(cm, xt, yt, norms, "crown-ibp", progress=False)
    print(f"4. fine-tuned with {a.method} for {len(log)} epochs ({time.monotonic() - t0:.0f}s): clean "
          f"{after['clean_accuracy']:.2%}, certified {after['certified_accuracy']['linf']:.2%}")
    cert = make_certificate(norms=norms, input_space=after["input_space"], method=after["method"],
                            verifier="examples/pytorch_finetune.py", dataset_sha256=info["sha256"], n=after["n"],
                            clean_accuracy=after["clean_accuracy"], certified_accuracy=after["certified_accuracy"],
                            union_certified_accuracy=after["union_certified_accuracy"],
                            pgd_accuracy=after["pgd_accuracy"])
    out = Path(a.out) if a.out else tmp / "robust.onnx"
    certonnx.export(cm, out, certificate=cert)
    c = read_certificate(out)
    print(f"5. wrote {out}; its certificate says certified accuracy {c['certified_accuracy']} on {c['n']} "
          f"test images")


if __name__ == "__main__":
    main()
