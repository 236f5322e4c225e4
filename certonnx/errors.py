"""User-facing errors.

Every problem a user can cause (bad file, bad flag, unsupported op) is raised as a
:class:`CertonnxError` subclass. The CLI prints ``error: <message>`` on one line and exits
non-zero; the traceback is shown only with ``--debug``. Keeping this in one place is what lets
every command promise "one line, no traceback".
"""

from __future__ import annotations


class CertonnxError(Exception):
    """A problem with the user's input that certonnx can explain in one line."""

    exit_code = 2


class ConfigError(CertonnxError):
    """A bad or inconsistent argument of a pipeline function (:mod:`certonnx.api`).

    ``param`` names the CLI flag it came from (``--ramp-epochs``), or None when it is about
    several; the CLI reports it like click reports a bad flag, so a check moved from a command
    into the library keeps its message."""

    param: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class ModelLoadError(CertonnxError):
    """The ONNX file cannot be read, checked or converted."""


class UnsupportedOpError(CertonnxError):
    """An op in the graph has no bound rule (or no converter)."""

    def __init__(self, op: str, node: str | None = None, detail: str = "") -> None:
        where = f" (node {node!r})" if node else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"unsupported op {op}{where}{extra}")
        self.op = op
        self.node = node


class ParityError(CertonnxError):
    """The imported torch graph does not compute what onnxruntime computes."""


class DataError(CertonnxError):
    """A dataset file has the wrong layout, dtype, values or labels."""


class PropertyError(CertonnxError):
    """A VNN-LIB property file is malformed."""


class ExportError(CertonnxError):
    """Export to ONNX failed or the exported file does not match the torch model."""


class OutputPathError(CertonnxError):
    """An output path cannot be written (missing directory, no permission, disk full)."""
