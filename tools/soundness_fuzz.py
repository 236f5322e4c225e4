"""Long offline run of the adversarial differential soundness suite (tests/soundness_harness.py).

    .venv/bin/python tools/soundness_fuzz.py --cases 100000 --seed 7            # one core
    .venv/bin/python tools/soundness_fuzz.py --cases 100000 --seed 7 --jobs 4   # four processes
    .venv/bin/python tools/soundness_fuzz.py --families cast,maxpool --cases 2000
    .venv/bin/python tools/soundness_fuzz.py --replay conv2d/123456789          # one case, verbose
    .venv/bin/python tools/soundness_fuzz.py --replay regress/l2_broadcast_add

Case ``i`` of a run with seed ``S`` is family ``FAMILIES[i % len(FAMILIES)]`` (round robin, so every
op family gets the same share) built from ``derive_seed(S, i)``; its id ``family/seed`` is all that
is needed to rebuild it (``--replay``). Nothing stops the run: every failure is counted, printed
with its seed, case index, case id and the saved ONNX file, appended to ``OUT/failures.jsonl``;
the exit status is 1 when any case failed (a soundness violation or an engine crash), else 0.

Progress lines go to stdout every ``--progress`` seconds (flushed, so they show in CI logs and
when piped), and a per-op-family table closes the run. ``--rel-tol 0`` makes the containment
checks strict (no float tolerance at all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.soundness_harness import (  # noqa: E402 - after the sys.path set-up
    FAMILIES,
    REGRESSIONS,
    CaseResult,
    Config,
    Summary,
    Violation,
    build_case,
    case_from_id,
    derive_seed,
    run_case,
)

_WORKDIR: Path | None = None
_CFG: Config | None = None


def _init_worker(workdir: str, cfg: Config) -> None:
    """One thread per process: the cases are tiny, and jobs × threads must not oversubscribe."""
    global _WORKDIR, _CFG
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _WORKDIR = Path(workdir) / f"w{os.getpid()}"
    _WORKDIR.mkdir(parents=True, exist_ok=True)
    _CFG = cfg


def _one(job: tuple[int, str, int]) -> tuple[int, int, CaseResult]:
    """Build and run case ``index`` (family, seed); the ONNX file is deleted unless the case failed."""
    index, family, seed = job
    assert _WORKDIR is not None and _CFG is not None
    try:
        case = build_case(family, seed)
    except Exception as e:  # noqa: BLE001 - a generator bug: report it as a harness crash
        res = CaseResult(f"{family}/{seed}", family, "<build failed>")
        res.add(Violation("crash", "build", "-", "harness", float("inf"), 0.0, 0.0, f"{type(e).__name__}: {e}"))
        return index, seed, res
    res = run_case(case, _WORKDIR, _CFG)
    if res.onnx_path and not res.failed:
        Path(res.onnx_path).unlink(missing_ok=True)
    return index, seed, res


def _worker_main(conn: Connection, workdir: str, cfg: Config) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _init_worker(workdir, cfg)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_one(job))


class _Worker:
    """A case runner in its own process: a native crash (heap corruption in an extension, an
    abort) or a hang kills only that process; the case is recorded and a fresh worker continues."""

    def __init__(self, ctx: Any, workdir: str, cfg: Config) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, workdir, cfg), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[int, str, int] | None = None
        self.started = 0.0

    def submit(self, job: tuple[int, str, int]) -> None:
        self.job, self.started = job, time.monotonic()
        self.conn.send(job)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()


def _lost(job: tuple[int, str, int], why: str) -> tuple[int, int, CaseResult]:
    index, family, seed = job
    res = CaseResult(f"{family}/{seed}", family, "<worker died>")
    res.add(Violation("crash", "process", "-", "native", float("inf"), 0.0, 0.0,
                      f"{why}; rerun alone with --replay {family}/{seed}"))
    return index, seed, res


def _run_pool(jobs: Iterator[tuple[int, str, int]], n: int, workdir: str, cfg: Config,
              case_timeout: float) -> Iterator[tuple[int, int, CaseResult] | None]:
    """Results of all jobs from ``n`` worker processes, restarting any that die or hang; ``None``
    about once a second while nothing finishes (so the caller can still print progress)."""
    ctx = mp.get_context("fork")
    workers = [_Worker(ctx, workdir, cfg) for _ in range(max(1, n))]
    todo = iter(jobs)

    def feed(w: _Worker) -> None:
        job = next(todo, None)
        if job is not None:
            w.submit(job)
        else:
            w.job = None

    for w in workers:
        feed(w)
    try:
        while any(w.job is not None for w in workers):
            busy = [w for w in workers if w.job is not None]
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0)
            got = False
            for i, w in enumerate(workers):
                if w.job is None:
                    continue
                result = None
                if w.conn.poll():
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = _lost(w.job, f"worker exited with code {w.proc.exitcode}")
                elif not w.proc.is_alive():
                    result = _lost(w.job, f"worker died (exit code {w.proc.exitcode}: a native crash)")
                elif time.monotonic() - w.started > case_timeout:
                    w.proc.kill()
                    result = _lost(w.job, f"case ran over {case_timeout:.0f}s (killed)")
                if result is None:
                    continue
                got = True
                yield result
                if not w.proc.is_alive() or result[2].desc == "<worker died>":
                    w.stop()
                    workers[i] = w = _Worker(ctx, workdir, cfg)
                feed(w)
            if not got:
                yield None
    finally:
        for w in workers:
            w.stop()


def _jobs(seed: int, n: int, families: tuple[str, ...], start: int) -> Iterator[tuple[int, str, int]]:
    for i in range(start, start + n):
        yield i, families[i % len(families)], derive_seed(seed, i)


def replay(ids: list[str], out: Path, cfg: Config) -> int:
    """Rebuild and run each case id, printing everything it found; ONNX files kept in ``out``."""
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for cid in ids:
        case = case_from_id(cid)
        print(f"== {cid}: {case.desc}")
        print(f"   mode {case.mode}, opset {case.opset}, sample shape {case.sample_shape}, domain {case.domain}, "
              f"eps {case.eps}")
        res = run_case(case, out, cfg)
        print(res.report())
        print(f"   {res.checks} comparisons in {res.seconds:.2f}s; worst relative excess within tolerance "
              f"{res.worst_rel_excess:.3g}")
        for op, norm, claimed, measured in res.op_gains:
            flag = "  <-- exceeds" if measured > claimed * (1 + 1e-5) + 1e-6 else ""
            print(f"   op {op:12s} {norm:4s} claimed {claimed:.6g}  measured {measured:.6g}{flag}")
        if res.widths:
            print("   max bound width: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(res.widths.items())))
        bad += res.failed
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="number of cases (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    ap.add_argument("--start", type=int, default=0, help="first case index (to resume or split a run)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--families", default=None, help="comma-separated subset of: " + ", ".join(FAMILIES))
    ap.add_argument("--out", default=None, help="where failing ONNX files and failures.jsonl go "
                                                "(default ./soundness-fuzz-SEED)")
    ap.add_argument("--replay", nargs="+", metavar="CASE_ID", help="rerun these case ids (family/seed or "
                    "regress/NAME; regression names: " + ", ".join(REGRESSIONS) + ")")
    ap.add_argument("--rel-tol", type=float, default=None, help="containment tolerance relative to 1 + max|output| "
                    "(default 0: strict containment)")
    ap.add_argument("--alpha-steps", type=int, default=None, help="alpha-CROWN steps per bound (default 3)")
    ap.add_argument("--progress", type=float, default=5.0, help="seconds between progress lines (default 5)")
    ap.add_argument("--no-lipschitz", action="store_true", help="skip the Lipschitz checks")
    ap.add_argument("--case-timeout", type=float, default=120.0, help="seconds before a case's worker is killed "
                    "and the case recorded as failed (default 120)")
    args = ap.parse_args(argv)

    cfg = Config()
    if args.rel_tol is not None:
        cfg.rel_tol = args.rel_tol
    if args.alpha_steps is not None:
        cfg.alpha_steps = args.alpha_steps
    if args.no_lipschitz:
        cfg.lipschitz = cfg.op_lipschitz = False
    out = Path(args.out) if args.out else Path.cwd() / f"soundness-fuzz-{args.seed}"
    warnings.simplefilter("ignore")
    if args.replay:
        return replay(args.replay, out, cfg)

    families = FAMILIES
    if args.families:
        families = tuple(f.strip() for f in args.families.split(",") if f.strip())
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            ap.error(f"unknown families: {', '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    fails_path = out / "failures.jsonl"
    work = Path(tempfile.mkdtemp(prefix="certonnx-soundness-"))
    summary = Summary()
    done = failed = 0
    t0 = last = time.monotonic()
    print(f"soundness fuzz: {args.cases} cases from index {args.start}, seed {args.seed}, {args.jobs} job(s), "
          f"{len(families)} families, rel_tol {cfg.rel_tol:g}; failures -> {fails_path}", flush=True)
    jobs = _jobs(args.seed, args.cases, families, args.start)
    try:
        results = _run_pool(jobs, args.jobs, str(work), cfg, args.case_timeout)
        with fails_path.open("a") as fails:
            for item in results:
                now = time.monotonic()
                if item is None:
                    if now - last >= args.progress:
                        last = now
                        print(f"[{now - t0:8.1f}s] {done}/{args.cases} cases  (waiting on a slow case)", flush=True)
                    continue
                index, seed, res = item
                done += 1
                summary.add(res)
                if res.failed:
                    failed += 1
                    saved = None
                    if res.onnx_path and Path(res.onnx_path).exists():
                        saved = out / Path(res.onnx_path).name
                        shutil.move(res.onnx_path, saved)
                        res.onnx_path = str(saved)
                    print(f"FAIL run seed {args.seed} case {index} id {res.case_id} onnx {saved or '-'}\n"
                          f"{res.report()}", flush=True)
                    fails.write(json.dumps({"run_seed": args.seed, "index": index, "case_seed": seed,
                                            **asdict(res)}, default=str) + "\n")
                    fails.flush()
                now = time.monotonic()
                if now - last >= args.progress:
                    last = now
                    rate = done / (now - t0)
                    print(f"[{now - t0:8.1f}s] {done}/{args.cases} cases  {rate:.1f} cases/s  failed {failed}  "
                          f"eta {(args.cases - done) / max(rate, 1e-9):.0f}s", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dt = time.monotonic() - t0
    print(f"\n{done} cases in {dt:.1f}s ({done / max(dt, 1e-9):.1f} cases/s, {args.jobs} job(s)); {failed} failed", flush=True)
    print(summary.table(), flush=True)
    if failed:
        print(f"\nfailures: {fails_path}; replay one with: python tools/soundness_fuzz.py --replay CASE_ID", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
