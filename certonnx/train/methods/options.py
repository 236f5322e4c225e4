"""Typed options of the training methods.

Each method declares its options once, as a frozen dataclass registered on the class
(``Method.Options``): field type, default, a help string and, where it matters, a range. From
that one declaration come the parsing of ``--method-opt KEY=VALUE`` (strings converted by the
field's type), the errors for unknown keys and bad values, the ``certonnx finetune --help``
listing and docs/finetune.md's table, so a default is never written twice and a typo is never
silently ignored.

Values may arrive as strings (the CLI, JSON) or already typed (Python); both go through the
same conversion in ``__post_init__``, so ``IBP.Options(kappa_end="0.2")`` and
``IBP.Options(kappa_end=0.2)`` are the same object. The stored form (``to_dict``) is a plain
dict of plain values: it goes into checkpoints, which are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from certonnx.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class MethodOptionError(ConfigError):
    """An unknown ``--method-opt`` key or a value of the wrong type or range (the CLI reports it
    as one ``error: Invalid value for '--method-opt': ...`` line)."""

    param = "--method-opt"


def option(default: Any, help: str, *, flag: str | None = None, ge: float | None = None,  # noqa: A002
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text and range in ``metadata``.

    ``flag`` names a dedicated ``certonnx finetune`` flag that sets this option too (e.g.
    ``--kappa-end``); ``--method-opt`` overrides it. ``ge``/``gt``/``le``/``lt`` bound numbers.
    """
    meta = {"help": help, "flag": flag, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options (a method without options uses it as is)."""

    # resolved field types, per subclass (``from __future__ import annotations`` makes them strings)
    _hints: ClassVar[dict[type, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), self._types()[f.name]))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def _types(cls) -> dict[str, Any]:
        if cls not in MethodOptions._hints:
            MethodOptions._hints[cls] = typing.get_type_hints(cls)
        return MethodOptions._hints[cls]

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | MethodOptions | None, *, method: str,
                     ignore: frozenset[str] = frozenset()) -> MethodOptions:
        """Options from ``{key: value}`` (strings or typed values). A key this class does not have
        is an error naming ``method`` and the valid keys, unless it is in ``ignore`` (options of
        other methods in a config shared by several runs: see :meth:`Method.parse_options`)."""
        if isinstance(values, cls):
            return values
        if isinstance(values, MethodOptions):
            values = values.to_dict()
        given = {str(k).strip().replace("-", "_"): v for k, v in (values or {}).items()}
        known = set(cls.keys())
        unknown = sorted(k for k in given if k not in known and k not in ignore)
        if unknown:
            valid = ", ".join(sorted(known)) or "none, it takes no options"
            what = "options" if len(unknown) > 1 else "option"
            raise MethodOptionError(f"unknown {what} {', '.join(map(repr, unknown))} for method {method} "
                                    f"(valid keys: {valid})")
        return cls(**{k: v for k, v in given.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{key: value}`` (what checkpoints and the JSON result store)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- description (help text, docs) --------------------------------------------------------
    @classmethod
    def describe(cls) -> Iterator[tuple[str, str, str]]:
        """``(key, default, help)`` per field; help ends with the accepted values and the flag,
        e.g. ``PGD steps of the training attack [integer >= 1; also --pgd-steps]``."""
        for f in dataclasses.fields(cls):
            extra = [_expected(f, cls._types()[f.name], short=True)]
            if f.metadata.get("flag"):
                extra.append(f"also {f.metadata['flag']}")
            yield f.name, _show(f.default), f"{f.metadata.get('help', '')} [{'; '.join(extra)}]"


# -- conversion -----------------------------------------------------------------------------------

def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _range_text(f: dataclasses.Field[Any]) -> str:
    m = f.metadata
    lo = f"[{m['ge']:g}" if "ge" in m else f"({m['gt']:g}" if "gt" in m else None
    hi = f"{m['le']:g}]" if "le" in m else f"{m['lt']:g})" if "lt" in m else None
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>=' if 'ge' in m else '>'} {lo[1:]}"
    if hi:
        return f" {'<=' if 'le' in m else '<'} {hi[:-1]}"
    return ""


def _expected(f: dataclasses.Field[Any], tp: Any, short: bool = False) -> str:
    """What a value must be, in words: ``a number in (0, 1]``, ``one of ibp, crown-ibp``, ...
    (``short``: the help-table form, ``number in (0, 1]``, ``ibp | crown-ibp``)."""
    base, optional = _split_optional(tp)
    if typing.get_origin(base) is Literal:
        choices = [str(c) for c in typing.get_args(base)]
        text = " | ".join(choices) if short else "one of " + ", ".join(choices)
    elif base is bool:
        text = "true | false" if short else "a boolean (true/false, 1/0, yes/no, on/off)"
    elif base is int:
        text = ("integer" if short else "an integer") + _range_text(f)
    elif base is float:
        text = ("number" if short else "a number") + _range_text(f)
    else:
        text = "text" if short else "a string"
    return text + (" | none" if short and optional else " or none" if optional else "")


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _coerce(f: dataclasses.Field[Any], value: Any, tp: Any) -> Any:
    """``value`` converted to the field's type and checked against its range (MethodOptionError)."""
    base, optional = _split_optional(tp)

    def bad() -> MethodOptionError:
        flag = f" (also {f.metadata['flag']})" if f.metadata.get("flag") else ""
        return MethodOptionError(f"{f.name}{flag}: expected {_expected(f, tp)}, got {value!r}")

    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", ""))):
        return None
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        text = str(value).strip().lower()
        for cand in (text, text.replace("_", "-")):
            if cand in choices:
                return cand
        raise bad()
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad()
    if base is int:
        out: Any
        if isinstance(value, bool):
            raise bad()
        try:
            num = float(value) if isinstance(value, str) else value
            if isinstance(num, float) and not (math.isfinite(num) and num == int(num)):
                raise bad()
            out = int(num)
        except (TypeError, ValueError):
            raise bad() from None
    elif base is float:
        if isinstance(value, bool):
            raise bad()
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not math.isfinite(out):
            raise bad()
    else:
        return str(value)
    m = f.metadata
    if ("ge" in m and not out >= m["ge"]) or ("gt" in m and not out > m["gt"]) \
            or ("le" in m and not out <= m["le"]) or ("lt" in m and not out < m["lt"]):
        raise bad()
    return out


__all__ = ["MethodOptionError", "MethodOptions", "option"]
