"""Shared part of the cross-framework examples (``{pytorch,keras,jax,sklearn}_pipeline.py``).

Each example trains a small MNIST model in its own framework and exports it to ONNX with that
framework's exporter; everything after the export is the same certonnx command line, which is
what this module runs and prints:

    certonnx certify model.onnx --data data.npz --norm linf:0.1,l2:0.75 -o model_certified.onnx
    certonnx check model_certified.onnx --require ...      # the plain export: expected to FAIL
    certonnx finetune model.onnx --data data.npz --norm linf,l2 --method ibp -o robust.onnx
    certonnx check robust.onnx --require ...               # PASS, from the certificate it carries
    certonnx check robust.onnx --require ... --data data.npz   # PASS, re-certified from scratch

The commands run as ``python -m certonnx`` child processes (in the work directory, so the
printed commands use short file names) rather than in-process: an exporter's framework
(TensorFlow, JAX) then never shares a process with torch, and this module itself imports
neither, so ``--help`` is instant and a TensorFlow venv needs only certonnx reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mnist_200.npz"
# the radii `certonnx finetune --norm linf,l2` picks for MNIST-shaped inputs (the CURE paper's
# "small" setting); certify and check use the same ones so all numbers are comparable
NORMS = {"linf": 0.1, "l2": 0.75}


class PipelineError(RuntimeError):
    """A step did not do what the example expects (non-zero exit, missing output)."""


@dataclass
class Mnist:
    """The images every step uses, as float32 in [0, 1] (``(N, 28, 28)``) with int64 labels.

    ``path`` is the .npz subset written for the certonnx commands, so the framework trains on
    exactly the images certonnx fine-tunes on and certifies against."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    path: Path


@dataclass
class Export:
    """What an example's framework part reports back after writing the ONNX file.

    ``sample_input``/``sample_output`` are a few test inputs in the layout the model takes and
    the framework's own outputs for them, so the export can be compared with onnxruntime;
    ``output_kind`` says whether the framework output is logits or probabilities (sklearn only
    exposes the latter)."""

    description: str
    test_accuracy: float
    sample_input: np.ndarray
    sample_output: np.ndarray
    output_kind: str = "logits"
    notes: list[str] = field(default_factory=list)


BuildFn = Callable[[Mnist, Path, int], Export]


def parse_args(doc: str, method: str, epochs: int, argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None,
                    help=f"MNIST .npz with x_train/y_train/x_test/y_test [default: {FIXTURE.relative_to(ROOT)}]")
    ap.add_argument("--n-train", type=int, default=1000, help="training images used (capped by the file)")
    ap.add_argument("--n-test", type=int, default=500, help="test images certified (capped by the file)")
    ap.add_argument("--out-dir", type=Path, default=None, help="work directory [default: a new temporary one]")
    ap.add_argument("--method", default=method, help="certonnx finetune --method")
    ap.add_argument("--epochs", type=int, default=epochs, help="certonnx finetune --epochs")
    ap.add_argument("--bound", default="crown-ibp", help="bound method of certify/finetune/check (auto is "
                    "tighter but can take minutes on a CPU)")
    ap.add_argument("--require", action="append", default=None, metavar="REQ",
                    help="certonnx check requirement (repeatable); replaces the example's own list")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for the framework and certonnx")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def limit_threads(n: int) -> None:
    """Thread caps that must be in the environment before torch/TensorFlow/JAX load (in this
    process and in the certonnx children, which inherit them)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(n)
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_mnist(src: Path, n_train: int, n_test: int, work: Path) -> Mnist:
    """First ``n_train``/``n_test`` images of ``src``, also written to ``work/data.npz``."""
    with np.load(src) as d:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
        if missing:
            raise PipelineError(f"{src}: missing arrays {sorted(missing)}")
        arrays = {k: d[k][: n_train if k.endswith("train") else n_test] for k in d.files if k[2:] in ("train", "test")}
    path = work / "data.npz"
    np.savez_compressed(path, **arrays)

    def images(a: np.ndarray) -> np.ndarray:
        a = a.reshape(a.shape[0], 28, 28)
        return (a.astype(np.float32) / 255.0) if a.dtype == np.uint8 else a.astype(np.float32)

    return Mnist(images(arrays["x_train"]), arrays["y_train"].astype(np.int64), images(arrays["x_test"]),
                 arrays["y_test"].astype(np.int64), path)


def compare_with_onnxruntime(path: Path, exp: Export) -> float:
    """Max |framework - onnxruntime| on the sample inputs: the exporter must not change the model."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: exp.sample_input.astype(np.float32)})
    out = next(o for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating))
    if exp.output_kind == "probabilities":
        z = np.exp(out - out.max(1, keepdims=True))
        out = z / z.sum(1, keepdims=True)
    return float(np.abs(out - exp.sample_output).max())


