"""The auto_LiRPA half of ``tools/bench/lirpa.py``: runs in the reference venv (auto_LiRPA from
its git repository, torch < 2.9), imports nothing from certonnx.

    python tools/bench/lirpa_worker.py --onnx NET.onnx --inputs IN.npz --methods ibp,crown,alpha-crown
        --alpha-steps 20 --out OUT.json

``IN.npz`` holds ``x`` (the model's input layout), ``lo``/``hi`` (the L∞ box, already clipped to
the domain) and ``C`` (specification rows, ``(B, S, K)``). The ONNX file is imported with
onnx2torch, as certonnx does, so both engines bound the same torch graph. For each method the
lower bounds of ``C·f`` and the seconds of a call (after one untimed warm-up call of the same
method on the first sample; the best of up to 5 calls while they take under 1 s together) are
written to ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import onnx
import torch
from onnx2torch import convert

METHOD = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--methods", default="ibp,crown,alpha-crown")
    ap.add_argument("--alpha-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    from auto_LiRPA import __version__ as lirpa_version

    d = np.load(args.inputs)
    x, lo, hi, C = (torch.as_tensor(d[k], dtype=torch.float32) for k in ("x", "lo", "hi", "C"))
    model = convert(onnx.load(args.onnx)).eval()
    lm = BoundedModule(model, torch.zeros(1, *x.shape[1:]), device="cpu", verbose=0)
    lm.set_bound_opts({"optimize_bound_args": {"iteration": args.alpha_steps}})
    out: dict = {"version": lirpa_version, "torch": torch.__version__, "methods": {}}

    def run(n: int | None, meth: str) -> torch.Tensor:
        s = slice(None) if n is None else slice(0, n)
        ptb = PerturbationLpNorm(norm=np.inf, x_L=lo[s], x_U=hi[s])
        bx = BoundedTensor(x[s], ptb)
        lb, _ = lm.compute_bounds(x=(bx,), C=C[s], method=METHOD[meth], bound_upper=False)
        return lb.detach()

    for meth in args.methods.split(","):
        try:
            run(1, meth)  # warm-up: graph preparation, first-call allocations
            best, spent = float("inf"), 0.0
            for _ in range(5):  # best of up to 5 calls within ~1 s (fast methods are noisy)
                t0 = time.perf_counter()
                lb = run(None, meth)
                dt = time.perf_counter() - t0
                best, spent = min(best, dt), spent + dt
                if spent > 1.0:
                    break
            out["methods"][meth] = {"seconds": best, "lb": lb.tolist()}
        except Exception as e:  # recorded, not fatal: the table says which call failed and why
            out["methods"][meth] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(meth, {k: v for k, v in out["methods"][meth].items() if k != "lb"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
