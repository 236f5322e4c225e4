"""``certonnx check MODEL --require linf:0.1>=0.90``: the deployment-pipeline gate.

Exit 0 when the model meets every requirement, 1 when it does not (one line says why), 2 on
bad input (unreadable model, bad flag). The numbers come from the certificate in the model's
metadata, trusted only when its weight fingerprint matches, or, with ``--data``, from a fresh
certification of the file as it is now. Logic lives in :mod:`certonnx.certify.gate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from certonnx.commands.options import (
    bound_method_option,
    check_outputs,
    device_option,
    json_file_option,
    write_json,
)
from certonnx.errors import CertonnxError


def _requirements(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Any]:
    from certonnx.certify.gate import RequirementError, parse_requirement

    out = []
    for text in value:
        # also accept several requirements in one flag: --require "linf:0.1>=0.9,union>=0.3"
        for part in (p for p in text.split(",") if p.strip()):
            try:
                out.append(parse_requirement(part))
            except RequirementError as e:
                raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return out


@click.command("check")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--require", "requirements", multiple=True, callback=_requirements, metavar="METRIC[:EPS]>=VALUE",
              help="A requirement, repeatable (at least one): linf:0.1>=0.90, linf:8/255>=0.5, l2:0.5>=80%, "
                   "union>=0.3, clean>=0.95, pgd-linf:0.1>=0.9. ε in raw input units.")
@click.option("--data", default=None,
              help="Re-certify on this data (.npz, X.npy,Y.npy, an image/MNIST/CIFAR folder; see docs/certify.md) "
                   "instead of trusting the stored numbers (implies --recertify).")
@click.option("--recertify", is_flag=True, help="Certify the model now (needs --data); the stored certificate "
              "is still checked for tampering when present.")
@click.option("--split", default="test", show_default=True, help="Split of the data used with --data.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Re-certify on the first N samples.")
@bound_method_option(before=("auto",), default="auto", help="Bound method for --recertify.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@device_option()
@json_file_option("Write the verdict as JSON ('-' = stdout).")
@click.option("-q", "--quiet", is_flag=True, help="Only the PASS/FAIL line.")
def command(model: str, requirements: list[Any], data: str | None, recertify: bool, split: str, n: int | None,
            method: str, batch_size: int, device: str, json_out: str | None, quiet: bool) -> int:
    """Pass or fail MODEL against robustness requirements (exit 0 pass, 1 fail, 2 error).

    \b
    certonnx check robust.onnx --require 'linf:0.1>=0.90' --require 'union>=0.30'
    certonnx check robust.onnx --require 'clean>=0.95' --json verdict.json
    certonnx check robust.onnx --require 'linf:8/255>=0.5' --data test.npz --n 1000   # re-certify now

    Without --data the numbers are those of the certificate stored by `certonnx certify -o` or
    `certonnx finetune -o`; they count only if the weights still match its fingerprint, so a
    model edited after certification fails. A certificate at a larger ε satisfies a requirement
    at a smaller ε (the smaller ball is inside the larger), never the other way round.
    """
    from certonnx.certify.gate import check_certificate, check_eps_ranges, recertify_norms
    from certonnx.io.metadata import read_certificate

    if not requirements:  # an empty CI variable (--require "$REQ") must not pass a gate
        raise click.UsageError("no requirement given: add at least one --require, e.g. --require 'linf:0.1>=0.90'")
    if recertify and data is None:
        raise click.BadParameter("--recertify needs --data FILE.npz", param_hint="'--recertify'")
    recertify = recertify or data is not None
    check_outputs({"model": model, **_data_inputs(data)}, {"--json": json_out})
    if not Path(model).is_file():
        raise CertonnxError(f"model file not found: {model}" if not Path(model).exists()
                            else f"model path is not a file: {model}")

    cert = read_certificate(model)
    with _bad_require():
        check_eps_ranges(requirements, ((cert or {}).get("input_space") or {}).get("domain") or (0.0, 1.0))
    fresh: dict[str, Any] | None = None
    tampered = cert is not None and (not cert.get("weights_match") or cert.get("graph_match") is False)
    if recertify and not tampered:  # a modified file fails anyway: no need to certify it first
        fresh = _recertify(model, str(data), recertify_norms(requirements, cert), split=split, n=n,
                           method=method.lower(), batch_size=batch_size, device=device, quiet=quiet or json_out == "-")
    verdict = check_certificate(cert, requirements, fresh)

    name = Path(model).name
    if verdict.passed:
        shown = ", ".join(f"{o.requirement} ({o.actual:.4f})" for o in verdict.outcomes) or "no requirements given"
        line = f"PASS {name}: {shown}; " + ("re-certified now" if fresh is not None else "certificate weights match")
    else:
        line = f"FAIL {name}: " + "; ".join(verdict.reasons)
    report = {**verdict.to_dict(), "model": str(model), "line": line,
              "certificate": cert, "recertified": fresh}
    write_json(json_out, report, stdout_indent=None, default=str)
    if json_out != "-":
        if not quiet and verdict.outcomes:
            _table(verdict)
        click.echo(line)
    return 0 if verdict.passed else 1


def _recertify(model: str, data: str, norms: dict[str, float], *, split: str, n: int | None, method: str,
               batch_size: int, device: str, quiet: bool) -> dict[str, Any]:
    """Certify the file as it is now; the result dict has the certificate's key names."""
    import certonnx
    from certonnx.certify.core import certify_dataset
    from certonnx.certify.gate import RequirementError
    from certonnx.certify.norms import check_eps_range
    from certonnx.data import as_stored, check_against_model, load_data
    from certonnx.utils import resolve_device

    cm = certonnx.load(model)
    with _bad_require():
        try:  # (L2 needs the model's input size: checked here, once it is known)
            check_eps_range(norms, tuple(cm.domain), cm.sample_shape)
        except ValueError as e:
            raise RequirementError(str(e)) from None
    x, y, info = load_data(data, split, n, num_classes=cm.num_classes)
    stored = as_stored(x, info)
    x, _ = check_against_model(x, cm.sample_shape, info)
    res = certify_dataset(cm, x, y, norms, method, batch_size=batch_size, device=resolve_device(device),
                          progress=not quiet, onnx_path=model, ort_inputs=stored)
    res["norms"] = dict(res["epsilon"])
    res["dataset_sha256"] = info["sha256"]
    return res


def _data_inputs(data: str | None) -> dict[str, str | None]:
    from certonnx.data import data_inputs

    inputs: dict[str, str | None] = {"--data": None} if data is None else dict(data_inputs(data))
    return inputs


@contextlib.contextmanager
def _bad_require() -> Iterator[None]:
    """A requirement refused after parsing (ε out of range) is reported like a bad --require."""
    from certonnx.certify.gate import RequirementError

    try:
        yield
    except RequirementError as e:
        raise click.BadParameter(str(e), param_hint="'--require'") from None


def _table(verdict: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="certonnx check")
    for col in ("requirement", "ε", "actual", "source", "result"):
        t.add_column(col)
    for o in verdict.outcomes:
        t.add_row(o.requirement, "" if o.eps is None else f"{o.eps:g}",
                  "n/a" if o.actual is None else f"{o.actual:.4f}", o.source,
                  "[green]pass[/green]" if o.passed else f"[red]fail[/red] {o.reason}")
    Console(stderr=True).print(t)
