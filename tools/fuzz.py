"""Long offline fuzzing run: the CI fuzz tests with many more (and fresh random) examples.

    .venv/bin/python tools/fuzz.py                      # 2000 examples per fuzz test, random
    .venv/bin/python tools/fuzz.py --examples 500 --fixed   # CI's derandomized examples, more of them
    .venv/bin/python tools/fuzz.py --report fuzz.json -- -x  # extra pytest arguments after --

Runs ``tests/test_fuzz.py`` under pytest with ``CERTONNX_FUZZ_EXAMPLES`` (examples per
Hypothesis test) and ``CERTONNX_FUZZ_RANDOM=1`` (new random examples each run instead of CI's
fixed ones), then prints the number of cases tried per family from the JSON report the tests
write (``CERTONNX_FUZZ_REPORT``). A failure prints Hypothesis's minimal failing example and a
``@reproduce_failure`` line. The numbers in docs/reliability.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per Hypothesis test (default 2000)")
    ap.add_argument("--fixed", action="store_true", help="derandomized (CI's examples) instead of fresh random ones")
    ap.add_argument("--report", default=None, help="where to write the JSON counts (default: a temp file)")
    ap.add_argument("--case-limit", type=float, default=None, help="seconds per case (default: the tests' 8)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    report = Path(args.report) if args.report else Path(tempfile.mkdtemp(prefix="certonnx-fuzz-")) / "fuzz.json"
    env = {**os.environ, "CERTONNX_FUZZ_EXAMPLES": str(args.examples), "CERTONNX_FUZZ_REPORT": str(report),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not args.fixed:
        env["CERTONNX_FUZZ_RANDOM"] = "1"
    if args.case_limit is not None:
        env["CERTONNX_FUZZ_CASE_LIMIT"] = str(args.case_limit)
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_fuzz.py"), "-p", "no:xdist", "-q",
           "-p", "no:cacheprovider", *args.pytest_args]
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    minutes = (time.monotonic() - t0) / 60
    if not report.exists():
        print(f"no report written ({report}); pytest exit {rc}", file=sys.stderr)
        return rc or 1
    data = json.loads(report.read_text())
    print(f"\n{data['total_cases']} cases in {minutes:.1f} min (pytest exit {rc}); "
          f"{data['distinct_error_messages']} distinct error messages; report {report}")
    for fam, row in data["families"].items():
        print(f"  {fam:16s} {row['cases']:6d} cases  {row['nonzero_exit']:6d} errors  {row['zero_exit']:5d} ok  "
              f"max {row['max_seconds']:.2f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
