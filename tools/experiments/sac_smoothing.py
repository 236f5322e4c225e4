"""Shrink & Cert against the model it starts from, under the Lipschitz certificate and under
randomized smoothing (the certificate the SaC paper reports): docs/sac.md.

    python tools/experiments/sac_smoothing.py --data ../shared/data/mnist.npz

Trains an MLP (``--arch mlp``) with standard cross-entropy, then fine-tunes copies of it with
SaC (``sac_loss=ce``, the paper's objective, and ``sac_loss=lmt``), as the docs/sac.md table
does, and evaluates every model on the first ``--n-test`` test images with

* ``certify_lipschitz`` at L2 radii ``--radii`` (deterministic), and
* ``certify_smoothing`` at the same radii for each σ of ``--sigmas`` (probabilistic: the
  smoothed classifier, ``--noise-samples`` copies, α = 0.001).

One JSON line per model and certificate on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def main() -> None:
    from certonnx.certify.lipschitz_cert import certify_lipschitz
    from certonnx.certify.smoothing import SmoothingOptions, certify_smoothing
    from certonnx.data import load_npz
    from certonnx.train.archs import build_model
    from certonnx.train.loop import TrainConfig, Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--radii", default="0.5,1.0,1.5")
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--noise-samples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x, y, _ = load_npz(a.data, "train", a.n_train)
    xt, yt, _ = load_npz(a.data, "test", a.n_test)
    radii = [float(r) for r in a.radii.split(",")]

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def fit(m: torch.nn.Module, method: str, epochs: int, ramp: int, options: dict) -> float:
        t0 = time.time()
        Trainer(m, x, y, TrainConfig(norms={"l2": 1.0}, method=method, epochs=epochs, ramp_epochs=ramp,
                                     num_classes=10, lr_schedule="constant", options=options, seed=a.seed),
                progress=False).fit()
        return round(time.time() - t0, 1)

    base = build_model("mlp", tuple(x.shape[1:]), 10, init="default", seed=a.seed)
    log("standard")
    models = {"standard": (base, fit(base.module, "standard", 4, 0, {}))}
    for name, opts in (("sac (ce)", {"sac_alpha": 0.2}), ("sac (lmt)", {"sac_alpha": 0.2, "sac_loss": "lmt"})):
        log(name)
        m = copy.deepcopy(base)
        models[name] = (m, fit(m.module, "sac", 3, 1 if opts.get("sac_loss") == "lmt" else 0, opts))
    for name, (m, secs) in models.items():
        m.module.eval()
        row: dict = {"model": name, "train_seconds": secs}
        lip = {}
        for r in radii:
            res = certify_lipschitz(m, xt, yt, {"l2": r})
            lip[str(r)] = res["certified_accuracy"]["l2"]
            row["clean"] = res["clean_accuracy"]
        row["lipschitz"] = lip
        for s in (float(v) for v in a.sigmas.split(",")):
            t0 = time.time()
            res = certify_smoothing(m, xt, yt, {"l2": radii[0]}, SmoothingOptions(sigma=s, n=a.noise_samples),
                                    seed=a.seed)
            rad = torch.tensor(res["smoothing"]["radius_l2"])
            right = torch.tensor(res["smoothing"]["prediction"]) == yt
            row[f"smoothing_sigma_{s:g}"] = {
                "accuracy": res["smoothing"]["accuracy"], "abstained": res["smoothing"]["abstained"],
                **{str(r): float((right & (rad > r)).double().mean()) for r in radii},
                "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
