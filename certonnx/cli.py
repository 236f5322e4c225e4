"""Command-line entry point. Thin on purpose: each command lives in ``certonnx/commands/``.

Every command runs inside :func:`run_guarded`, which turns :class:`CertonnxError` (and other
expected failures) into one ``error: ...`` line and a non-zero exit, unless ``--debug``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from certonnx._version import __version__

# command name -> module under certonnx.commands exposing a click command called ``command``
COMMANDS = ["inspect", "certify", "verify", "finetune", "check"]

#: set by ``--debug`` wherever click parsed it as the flag (before or after the command name);
#: reset by every :func:`main` call
_debug = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    if value:
        _debug = True


def _debug_option() -> click.Option:
    """``--debug`` of every command, as after the group: ``certonnx certify m.onnx ... --debug``. It
    is parsed by click like any flag, so ``--split --debug`` is still the value of ``--split``."""
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show full tracebacks instead of one-line errors.")


class _Group(click.Group):
    """Loads command modules lazily, so ``certonnx --help`` stays fast and one broken
    optional dependency does not take every command down."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [c for c in COMMANDS if importlib.util.find_spec(f"certonnx.commands.{c}") is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            mod = importlib.import_module(f"certonnx.commands.{name}")
        except ModuleNotFoundError:
            return None
        cmd: click.Command = mod.command
        if not any(p.name == "debug" for p in cmd.params):
            cmd.params.append(_debug_option())
        return cmd


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certonnx")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """certonnx: certify, verify and certifiably fine-tune ONNX models.

    \b
    certonnx inspect model.onnx
    certonnx certify model.onnx --data mnist.npz --norm linf:0.1,l2:0.5
    certonnx finetune model.onnx --data mnist.npz --norm linf,l2 --method cure -o robust.onnx
    certonnx verify model.onnx prop.vnnlib

    ε is measured in the model's raw input space (pixels in [0, 1]) unless stated otherwise.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _set_debug(ctx, None, debug)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: one-line errors, non-zero exit codes, tracebacks only with --debug."""
    from certonnx.errors import CertonnxError

    global _debug
    args = list(sys.argv[1:] if argv is None else argv)
    _debug = False
    from certonnx.allocator import tune_allocator

    tune_allocator()  # reuse freed memory: bound passes on CPU run 1.3-1.9x faster (certonnx/allocator.py)
    try:
        rv = cli.main(args=args, prog_name="certonnx", standalone_mode=False)
        if isinstance(rv, int):
            return rv
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as e:
        # one line, like every other error; the usage text is one --help away
        hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
        click.echo(f"error: {e.format_message().replace(chr(10), ' ')}{hint}", err=True)
        return e.exit_code if e.exit_code else 2
    except CertonnxError as e:
        if _debug:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except MemoryError:
        if _debug:
            raise
        click.echo("error: out of memory (try a smaller --batch-size or a cheaper --method)", err=True)
        return 3
    except OSError as e:
        if _debug:
            raise
        click.echo(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        return 2
    except Exception as e:  # noqa: BLE001 - last line of defence: never a bare traceback
        if _debug:
            raise
        if _out_of_memory(e):
            click.echo("error: out of memory (try a smaller --batch-size or a cheaper --method)", err=True)
            return 3
        # torch's C++ errors carry a stack of frames: keep the first line, and one line in all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = " ".join(first.split())
        msg = msg if len(msg) <= 300 else msg[:297] + "..."
        click.echo(f"error: internal error: {type(e).__name__}: {msg} (rerun with --debug for details)", err=True)
        return 1
    return 0


def _out_of_memory(e: BaseException) -> bool:
    """torch reports a failed allocation as ``torch.OutOfMemoryError`` (CUDA) or a RuntimeError
    from its CPU allocator, not as MemoryError."""
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                         or "CUDA out of memory" in text)
    )


if __name__ == "__main__":
    sys.exit(main())
