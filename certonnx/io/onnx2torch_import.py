"""Import onnx2torch without paying for torchvision at start-up.

onnx2torch imports every converter module when it is first imported, and two of them (NMS and
RoiAlign) import torchvision, whose import pulls in ``torch._dynamo``: about 1.6 s of the
3.5 s a one-shot ``certonnx verify`` spent before its first bound, for ops that no certified
model contains. While onnx2torch is imported, :func:`import_onnx2torch` puts a stand-in for
``torchvision`` and ``torchvision.ops`` in ``sys.modules`` whose functions import the real
package on first *call*; the stand-ins are removed right after, so any later
``import torchvision`` (by the user's code or ours) gets the real package. A model with an
NMS/RoiAlign node still converts; its forward pass imports torchvision then.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _Deferred(types.ModuleType):
    """A stand-in module: every attribute is a function that imports the real module on call
    (``ops`` is the stand-in of ``torchvision.ops``)."""

    def __init__(self, real: str, ops: types.ModuleType | None = None) -> None:
        super().__init__(real)
        self._real = real
        if ops is not None:
            self.ops = ops

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        real = self._real

        def deferred(*args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(real), name)(*args, **kwargs)

        deferred.__name__ = name
        return deferred


def import_onnx2torch() -> types.ModuleType:
    """``import onnx2torch``, with torchvision deferred (see the module docstring)."""
    if "onnx2torch" in sys.modules or "torchvision" in sys.modules:
        return importlib.import_module("onnx2torch")
    ops = _Deferred("torchvision.ops")
    stand_ins = {"torchvision": _Deferred("torchvision", ops), "torchvision.ops": ops}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
