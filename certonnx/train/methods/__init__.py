"""Registry of certified-training methods: name -> class with the :class:`Method` shape.

The built-in methods are listed below. Any other module in this package that defines a
:class:`Method` subclass with its own ``name`` (CURE, ACERT, GLS, SAC, ...) is discovered and
registered on import, so a new method is one new file; a module that fails to import is
skipped with a warning naming it (the other methods stay usable). A method's flags are its
``Options`` dataclass (:mod:`certonnx.train.methods.options`).
"""

from __future__ import annotations

from certonnx.errors import CertonnxError
from certonnx.train.methods.base import Method, StepContext
from certonnx.train.methods.crown_ibp import CrownIBP
from certonnx.train.methods.ibp import IBP
from certonnx.train.methods.mtl_ibp import MTLIBP
from certonnx.train.methods.options import MethodOptionError, MethodOptions
from certonnx.train.methods.pgd import PGD
from certonnx.train.methods.sabr import SABR
from certonnx.train.methods.standard import Standard

REGISTRY: dict[str, type[Method]] = {
    "standard": Standard,
    "pgd": PGD,
    "ibp": IBP,
    "crown-ibp": CrownIBP,
    "sabr": SABR,
    "mtl-ibp": MTLIBP,
}


def _discover() -> None:
    import importlib
    import inspect
    import pkgutil
    import warnings

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in ("base", "options") or info.name.startswith("_"):
            continue
        modname = f"{__name__}.{info.name}"
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # noqa: BLE001 - one broken method must not take the others down
            warnings.warn(f"training method module {modname} could not be imported: {e}", stacklevel=2)
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if (issubclass(cls, Method) and cls is not Method and cls.__module__ == modname
                    and cls.name not in REGISTRY and cls.name != Method.name):
                REGISTRY[cls.name] = cls


_discover()


def method_class(name: str) -> type[Method]:
    """The class of the method called ``name`` (``crown_ibp`` and ``CROWN-IBP`` work too)."""
    key = name.lower().replace("_", "-")
    if key not in REGISTRY:
        raise CertonnxError(f"unknown training method {name!r} (expected one of {', '.join(REGISTRY)})")
    return REGISTRY[key]


def get_method(name: str) -> Method:
    """An instance of the method called ``name`` (``crown_ibp`` and ``CROWN-IBP`` work too)."""
    return method_class(name)()


def options_markdown() -> str:
    """The method-options table of docs/finetune.md, generated from the ``Options`` dataclasses
    (``python -c 'from certonnx.train.methods import options_markdown as f; print(f())'``; a test
    checks that the docs contain it as generated)."""
    rows = ["| method | key | default | meaning |", "|---|---|---|---|"]
    for name, cls in REGISTRY.items():
        described = list(cls.Options.describe())
        if not described:
            rows.append(f"| `{name}` | — | — | no options |")
        for key, default, text in described:
            cell = text.replace("|", "\\|")  # (a literal | inside a markdown table cell)
            rows.append(f"| `{name}` | `{key}` | `{default}` | {cell} |")
    return "\n".join(rows)


__all__ = ["REGISTRY", "Method", "MethodOptionError", "MethodOptions", "StepContext", "get_method", "method_class",
           "options_markdown"]
