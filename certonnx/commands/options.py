"""Click callbacks shared by the commands, so every command parses norms and number lists the
same way and reports a bad value as one line."""

from __future__ import annotations

import click


def norms_option(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | None:
    """``--norm linf:0.1,l2:0.5`` -> ``{'linf': 0.1, 'l2': 0.5}``."""
    if value is None:
        return None
    from certonnx.certify.core import parse_norms

    try:
        return parse_norms(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def floats_option(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """``0.485,0.456,0.406`` -> a list of floats (``--mean``, ``--std``)."""
    if value is None:
        return None
    try:
        vals = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406",
                                 ctx=ctx, param=param) from None
    if not vals:
        raise click.BadParameter("expected at least one number", ctx=ctx, param=param)
    return vals


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Before any work: no output path may name an input file (model, data, property) or another
    output, and every output must be writable. Inputs are never modified, whatever the flags."""
    import os
    from pathlib import Path

    from certonnx.errors import CertonnxError
    from certonnx.utils import check_writable

    def same(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        if pa.resolve() == pb.resolve():
            return True
        try:
            return pa.exists() and pb.exists() and os.path.samefile(pa, pb)  # hard links
        except OSError:
            return False

    seen: dict[str, str] = {}
    for label, p in outputs.items():
        if p is None or p == "-":
            continue
        for ilabel, ip in inputs.items():
            if ip is not None and same(p, ip):
                raise CertonnxError(f"{label} {p} would overwrite the input {ilabel}; choose another path")
        for olabel, op in seen.items():
            if same(p, op):
                raise CertonnxError(f"{label} and {olabel} name the same file {p}; choose different paths")
        seen[label] = p
        check_writable(p)
