"""ACERT vs IBP on a subset of an MNIST-layout dataset (small, CPU): docs/acert.md.

    python tools/experiments/acert_vs_ibp.py --data ../shared/data/fashion_mnist.npz --eps-max 0.1 \
        --test-eps 0.03,0.07,0.1 --n-train 6000 --epochs 8 --ramp 4 acert:0.0 acert:0.5 ibp ibp@0.05

Each run trains cnn3 from scratch (IBP init + Shi et al. regularisers), then reports clean
accuracy, IBP-certified accuracy at each test ε and the average certified radius (IBP, search up
to --eps-max) on the first --n-test test images. Results as JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from certonnx.certify.radius import certified_radius, radius_summary
from certonnx.data import load_npz
from certonnx.train.archs import build_model
from certonnx.train.loop import TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="acert:KAPPA or ibp[@EPS]")
    ap.add_argument("--data", required=True)
    ap.add_argument("--eps-max", type=float, default=0.4)
    ap.add_argument("--test-eps", default="0.1,0.3,0.4")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ramp", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y, _ = load_npz(args.data, "train", args.n_train)
    xt, yt, _ = load_npz(args.data, "test", args.n_test)
    test_eps = [float(e) for e in args.test_eps.split(",")]
    for spec in args.runs:
        spec_m, _, teps = spec.partition("@")
        meth, _, kap = spec_m.partition(":")
        opts = {"acert_kappa": float(kap)} if meth == "acert" else {}
        train_eps = float(teps) if teps else args.eps_max
        cm = build_model("cnn3", tuple(x.shape[1:]), 10, seed=args.seed)
        cfg = TrainConfig(norms={"linf": train_eps}, method=meth, epochs=args.epochs, batch_size=100, lr=1e-3,
                          warmup_epochs=args.warmup, ramp_epochs=args.ramp, regularize=True, options=opts,
                          seed=args.seed)
        t0 = time.time()
        Trainer(cm.module, x, y, cfg, progress=False).fit()
        seconds = time.time() - t0
        m = cm.module.eval()
        bm = BoundedModule(m, tuple(x.shape[1:]))
        with torch.no_grad():
            correct = m(xt).argmax(1) == yt
            cert = {}
            for e in test_eps:
                lb, _ = bm.compute(InputSet(xt, e, "linf"), C=margin_matrix(yt, 10), method="ibp", upper=False)
                cert[str(e)] = round(float(((lb.amin(1) > 0) & correct).float().mean()), 4)
            r = certified_radius(bm, xt, yt, "linf", args.eps_max, "ibp", iters=10, num_classes=10)
        acr = radius_summary(r, args.eps_max, correct=correct)["acr"]
        print(json.dumps({"run": spec, "clean": round(float(correct.float().mean()), 4), "certified_ibp": cert,
                          "acr": round(acr, 4), "train_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
