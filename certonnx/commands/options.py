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
