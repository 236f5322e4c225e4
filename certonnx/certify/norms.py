"""Norm names and radii as users write them: ``linf:0.1``, ``Linf:8/255``, ``L2:0.5``.

One parser for every place a ``NORM:EPS`` is read (``certify --norm``, ``finetune --norm``,
``--eps-max``, ``check --require 'linf:8/255>=0.5'``), so a form accepted by one command is
accepted by all. Kept free of torch: ``check`` parses its flags before any heavy import.

* norm names are case-insensitive and normalised: ``linf``, ``Linf``, ``LINF``, ``inf``,
  ``l_inf``, ``L∞`` -> ``linf``; ``l2``, ``L2``, ``2`` -> ``l2``; ``l1``, ``L1``, ``1`` -> ``l1``;
* ε is a number (``0.1``, ``3e-2``) or a fraction of two numbers (``8/255``, ``0.5/2``);
* :func:`eps_range_error` refuses an ε larger than the input range (``linf:8`` for pixels in
  [0, 1] is almost always ``8/255`` meant), where every input of the domain is in the ball.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["canonical_norm", "parse_eps", "parse_norms", "eps_range_error", "check_eps_range"]


def canonical_norm(name: str) -> str:
    """``linf``, ``l2`` or ``l1`` for any accepted spelling; ValueError (one line) otherwise."""
    n = name.strip().lower().replace("_", "").replace("-", "")
    if n in ("linf", "inf", "linfty", "infinity", "l∞"):
        return "linf"
    if n in ("l2", "2"):
        return "l2"
    if n in ("l1", "1"):
        return "l1"
    raise ValueError(f"unknown norm {name!r} (use linf, l2 or l1)")


def parse_eps(text: str) -> float:
    """``'0.1'`` -> 0.1, ``'8/255'`` -> 8/255: a finite number >= 0; ValueError naming the text."""
    s = str(text).strip()
    num, slash, den = s.partition("/")
    try:
        value = float(num) / float(den) if slash else float(s)
    except ValueError:
        raise ValueError(f"epsilon {s!r} is not a number or a fraction like 8/255") from None
    except ZeroDivisionError:
        raise ValueError(f"epsilon {s!r} divides by zero") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"epsilon {s!r} must be a finite number >= 0")
    return value


def parse_norms(text: str) -> dict[str, float]:
    """``'linf:0.1,l2:0.5'`` -> ``{'linf': 0.1, 'l2': 0.5}`` (also ``inf``, ``Linf``, ``L2``, and
    fractions: ``linf:8/255``). Raises ValueError with a one-line message on anything else."""
    out: dict[str, float] = {}
    if not text or not text.strip():
        raise ValueError("expected NORM:EPS[,NORM:EPS], e.g. linf:0.1,l2:0.5")
    for part in text.split(","):
        part = part.strip()
        if ":" not in part:
            raise ValueError(f"{part!r}: expected NORM:EPS, e.g. linf:0.1 or linf:8/255")
        name, val = (s.strip() for s in part.split(":", 1))
        norm = canonical_norm(name)
        try:
            eps = parse_eps(val)
        except ValueError as e:
            raise ValueError(f"{part!r}: {e}") from None
        if norm in out:
            raise ValueError(f"norm {norm} given twice")
        out[norm] = eps
    return out


def eps_range_error(norm: str, eps: float, domain: Sequence[float] = (0.0, 1.0),
                    sample_shape: Sequence[int] | None = None) -> str | None:
    """Why ``eps`` is out of range for inputs in ``domain`` (one line), or None when it is not.

    Under L∞ the ball of radius ``hi - lo`` already holds every input of the domain; under L2
    that is the domain's diameter ``(hi - lo) · sqrt(d)``, under L1 ``(hi - lo) · d`` (both
    checked only when the per-sample shape, hence ``d``, is known). A larger ε claims nothing more and almost always means the
    radius was given in other units (0..255 pixel levels for inputs in [0, 1])."""
    lo, hi = float(domain[0]), float(domain[1])
    width = hi - lo
    if not (width > 0) or not math.isfinite(width):
        return None
    hint = ""
    if (lo, hi) == (0.0, 1.0) and 1 < eps <= 255:
        hint = f"; for {eps:g} of 255 pixel levels write {norm}:{eps:g}/255"
    space = f"ε is measured in raw input units, inputs in [{lo:g}, {hi:g}]"
    if norm == "linf" and eps > width * (1 + 1e-9):
        return (f"{norm} ε {eps:g} is larger than the input range [{lo:g}, {hi:g}] (every input would be in the "
                f"ball): {space}{hint}")
    if norm in ("l2", "l1") and sample_shape is not None:
        d = math.prod(int(s) for s in sample_shape)
        diameter = width * (math.sqrt(max(d, 1)) if norm == "l2" else max(d, 1))
        if eps > diameter * (1 + 1e-9):
            return (f"{norm} ε {eps:g} is larger than the diameter {diameter:.4g} of the input domain "
                    f"[{lo:g}, {hi:g}]^{d} (every input would be in the ball): {space}{hint}")
    return None


def check_eps_range(norms: Mapping[str, float], domain: Sequence[float] = (0.0, 1.0),
                    sample_shape: Sequence[int] | None = None) -> None:
    """ValueError (one line, the first offending norm) when an ε of ``norms`` is out of range."""
    for norm, eps in norms.items():
        msg = eps_range_error(norm, float(eps), domain, sample_shape)
        if msg:
            raise ValueError(msg)
