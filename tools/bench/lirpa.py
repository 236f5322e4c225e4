"""certonnx's bound engine side by side with auto_LiRPA, on the same ONNX nets, inputs and ε,
in one run: time ratios, bound differences and certified counts -> docs/benchmarks.md.

    python tools/bench/lirpa.py --build-reference .bench-lirpa --lirpa-src PATH_OR_GIT_URL   # once
    python tools/bench/lirpa.py --reference-python .bench-lirpa/bin/python [--n 32] [--nets ...]

auto_LiRPA needs torch < 2.9, so it runs in a second venv (``--build-reference`` creates one:
torch 2.8.0, onnx, onnx2torch, numpy and auto_LiRPA's few pure-Python dependencies, then
auto_LiRPA itself with ``--no-deps`` from ``--lirpa-src``, a clone of its git repository or a
pip-installable URL). Each net is exported once to ONNX; both engines import that file with
onnx2torch. certonnx runs in this process; auto_LiRPA in ``tools/bench/lirpa_worker.py`` under
the reference venv's Python. Both use 1 thread and the same glibc allocator settings (freed
memory kept for reuse, :mod:`certonnx.allocator`, as the ``certonnx`` command runs; the worker
gets them through glibc's ``MALLOC_*`` variables); each method is timed after an untimed warm-up,
best of up to 5 calls while they take under 1 s together (one call for the slow ones).

certonnx's bounds are sound for float32 execution (they carry rounding terms, docs/bounds.md);
auto_LiRPA's are bounds of the exact-arithmetic model. So the table gives certonnx twice: as
it runs (``sound``) and inside ``exact_arithmetic()`` (``exact``, the like-for-like bound
comparison). ``Δ mean`` = certonnx exact − auto_LiRPA (> 0: certonnx tighter).

Nets: VNN-COMP mnist_fc 256x2/4/6, ERAN relu 9x200 and sigmoid 6x200 (from ``../shared/data``
or ``$CERTONNX_DATA``, skipped when absent), a one-conv MNIST net with MaxPool and the same with
AvgPool (seeded random weights), CNN7 (seeded, BatchNorm in eval mode; CROWN on one image) and
a ResNet-18 at CIFAR shape (torchvision's layout, seeded, one seeded random image, ε 1/255).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from certonnx.allocator import ENV as ALLOCATOR_ENV  # noqa: E402
from certonnx.allocator import tune_allocator  # noqa: E402
from tools.bench.common import write_section  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
WORKER = Path(__file__).with_name("lirpa_worker.py")
REF_PACKAGES = ["torch==2.8.0", "onnx", "onnx2torch", "numpy", "packaging", "appdirs", "pyyaml", "tqdm", "graphviz"]


@dataclass
class Net:
    name: str
    path: Path
    eps: float
    n: int  # images (CROWN on a big conv net: fewer)
    methods: tuple[str, ...]


def _conv_net(pool: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 2), nn.ReLU(), pool(2), nn.Flatten(), nn.Linear(32 * 13 * 13, 10)).eval()


def _cnn7() -> nn.Module:
    from tools.bench.bounds import cnn7

    torch.manual_seed(0)
    return _trained_stats(cnn7())


def _trained_stats(m: nn.Module) -> nn.Module:
    """``m`` in eval mode with non-trivial BatchNorm running statistics, as after training."""
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            mod.running_mean.uniform_(-0.1, 0.1)  # type: ignore[union-attr]
            mod.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    return m.eval()


def _resnet18() -> nn.Module:
    from tools.bench.bounds import resnet18

    torch.manual_seed(0)
    return _trained_stats(resnet18())


def _export(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 28, 28)) -> Path:
    torch.onnx.export(model, (torch.rand(1, *shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return path


def nets(tmp: Path, n: int, only: set[str] | None) -> list[Net]:
    from certonnx.data import find_data

    out: list[Net] = []
    base = find_data("vnncomp")
    full = ("ibp", "crown", "alpha-crown")
    if base is not None:
        for k in (2, 4, 6):
            out.append(Net(f"mnist_fc 256x{k}", base / "mnist_fc" / "onnx" / f"mnist-net_256x{k}.onnx", 0.02, n, full))
        out.append(Net("ERAN relu 9x200", base / "eran" / "nets" / "mnist_relu_9_200.onnx", 0.015, n, full))
        out.append(Net("ERAN sigmoid 6x200", base / "eran" / "nets" / "ffnnSIGMOID__Point_6x200.onnx", 0.012, n, full))
    mnist, cifar = (1, 28, 28), (3, 32, 32)
    builders: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], float, int, tuple[str, ...]]] = [
        ("conv+maxpool", lambda: _conv_net(nn.MaxPool2d), mnist, 0.02, 4, full),
        ("conv+avgpool", lambda: _conv_net(nn.AvgPool2d), mnist, 0.02, 4, full),
        ("CNN7", _cnn7, mnist, 0.002, 1, ("ibp", "crown")),
        ("ResNet-18 (CIFAR)", _resnet18, cifar, 1 / 255, 1, ("ibp", "crown")),
    ]
    for name, ctor, shape, eps, k, methods in builders:
        if only is None or name in only:
            file = tmp / f"{name.split()[0].replace('+', '_')}.onnx"
            out.append(Net(name, _export(ctor(), file, shape), eps, k, methods))
    return [x for x in out if x.path.exists() and (only is None or x.name in only)]


def _inputs(model: object, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST test images (the bundled fixture) for MNIST-shaped nets; for others (CIFAR shape)
    seeded uniform images, labelled with the net's own predictions (no CIFAR data here)."""
    shape = tuple(model.sample_shape)  # type: ignore[attr-defined]
    if int(np.prod(shape)) == 28 * 28:  # any layout of one MNIST image
        d = np.load(FIX / "mnist_200.npz")
        x = torch.as_tensor(d["x_test"][:k], dtype=torch.float32) / 255.0
        y = torch.as_tensor(d["y_test"][:k], dtype=torch.long)
        return x.reshape(k, *shape), y
    x = torch.rand(k, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.module(x).argmax(-1)  # type: ignore[attr-defined]
    return x, y


def _ours(model: object, x: torch.Tensor, C: torch.Tensor, eps: float, method: str, steps: int,
          exact: bool) -> tuple[torch.Tensor, float]:
    import contextlib

    from certonnx.bounds import BoundedModule, InputSet
    from certonnx.bounds.rounding import exact_arithmetic

    ctx = exact_arithmetic() if exact else contextlib.nullcontext()
    with ctx, torch.no_grad():
        bm = BoundedModule(model.module, model.sample_shape)  # type: ignore[attr-defined]
        if x.shape[0] > 1:
            bm.compute(InputSet(x[:1], eps), C[:1], method=method, alpha_steps=steps, upper=False)  # warm-up
        best, spent = float("inf"), 0.0
        for _ in range(5):  # best of up to 5 calls within ~1 s, as the worker does
            t0 = time.perf_counter()
            lb, _ = bm.compute(InputSet(x, eps), C, method=method, alpha_steps=steps, upper=False)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
            if spent > 1.0:
                # a call of over a second is its own warm-up (one image: the warm-up would be the
                # whole call again, minutes for CNN7's CROWN)
                break
        return lb, best


def build_reference(venv: Path, src: str) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + REF_PACKAGES, check=True)
    subprocess.run(pip + ["--no-deps", src], check=True)
    print(f"reference venv ready: {venv}/bin/python")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-python", type=Path, help="python of a venv with auto_LiRPA (see --build-reference)")
    ap.add_argument("--build-reference", type=Path, metavar="VENV", help="create the reference venv and exit")
    ap.add_argument("--lirpa-src", default="git+https://github.com/Verified-Intelligence/auto_LiRPA",
                    help="auto_LiRPA to install into the reference venv (a local clone or a pip URL)")
    ap.add_argument("--n", type=int, default=32, help="images per MLP (conv nets use fewer, see the table)")
    ap.add_argument("--alpha-steps", type=int, default=20)
    ap.add_argument("--nets", default=None, help="comma-separated subset of the net names")
    ap.add_argument("--methods", default=None, help="comma-separated subset of ibp,crown,alpha-crown")
    ap.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                    help="glibc allocator settings of both engines' processes: 'tuned' (freed memory kept for "
                         "reuse, as the certonnx command runs; certonnx/allocator.py) or glibc's defaults")
    ap.add_argument("--ref-timeout", type=float, default=3600.0,
                    help="seconds for auto_LiRPA on one method of one net; past it that row says so")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.build_reference:
        build_reference(args.build_reference, args.lirpa_src)
        return
    if args.reference_python is None or not args.reference_python.exists():
        ap.error("--reference-python PATH is required (create one with --build-reference VENV)")
    torch.set_num_threads(1)
    if args.allocator == "tuned":
        tune_allocator()
    import certonnx
    from certonnx.bounds import margin_matrix

    only = set(args.nets.split(",")) if args.nets else None
    wanted = set(args.methods.split(",")) if args.methods else None
    done: set[str] = set()
    rows: list[str] = []
    ref_version = "?"
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for net in nets(tmp, args.n, only):
            methods = tuple(m for m in net.methods if wanted is None or m in wanted)
            if not methods:
                continue
            model = certonnx.load(net.path)
            x, y = _inputs(model, net.n)
            C = margin_matrix(y, 10)
            lo, hi = (x - net.eps).clamp(0, 1), (x + net.eps).clamp(0, 1)
            np.savez(tmp / "in.npz", x=x.numpy(), lo=lo.numpy(), hi=hi.numpy(), C=C.numpy())
            ref: dict = {"methods": {}}
            for method in methods:  # one worker per method, so a time-out costs only that row
                try:
                    res = subprocess.run([str(args.reference_python), str(WORKER), "--onnx", str(net.path),
                                          "--inputs", str(tmp / "in.npz"), "--methods", method, "--alpha-steps",
                                          str(args.alpha_steps), "--out", str(tmp / "ref.json")],
                                         capture_output=True, text=True, timeout=args.ref_timeout,
                                         env={**os.environ, **(ALLOCATOR_ENV if args.allocator == "tuned" else {})})
                except subprocess.TimeoutExpired:
                    # certonnx is still measured; the row says auto_LiRPA did not finish
                    ref["methods"][method] = {"error": f"did not finish within {args.ref_timeout:g} s"}
                    continue
                if res.returncode != 0:
                    print(res.stdout, res.stderr, file=sys.stderr)
                    raise SystemExit(f"{net.name}: the auto_LiRPA worker failed (exit {res.returncode})")
                one = json.loads((tmp / "ref.json").read_text())
                ref["methods"].update(one["methods"])
                ref_version = one["version"]
            for method in methods:
                lb_s, t_s = _ours(model, x, C, net.eps, method, args.alpha_steps, exact=False)
                r = ref["methods"][method]
                if "error" in r:
                    # no reference to compare the exact-arithmetic bound with: not computed
                    rows.append(f"| {net.name} | {net.n} | {method} | {t_s:.3f} | – | – | {float(lb_s.mean()):.3f} | "
                                f"– | – | – | {int((lb_s.amin(1) > 0).sum())} | – | "
                                f"auto_LiRPA failed: {r['error'][:80]} |")
                    print(rows[-1], flush=True)
                    continue
                lb_e, t_e = _ours(model, x, C, net.eps, method, args.alpha_steps, exact=True)
                lb_r = torch.tensor(r["lb"])
                d = lb_e - lb_r
                rows.append(
                    f"| {net.name} | {net.n} | {method} | {t_s:.3f} | {r['seconds']:.3f} | **{t_s / r['seconds']:.2f}×** | "
                    f"{float(lb_s.mean()):.3f} | {float(lb_e.mean()):.3f} | {float(lb_r.mean()):.3f} | "
                    f"{float(d.mean()):+.2e} / {float(d.abs().max()):.1e} | {int((lb_s.amin(1) > 0).sum())} | "
                    f"{int((lb_r.amin(1) > 0).sum())} | exact-mode time {t_e / r['seconds']:.2f}× |")
                print(rows[-1], flush=True)
            done.add(net.name)
            if only is None and wanted is None:  # a full run keeps what it measured if stopped: write per net
                _write(args, rows, done, ref_version, progress=done)
    # a --nets / --methods rerun merges its (net, method) rows into the section
    print(_write(args, rows, only if wanted is None else (only or done), ref_version))


