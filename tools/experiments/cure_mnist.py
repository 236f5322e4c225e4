"""CURE side by side with single-norm certified training at the paper's MNIST-small radii.

    python tools/experiments/cure_mnist.py run --data ../shared/data/mnist.npz --out runs/cure --seed 0
    python tools/experiments/cure_mnist.py run --data ../shared/data/mnist.npz --out runs/cure --seed 1
    python tools/experiments/cure_mnist.py table --out runs/cure

What ``run`` does, with one seed (the fine-tuning seed; the pretrained model is shared):

1. **pretrain** (once, seed 0, shared by every seed): SABR L∞ 0.1 from scratch — the paper's
   fine-tuning setting starts from an L∞-certified model. Skipped when ``pretrained.pt`` exists.
2. **fine-tune** a copy of it with each of the runs of :data:`FINETUNE_RUNS`, same schedule,
   same data order (the seed), same code path (``--method cure``, which is SABR with one norm):
   single-norm L∞ (SABR), single-norm L2 (the official L2 term: an L∞ box of radius 1e-5·ε₂ at
   the L2-PGD point, trained at 0.5 as the official l2.sh), single-norm L1 (an L1 SABR region), CURE joint / max / random over L∞ + L2
   and the CURE-Finetune preset (max + bound alignment 0.5); L2 at 0.5 as finetune_linf.sh.
3. **scratch** (``--scratch``): the CURE-Scratch preset (max + alignment 2.0 + per-epoch
   gradient projection β 0.8, L2 at 0.75 as ours.sh) from scratch with the pretraining schedule, next to the
   pretrained SABR model (the single-norm scratch baseline of the same schedule).

Every model is evaluated on the first ``--n-test`` test images under L∞ 0.1, L2 0.5 and
L1 1.0 (the paper's evaluation radii) with certonnx's ``alpha-crown`` (the cascade IBP →
CROWN-IBP → CROWN → α-CROWN, no branch and bound; certonnx's α-CROWN optimises the final
pass's ReLU slopes), PGD at each radius, and the union (certified under all three).

Results are JSON lines in ``OUT/results.jsonl`` (one per model and seed, with training and
certification seconds); a run whose line exists is skipped, so an interrupted ``run`` resumes
where it stopped. Training uses one thread (``--threads``); the two seeds can run as two
processes on two cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# MNIST small, training: from scratch CURE trains L2 at 0.75 (scripts/mnist_small/ours.sh, joint.sh);
# the single-norm L2 baseline (l2.sh) and the fine-tune (finetune_linf.sh) train L2 at 0.5
TRAIN_RADII = {"linf": 0.1, "l2": 0.5, "l1": 1.0}
SCRATCH_RADII = {**TRAIN_RADII, "l2": 0.75}
EVAL_RADII = {"linf": 0.1, "l2": 0.5, "l1": 1.0}  # MNIST small, evaluation (the paper's table)

# name -> (norms trained, cure options); every run also gets pgd_steps=8 (the official scripts)
FINETUNE_RUNS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "sabr-linf": (("linf",), {}),
    "l2-official": (("l2",), {}),
    "sabr-l1": (("l1",), {}),
    "cure-joint": (("linf", "l2"), {"cure_variant": "joint"}),
    "cure-max": (("linf", "l2"), {"cure_variant": "max"}),
    "cure-random": (("linf", "l2"), {"cure_variant": "random"}),
    "cure-finetune": (("linf", "l2"), {"cure_preset": "finetune"}),
}
SCRATCH_RUN = ("cure-scratch", ("linf", "l2"), {"cure_preset": "scratch"})


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _done(out: Path) -> set[tuple[str, int]]:
    path = out / "results.jsonl"
    if not path.exists():
        return set()
    return {(r["run"], r["seed"]) for r in (json.loads(s) for s in path.read_text().splitlines() if s.strip())}


def _append(out: Path, row: dict[str, Any]) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def evaluate(cm: Any, xt: torch.Tensor, yt: torch.Tensor) -> dict[str, Any]:
    from certonnx.certify.core import certify_dataset

    cm.module.eval()
    t0 = time.time()
    r = certify_dataset(cm, xt, yt, dict(EVAL_RADII), method="alpha-crown", progress=False)
    return {"clean": r["clean_accuracy"], "certified": r["certified_accuracy"],
            "union": r["union_certified_accuracy"], "pgd": r["pgd_accuracy"],
            "certify_seconds": round(time.time() - t0, 1), "certifier": "certonnx alpha-crown (no BaB)"}


def train(cm: Any, x: torch.Tensor, y: torch.Tensor, norms: tuple[str, ...], options: dict[str, Any], *,
          epochs: int, warmup: int, ramp: int, lr: float, milestones: list[int], seed: int,
          regularize: bool, radii: dict[str, float] = TRAIN_RADII) -> float:
    from certonnx.train.loop import TrainConfig, Trainer

    cfg = TrainConfig(norms={n: radii[n] for n in norms}, method="cure", epochs=epochs, batch_size=128,
                      lr=lr, lr_schedule="step", lr_milestones=milestones, warmup_epochs=warmup,
                      ramp_epochs=ramp, eps_schedule="smooth" if warmup else "linear", regularize=regularize,
                      options={"pgd_steps": 8, **options}, seed=seed)
    t0 = time.time()
    Trainer(cm.module, x, y, cfg, progress=False, echo=_log).fit()
    return round(time.time() - t0, 1)


def cmd_run(a: argparse.Namespace) -> None:
    from certonnx.data import load_npz
    from certonnx.train.archs import build_model

    torch.set_num_threads(a.threads)
    from certonnx.allocator import tune_allocator

    tune_allocator()  # as the certonnx command runs
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, _ = load_npz(a.data, "train", a.n_train)
    xt, yt, _ = load_npz(a.data, "test", a.n_test)
    shape = tuple(x.shape[1:])
    done = _done(out)
    pre_sched = dict(epochs=a.pre_epochs, warmup=1, ramp=a.pre_ramp, lr=5e-4, milestones=[a.pre_epochs - 1],
                     regularize=True)
    pre_path = out / "pretrained.pt"
    pre = build_model(a.arch, shape, 10, seed=0)
    if pre_path.exists():
        pre.module.load_state_dict(torch.load(pre_path))
    else:
        _log(f"pretrain: {a.arch}, SABR linf {TRAIN_RADII['linf']}, {a.pre_epochs} epochs")
        secs = train(pre, x, y, ("linf",), {}, seed=0, **pre_sched)
        tmp = out / "pretrained.pt.tmp"
        torch.save(pre.module.state_dict(), tmp)
        tmp.replace(pre_path)
        (out / "pretrained.json").write_text(json.dumps({"train_seconds": secs}))
    if ("pretrained", 0) not in done:
        _append(out, {"run": "pretrained", "seed": 0, "arch": a.arch,
                      "train_seconds": json.loads((out / "pretrained.json").read_text())["train_seconds"],
                      **evaluate(pre, xt, yt)})
    runs = [r for r in (a.runs.split(",") if a.runs else FINETUNE_RUNS)]
    for name in runs:
        if (name, a.seed) in done:
            continue
        norms, opts = FINETUNE_RUNS[name]
        cm = copy.deepcopy(pre)
        _log(f"fine-tune {name} (seed {a.seed})")
        secs = train(cm, x, y, norms, opts, epochs=a.ft_epochs, warmup=0, ramp=a.ft_ramp, lr=5e-4,
                     milestones=[a.ft_epochs - 1], seed=a.seed, regularize=False)
        row = {"run": name, "seed": a.seed, "arch": a.arch, "train_seconds": secs, **evaluate(cm, xt, yt)}
        _append(out, row)
        _log(json.dumps(row))
    if a.scratch and (SCRATCH_RUN[0], a.seed) not in done:
        name, norms, opts = SCRATCH_RUN
        cm = build_model(a.arch, shape, 10, seed=a.seed)
        _log(f"scratch {name} (seed {a.seed})")
        secs = train(cm, x, y, norms, opts, seed=a.seed, radii=SCRATCH_RADII, **pre_sched)
        row = {"run": name, "seed": a.seed, "arch": a.arch, "train_seconds": secs, **evaluate(cm, xt, yt)}
        _append(out, row)
        _log(json.dumps(row))


def cmd_table(a: argparse.Namespace) -> None:
    rows = [json.loads(s) for s in (Path(a.out) / "results.jsonl").read_text().splitlines() if s.strip()]
    order = ["pretrained", *FINETUNE_RUNS, SCRATCH_RUN[0]]
    print("| model | seed | clean | L∞ 0.1 | L2 0.5 | L1 1.0 | union | PGD L∞ | PGD L2 | PGD L1 | train s | certify s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    for name in order:
        for r in sorted((r for r in rows if r["run"] == name), key=lambda r: r["seed"]):
            c, p = r["certified"], r["pgd"]
            print(f"| {name} | {r['seed']} | {pct(r['clean'])} | {pct(c['linf'])} | {pct(c['l2'])} | "
                  f"{pct(c['l1'])} | **{pct(r['union'])}** | {pct(p['linf'])} | {pct(p['l2'])} | {pct(p['l1'])} | "
                  f"{r['train_seconds']:.0f} | {r['certify_seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate (resumable)")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0, help="fine-tuning seed (the pretrained model is seed 0)")
    r.add_argument("--arch", default="mlp")
    r.add_argument("--n-train", type=int, default=60000)
    r.add_argument("--n-test", type=int, default=1000)
    r.add_argument("--pre-epochs", type=int, default=6)
    r.add_argument("--pre-ramp", type=int, default=3)
    r.add_argument("--ft-epochs", type=int, default=3)
    r.add_argument("--ft-ramp", type=int, default=1)
    r.add_argument("--runs", default="", help="comma-separated subset of the fine-tuning runs")
    r.add_argument("--scratch", action="store_true", help="also train CURE-Scratch from scratch")
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table", help="results.jsonl as a markdown table")
    t.add_argument("--out", required=True)
    a = ap.parse_args()
    cmd_run(a) if a.cmd == "run" else cmd_table(a)


if __name__ == "__main__":
    main()
