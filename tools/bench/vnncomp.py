"""Run ``certonnx verify`` on the VNN-COMP benchmarks in ../shared/data/vnncomp and score it.

Usage: ``python -m tools.bench.vnncomp [--timeout 10] [--bench mnist_fc,eran] [--limit N]``

Every instance of each benchmark's ``ground_truth.csv`` is verified with a per-instance timeout
(much shorter than the competition's 120-300 s, to fit a CI-sized budget) and compared with the
ground truth. A *wrong* answer (sat where the truth is unsat, or unsat where it is sat) is the
one thing that must never happen; answers on ``unknown`` ground truth cannot be scored and are
listed separately. Writes the '## VNN-COMP' section of docs/benchmarks.md and a per-instance CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from certonnx.data import find_data  # noqa: E402
from tools.bench.common import write_section  # noqa: E402


def run(bench: str, timeout: float, limit: int | None, log: Path) -> list[dict[str, object]]:
    import certonnx
    from certonnx.certify.verify import VerifyStats, verify
    from certonnx.certify.vnnlib import parse_vnnlib_file
    from certonnx.errors import CertonnxError

    base = find_data(f"vnncomp/{bench}")
    if base is None:
        raise SystemExit(f"vnncomp/{bench} not found (set CERTONNX_DATA)")
    rows = list(csv.DictReader(open(base / "ground_truth.csv")))[:limit]
    models: dict[str, object] = {}
    out = []
    for r in rows:
        t0 = time.monotonic()
        onnx_path = base / r["onnx"]
        try:
            if r["onnx"] not in models:
                models[r["onnx"]] = certonnx.load(onnx_path)
            load_s = time.monotonic() - t0  # loading is counted once per network, not per instance
            prop = parse_vnnlib_file(base / r["vnnlib"])
            st = VerifyStats()
            res, cex = verify(models[r["onnx"]], prop, timeout, onnx_path, stats=st)
        except CertonnxError as e:
            res, st, load_s = "error", VerifyStats(notes=[str(e)]), 0.0
        secs = time.monotonic() - t0 - load_s
        truth = r["result"]
        wrong = (res == "sat" and truth == "unsat") or (res == "unsat" and truth == "sat")
        row = {"benchmark": bench, "onnx": r["onnx"], "vnnlib": r["vnnlib"], "truth": truth, "result": res,
               "wrong": wrong, "seconds": round(secs, 2), "boxes": st.boxes_bounded}
        out.append(row)
        with open(log, "a") as f:
            csv.writer(f).writerow(row.values())
        print(f"{bench} {r['onnx']} {r['vnnlib']} truth={truth} -> {res} {secs:.1f}s"
              f"{'  WRONG' if wrong else ''}", flush=True)
    return out


def table(rows: list[dict[str, object]], timeout: float) -> str:
    lines = [
        f"`python -m tools.bench.vnncomp --timeout {timeout:g}`: per-instance timeout {timeout:g} s "
        "(the competition allows 120-300 s), one process, "
        f"{torch.get_num_threads()} CPU threads, no GPU. Loading each network is not counted. "
        "'solved' counts answers matching the ground truth; WRONG counts sat-vs-unsat contradictions "
        "(must be 0); answers on instances whose ground truth is unknown are not scored.",
        "",
        "| benchmark | instances | truth sat / unsat / unknown | solved sat | solved unsat | "
        "unknown / timeout | WRONG | total time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bench in sorted({str(r["benchmark"]) for r in rows}):
        rs = [r for r in rows if r["benchmark"] == bench]
        ts = sum(r["truth"] == "sat" for r in rs)
        tu = sum(r["truth"] == "unsat" for r in rs)
        tk = sum(r["truth"] == "unknown" for r in rs)
        ss = sum(r["truth"] == "sat" and r["result"] == "sat" for r in rs)
        su = sum(r["truth"] == "unsat" and r["result"] == "unsat" for r in rs)
        open_ = sum(r["result"] in ("unknown", "timeout", "error") for r in rs)
        wrong = sum(bool(r["wrong"]) for r in rs)
        tot = sum(float(r["seconds"]) for r in rs)  # type: ignore[arg-type]
        lines.append(f"| {bench} | {len(rs)} | {ts} / {tu} / {tk} | {ss} | {su} | {open_} | {wrong} | {tot:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--bench", default="mnist_fc,eran")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--csv", default="vnncomp_results.csv", help="Per-instance results (CSV).")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these nets).")
    ap.add_argument("--no-docs", action="store_true", help="Do not touch docs/benchmarks.md.")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from certonnx.allocator import tune_allocator

    tune_allocator()  # as the certonnx command runs
    log = Path(a.csv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        csv.writer(f).writerow(["benchmark", "onnx", "vnnlib", "truth", "result", "wrong", "seconds", "boxes"])
    rows: list[dict[str, object]] = []
    for bench in a.bench.split(","):
        rows += run(bench, a.timeout, a.limit, log)
    body = table(rows, a.timeout)
    print(body)
    if not a.no_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "VNN-COMP", body)
    return 1 if any(r["wrong"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