def _write(args: argparse.Namespace, rows: list[str], only: set[str] | None, ref_version: str,
           progress: set[str] | None = None) -> str:
    """The section's text for ``rows`` and, unless ``--no-write``, docs/benchmarks.md updated:
    with ``only``, the (net, method) rows measured replace theirs in the section already
    there (the rest are kept); ``progress``: the nets a full run, still going or stopped, has measured
    (the section says which rows are from an earlier run)."""
    body = (
        "`python tools/bench/lirpa.py --build-reference .bench-lirpa --lirpa-src AUTO_LIRPA_CLONE` once, then "
        f"`python tools/bench/lirpa.py --reference-python .bench-lirpa/bin/python --n {args.n} --alpha-steps "
        f"{args.alpha_steps}`: certonnx (torch {torch.__version__}) and auto_LiRPA {ref_version} (its git "
        "repository, torch 2.8.0, a second venv), 1 thread each, the same glibc allocator settings ("
        + ("freed memory kept for reuse, `--allocator tuned`: certonnx/allocator.py" if args.allocator == "tuned"
           else "glibc's defaults, `--allocator default`")
        + "), CPU, the same ONNX files imported with onnx2torch, the same images "
        "(the first of the bundled MNIST sample), L∞ ball clipped to [0, 1], margin specification rows. Time: "
        "after a warm-up, best of up to 5 calls within 1 s, lower bounds only. certonnx's bounds are sound for float32 execution "
        "(rounding terms); `exact` is certonnx without them, the like-for-like comparison with auto_LiRPA. "
        "Δ = certonnx exact − auto_LiRPA (mean / max |Δ|; > 0: certonnx tighter). Certified: all margins > 0, "
        "certonnx counted with its sound bounds.\n\n"
        + (f"(A full run stopped or still going; measured in it so far: {', '.join(sorted(progress))}. "
           "The other rows are from an earlier run.)\n\n" if progress else "")
        + "| net | images | method | certonnx s | auto_LiRPA s | ratio | mean lb, sound | mean lb, exact | "
        "mean lb, auto_LiRPA | Δ mean / max | certified, certonnx | certified, auto_LiRPA | note |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows)
    )
    if only is not None and args.out.exists():
        head = body[: body.index("|---|")]
        rule = body[body.index("|---|"):].split("\n")[0]
        body = head + rule + "\n" + "\n".join(_merge_rows(args.out.read_text(), rows))
    if not args.no_write:
        write_section(args.out, "Side by side with auto_LiRPA", body)
    return body


def _merge_rows(doc: str, new: list[str]) -> list[str]:
    """A ``--nets`` / ``--methods`` rerun replaces only the (net, method) rows it measured in
    the section already in ``doc``, keeping the others (from an earlier run) in their order."""
    sec = doc.split("## Side by side with auto_LiRPA", 1)
    if len(sec) < 2:
        return new

    def key(row: str) -> tuple[str, str]:
        cells = row.split("|")
        return cells[1].strip(), cells[3].strip()

    old = [ln for ln in sec[1].split("\n## ")[0].splitlines() if ln.startswith("| ") and not ln.startswith("| net ")]
    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(ln)) if key(ln) in fresh else ln for ln in old]
    return out + [r for r in new if key(r) in fresh]


if __name__ == "__main__":
    main()
