"""What the commands share: click options declared once, callbacks that parse norms and number
lists the same way everywhere (a bad value is one line), and the glue between the library
(:mod:`certonnx.api`) and click: library argument errors become click errors, results become
JSON on stdout or in a file.

Bound-method choices come from :data:`certonnx.bounds.registry.METHODS`, so a new bound
method shows up in every command at once (imported where a choice is declared, not at the
top: ``inspect`` must work with a broken bound registry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import click

from certonnx.utils import check_outputs  # noqa: F401 - re-exported: commands import it from here

F = TypeVar("F", bound=Callable[..., Any])


# -- callbacks ------------------------------------------------------------------------------------

def norms_option(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | None:
    """``--norm linf:0.1,l2:0.5`` -> ``{'linf': 0.1, 'l2': 0.5}``."""
    if value is None:
        return None
    from certonnx.certify.norms import parse_norms

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


# -- options declared once ------------------------------------------------------------------------

def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def device_option() -> Callable[[F], F]:
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


def seed_option(help: str) -> Callable[[F], F]:  # noqa: A002
    return click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help=help)


def json_file_option(help: str = "Write the result as JSON ('-' = stdout).") -> Callable[[F], F]:  # noqa: A002
    """``--json OUT``: the result as a JSON file, or on stdout with ``-`` (see :func:`write_json`)."""
    return click.option("--json", "json_out", default=None, metavar="OUT", help=help)


def json_flag_option(help: str) -> Callable[[F], F]:  # noqa: A002
    """``--json`` as a flag: one JSON object on stdout instead of the human-readable output."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def bound_methods() -> tuple[str, ...]:
    """The bound engine's methods (``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``)."""
    from certonnx.bounds.registry import METHODS

    return tuple(METHODS)


def bound_method_option(*names: str, before: tuple[str, ...] = (), after: tuple[str, ...] = (),
                        default: str | None, help: str) -> Callable[[F], F]:  # noqa: A002
    """A choice among the bound methods of the engine, with ``before``/``after`` extra choices
    (``auto``, ``lipschitz``). ``names``: the flag and its destination, default ``--method``."""
    return click.option(*(names or ("--method",)),
                        type=click.Choice([*before, *bound_methods(), *after], case_sensitive=False),
                        default=default, show_default=default is not None, help=help)


def mean_std_options(mean_help: str) -> Callable[[F], F]:
    return _stack(
        click.option("--mean", callback=floats_option, default=None, metavar="M[,M,...]", help=mean_help),
        click.option("--std", callback=floats_option, default=None, metavar="S[,S,...]",
                     help="Per-channel std (with --mean)."),
    )


# -- finetune: flags that set a method option ------------------------------------------------------

#: ``certonnx finetune`` flags that set a method option. A method's ``Options`` field says which
#: flag sets it (``option(..., flag="--kappa-end")``); a flag the method has no field for is
#: ignored (as before the options became typed), ``--method-opt`` overrides them. The defaults
#: are the methods' (None here: "not given"). ``--relaxation`` chooses among the bound methods.
METHOD_FLAGS: dict[str, dict[str, Any]] = {
    "--kappa-end": {"type": click.FloatRange(0, 1), "help": "ibp/crown-ibp/gls: final weight of the clean loss "
                    "(κ goes 1 → this over the ramp)."},
    "--sabr-lambda": {"type": click.FloatRange(0, 1, min_open=True), "help": "sabr: size of the propagated box "
                      "relative to ε."},
    "--mtl-alpha": {"type": click.FloatRange(0, 1), "help": "mtl-ibp: weight of the adversarial loss."},
    "--pgd-steps": {"type": click.IntRange(min=1), "help": "PGD steps of the training attack (pgd, sabr, mtl-ibp, "
                    "cure)."},
    "--gls-estimator": {"type": click.Choice(["pgpe", "rgs"]), "help": "gls: zeroth-order PGPE or randomized "
                        "gradient smoothing (see docs/gls.md)."},
    "--relaxation": {"type": None, "help": "Bound relaxation the method trains on (gls; acert uses ibp or "
                     "crown-ibp)."},
}


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")


def method_flag_options() -> Callable[[F], F]:
    return _stack(*(click.option(flag, _dest(flag), default=None,
                                 type=kw["type"] or click.Choice(list(bound_methods())),
                                 help=kw["help"] + " [default: the method's, listed below]")
                    for flag, kw in METHOD_FLAGS.items()))


def pop_method_flags(params: dict[str, Any]) -> dict[str, Any]:
    """Remove the :data:`METHOD_FLAGS` values from a command's keyword arguments: ``{flag: value}``."""
    return {flag: params.pop(_dest(flag)) for flag in METHOD_FLAGS}


def method_options(method: str, flags: Mapping[str, Any], items: tuple[str, ...]) -> dict[str, Any]:
    """``{key: value}`` for ``method`` from its dedicated flags (given ones only) and the
    ``--method-opt KEY=VALUE`` pairs (strings, converted and checked by the method's Options;
    later pairs and ``--method-opt`` win)."""
    from certonnx.train.methods import method_class

    out: dict[str, Any] = {}
    for f in dataclasses.fields(method_class(method).Options):
        value = flags.get(f.metadata.get("flag", ""))
        if value is not None:
            out[f.name] = value
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{it!r}: expected KEY=VALUE", param_hint="'--method-opt'")
        out[key.strip().replace("-", "_")] = val.strip()
    return out


class MethodOptionsCommand(click.Command):
    """A command whose ``--help`` ends with every training method's options (key, default,
    help), generated from the ``Options`` dataclasses at help time (the imports it needs
    would slow every other command down)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        from certonnx.train.methods import REGISTRY

        for name, cls in REGISTRY.items():
            rows = [(f"{key}={default}", text) for key, default, text in cls.Options.describe()]
            with formatter.section(f"Method options of --method {name} (--method-opt KEY=VALUE)"):
                if rows:
                    formatter.write_dl(rows)
                else:
                    formatter.write_text("none")


# -- library <-> CLI -----------------------------------------------------------------------------

@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Report a :class:`ConfigError` of the library as click reports a bad flag (same one-line
    message as when the check lived in the command)."""
    from certonnx.errors import ConfigError

    try:
        yield
    except ConfigError as e:
        if e.param is not None:
            raise click.BadParameter(str(e), param_hint=f"'{e.param}'") from None
        raise click.UsageError(str(e)) from None


def consoles(json_out: str | None) -> tuple[Any, Any]:
    """``(console, err)``: where the result table goes (stderr when JSON goes to stdout) and stderr."""
    from rich.console import Console

    return Console(stderr=json_out == "-"), Console(stderr=True)


def stderr_echo(err: Any, **print_kw: Any) -> Callable[[str], None]:
    """A library ``echo`` that prints each message on ``err``, a leading ``note:`` in yellow."""
    def echo(msg: str) -> None:
        if msg.startswith("note: "):
            msg = "[yellow]note:[/] " + msg[len("note: "):]
        err.print(msg, **print_kw)
    return echo


def write_json(dest: str | None, obj: Any, *, stdout_indent: int | None = 2, default: Any = None) -> None:
    """``obj`` as JSON: nothing for None, on stdout for ``-``, else written atomically."""
    if dest is None:
        return
    from certonnx.utils import atomic_write_bytes

    if dest == "-":
        click.echo(json.dumps(obj, indent=stdout_indent, default=default))
    else:
        atomic_write_bytes(dest, (json.dumps(obj, indent=2, default=default) + "\n").encode())