class Runner:
    """Runs ``python -m certonnx ...`` in the work directory, echoing each command first."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = dict(os.environ)
        # a source checkout works without `pip install -e .` too
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p)
        self.env.setdefault("COLUMNS", "110")  # rich wraps piped output at 80 columns otherwise
        self.steps: list[dict[str, Any]] = []

    def __call__(self, args: list[str], expect: int = 0) -> dict[str, Any]:
        print(f"\n$ certonnx {shlex.join(args)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "certonnx", *args], cwd=self.work, env=self.env).returncode
        step = {"command": "certonnx " + shlex.join(args), "exit_code": rc, "seconds": round(time.monotonic() - t0, 1)}
        self.steps.append(step)
        if rc != expect:
            raise PipelineError(f"`certonnx {args[0]}` exited with {rc} (expected {expect}); see its output above")
        return step

    def json(self, name: str) -> dict[str, Any]:
        p = self.work / name
        if not p.is_file():
            raise PipelineError(f"{p} was not written")
        return json.loads(p.read_text())


def numbers(res: dict[str, Any]) -> dict[str, Any]:
    """The key numbers of a certify/finetune result (the certificate's names)."""
    return {"clean": res["clean_accuracy"], "pgd": dict(res["pgd_accuracy"]),
            "certified": dict(res["certified_accuracy"]), "union": res["union_certified_accuracy"]}


def describe(n: dict[str, Any]) -> str:
    parts = [f"clean {n['clean']:.1%}"]
    for norm, eps in NORMS.items():
        parts.append(f"{norm} {eps:g}: PGD {n['pgd'][norm]:.1%}, certified {n['certified'][norm]:.1%}")
    parts.append(f"all norms at once: certified {n['union']:.1%}")
    return "; ".join(parts)


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main(framework: str, build: BuildFn, *, doc: str, requirements: list[str], method: str, epochs: int,
         argv: list[str] | None = None) -> int:
    """The whole example: data -> ``build`` (framework training + ONNX export) -> certonnx steps.

    Writes ``summary.json`` in the work directory (what tests/test_examples.py checks) and
    returns the exit code: 0 when the fine-tuned model passes ``certonnx check``."""
    a = parse_args(doc, method, epochs, argv)
    limit_threads(a.threads)
    work = (a.out_dir or Path(tempfile.mkdtemp(prefix=f"certonnx_{framework}_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = (a.data or FIXTURE).resolve()
    reqs = a.require or requirements
    require_args = [arg for r in reqs for arg in ("--require", r)]
    norms_arg = ",".join(f"{k}:{v:g}" for k, v in NORMS.items())
    t_start = time.monotonic()
    summary: dict[str, Any] = {"framework": framework, "work_dir": str(work), "data": str(src),
                               "requirements": reqs, "method": a.method, "epochs": a.epochs}
    try:
        data = load_mnist(src, a.n_train, a.n_test, work)
        banner(f"1. {framework}: train a small model and export it to ONNX")
        print(f"data: {src} -> {data.path.name} ({len(data.x_train)} training, {len(data.x_test)} test images); "
              f"work directory: {work}", flush=True)
        t0 = time.monotonic()
        exp = build(data, work / "model.onnx", a.seed)
        diff = compare_with_onnxruntime(work / "model.onnx", exp)
        print(f"{exp.description}: test accuracy {exp.test_accuracy:.1%}; wrote model.onnx "
              f"({time.monotonic() - t0:.1f}s); {framework} vs onnxruntime max abs diff {diff:.1e}", flush=True)
        for note in exp.notes:
            print(f"note: {note}")
        if diff > 1e-3:
            raise PipelineError(f"the ONNX export disagrees with {framework} (max abs diff {diff:.2e})")
        summary["export"] = {"description": exp.description, "test_accuracy": exp.test_accuracy,
                             "max_abs_diff": diff, "seconds": round(time.monotonic() - t0, 1)}

        run = Runner(work)
        banner("2. certify the plain export (ε in pixel units)")
        run(["certify", "model.onnx", "--data", "data.npz", "--norm", norms_arg, "--method", a.bound,
             "-o", "model_certified.onnx", "--json", "certify.json"])
        summary["before"] = numbers(run.json("certify.json"))
        print(f"before: {describe(summary['before'])}")

        banner("3. the deployment gate on the plain export (expected to fail)")
        plain = run(["check", "model_certified.onnx", *require_args, "--json", "check_plain.json"], expect=1)
        summary["check_plain"] = {"exit_code": plain["exit_code"], "line": run.json("check_plain.json")["line"]}

        banner(f"4. certified fine-tuning ({a.method}) for L∞ and L2 at once")
        run(["finetune", "model.onnx", "--data", "data.npz", "--norm", "linf,l2", "--method", a.method,
             "--epochs", str(a.epochs), "--lr", "1e-3", "--batch-size", "32", "--eval-method", a.bound,
             "--seed", str(a.seed), "-o", "robust.onnx", "--json", "finetune.json"])
        ft = run.json("finetune.json")
        if {k: float(v) for k, v in ft["norms"].items()} != NORMS:
            raise PipelineError(f"finetune chose radii {ft['norms']}, expected {NORMS}")
        summary["after"] = numbers(ft["evaluation"])
        summary["training_seconds"] = ft["training"]["seconds"]
        print(f"after: {describe(summary['after'])}")

        banner("5. the gate on the fine-tuned model, from the certificate it carries")
        ok = run(["check", "robust.onnx", *require_args, "--json", "check.json"], expect=0)
        summary["check"] = {"exit_code": ok["exit_code"], "line": run.json("check.json")["line"]}

        banner("6. the same gate, re-certifying the file from scratch instead of trusting its metadata")
        again = run(["check", "robust.onnx", *require_args, "--data", "data.npz", "--method", a.bound,
                     "--json", "check_recertified.json"], expect=0)
        summary["check_recertified"] = {"exit_code": again["exit_code"],
                                        "line": run.json("check_recertified.json")["line"]}
        summary["steps"] = run.steps
        summary["passed"] = True
    except PipelineError as e:
        summary["passed"] = False
        summary["error"] = str(e)
        print(f"\nexample failed: {e}", file=sys.stderr)
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["passed"]:
        banner(f"summary ({framework}, {summary['seconds']:.0f}s in all)")
        print(f"before fine-tuning: {describe(summary['before'])}")
        print(f"after  fine-tuning: {describe(summary['after'])}")
        print(f"gate {' '.join(reqs)}: plain export exit {summary['check_plain']['exit_code']}, "
              f"fine-tuned exit {summary['check']['exit_code']} (re-certified: "
              f"exit {summary['check_recertified']['exit_code']})")
        print(f"files in {work}; numbers in summary.json")
    return 0 if summary["passed"] else 1
