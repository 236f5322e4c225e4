"""``certonnx verify MODEL PROP.vnnlib``: decide one VNN-LIB property (VNN-COMP conventions).

The result word (sat/unsat/unknown/timeout/error) is the last line on stdout; with
``--results-file`` it is also written in the VNN-COMP format (first line the word, then for sat
the counterexample ``((X_0 v) ... (Y_0 v))``). ``sat`` is only claimed for a counterexample that
onnxruntime confirms on the original file; ``unsat`` only when sound bounds close every sub-box.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from certonnx.commands.options import bound_method_option, check_outputs, json_flag_option, seed_option
from certonnx.errors import CertonnxError
from certonnx.utils import atomic_write_bytes

EXIT_CODES = {"sat": 0, "unsat": 0, "unknown": 0, "timeout": 0, "error": 1}


def format_results(result: str, cex: dict[str, np.ndarray] | None) -> str:
    """VNN-COMP results-file text."""
    lines = [result]
    if result == "sat" and cex is not None:
        xs = [f"(X_{i} {float(v) + 0.0!r})" for i, v in enumerate(np.asarray(cex["x"]).reshape(-1))]
        ys = [f"(Y_{i} {float(v) + 0.0!r})" for i, v in enumerate(np.asarray(cex["y"]).reshape(-1))]
        body = "\n".join(xs + ys)
        lines.append(f"({body})")
    return "\n".join(lines) + "\n"


def run_verify(
    model_path: str, prop_path: str, timeout: float, *, method: str = "crown", seed: int = 0
) -> tuple[str, dict[str, np.ndarray] | None, dict[str, Any]]:
    """Load, parse and verify; returns ``(result, counterexample, details)``."""
    import certonnx
    from certonnx.certify.verify import VerifyStats, verify
    from certonnx.certify.vnnlib import parse_vnnlib_file

    t0 = time.monotonic()
    prop = parse_vnnlib_file(prop_path)
    # VNN-LIB constraints speak of the file's output values: a softmax head stays in the graph
    model = certonnx.load(model_path, strip_head=False)
    left = max(timeout - (time.monotonic() - t0), 0.1)
    st = VerifyStats()
    result, cex = verify(model, prop, left, model_path, method=method, seed=seed, stats=st)
    details = {"stats": st.to_dict(), "seconds": round(time.monotonic() - t0, 3),
               "input_space": model.input_space()}
    return result, cex, details


@click.command("verify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("prop", metavar="PROP.vnnlib", type=click.Path(dir_okay=False))
@click.option("--timeout", type=click.FloatRange(min=0.0, min_open=True), default=60.0, show_default=True,
              help="Seconds for the whole run (loading included); 'timeout' when it runs out.")
@click.option("--results-file", type=click.Path(dir_okay=False), default=None,
              help="Write the VNN-COMP results file (result word, then the counterexample for sat).")
@json_flag_option("Print a JSON object (result, counterexample, stats).")
@bound_method_option(default="crown",
                     help="Bound method of the branch and bound: crown/alpha-crown split ReLUs with α/β optimisation "
                          "where possible (else input splits); crown-ibp/ibp split inputs.")
@seed_option("Seed of the attack's random starts.")
def command(model: str, prop: str, timeout: float, results_file: str | None, as_json: bool, method: str,
            seed: int) -> int:
    """Verify the VNN-LIB property PROP.vnnlib on MODEL.

    \b
    sat      a counterexample exists (confirmed with onnxruntime on MODEL)
    unsat    the property holds (proven by sound bounds on every sub-box)
    unknown  the search gave up; timeout: the time ran out
    error    the model or property could not be processed

    The result word is the last stdout line (with --json, stdout is one JSON object). Exit code 0 for sat/unsat/unknown/timeout, non-zero
    (with one 'error:' line on stderr) for errors.
    """
    check_outputs({"model": model, "property": prop}, {"--results-file": results_file})
    try:
        result, cex, details = run_verify(model, prop, timeout, method=method, seed=seed)
    except CertonnxError:
        if results_file is not None:
            atomic_write_bytes(results_file, b"error\n")
        raise
    if results_file is not None:
        atomic_write_bytes(results_file, format_results(result, cex).encode())
    if as_json:
        payload = {
            "result": result,
            "model": str(Path(model)),
            "property": str(Path(prop)),
            "timeout": timeout,
            "counterexample": None if cex is None else {"x": [float(v) for v in cex["x"]],
                                                         "y": [float(v) for v in cex["y"]]},
            **details,
        }
        click.echo(json.dumps(payload))
        return EXIT_CODES[result]
    else:
        st = details["stats"]
        click.echo(
            f"{Path(prop).name}: {result} in {details['seconds']:.1f}s "
            f"(sub-boxes bounded {st['boxes_bounded']}, split {st['boxes_split']})",
            err=True,
        )
    click.echo(result)
    sys.stdout.flush()
    return EXIT_CODES[result]
