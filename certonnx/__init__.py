"""certonnx: ONNX in, provably robust ONNX out.

The pipelines of the CLI are functions of :mod:`certonnx.api` (``api.certify``,
``api.finetune``); ``certonnx.finetune`` is ``api.finetune``. There is no
``certonnx.certify`` function: that name is the :mod:`certonnx.certify` subpackage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from certonnx._version import __version__

if TYPE_CHECKING:
    from certonnx import api
    from certonnx.api import finetune
    from certonnx.graph.model import CertModel


def __getattr__(name: str) -> Any:
    # lazy: importing a low layer (``certonnx.bounds.registry``, ``certonnx.io``) must not pull
    # in the whole pipeline, and the CLI's start-up time is mostly imports
    if name in ("api", "finetune"):
        import importlib

        api_module = importlib.import_module("certonnx.api")
        return api_module if name == "api" else api_module.finetune
    raise AttributeError(f"module 'certonnx' has no attribute {name!r}")


def load(path: str, **kwargs: Any) -> CertModel:
    """Import an ONNX file as a trainable torch.fx graph (see :func:`certonnx.io.load.load`)."""
    from certonnx.io.load import load as _load

    return _load(path, **kwargs)


def export(model: CertModel, path: str, certificate: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write ``model`` to ONNX with its certificate (see :func:`certonnx.io.export.export`)."""
    from certonnx.io.export import export as _export

    return _export(model, path, certificate=certificate, **kwargs)


__all__ = ["__version__", "api", "export", "finetune", "load"]
