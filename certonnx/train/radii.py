"""Default radii for ``--norm linf,l2,l1`` (norms given without a radius).

The values are those of the CURE paper's experiments (Jiang, Cheung & Singh 2024), per input
shape and setting; they were first written for CURE but any training method can use them, so
they live here and the generic ``finetune`` pipeline does not import a method's module. The L2
radii are the training radii (CURE trains MNIST-small at L2 0.75 and evaluates at 0.5); L1 is
the paper's (MNIST 1.0 / 2.0, CIFAR 0.5 / 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence

from certonnx.errors import CertonnxError

# (L∞, L2, L1) radii used in the CURE paper's experiments, per input shape and setting.
_DEFAULTS: dict[tuple[int, ...], dict[str, dict[str, float]]] = {
    (1, 28, 28): {"small": {"linf": 0.1, "l2": 0.75, "l1": 1.0}, "large": {"linf": 0.3, "l2": 1.0, "l1": 2.0}},
    (3, 32, 32): {"small": {"linf": 2 / 255, "l2": 0.25, "l1": 0.5}, "large": {"linf": 8 / 255, "l2": 0.5, "l1": 1.0}},
}


def default_norms(sample_shape: Sequence[int], setting: str = "small") -> dict[str, float]:
    """The paper's radii for MNIST-shaped (1x28x28 or 784) and CIFAR-shaped (3x32x32) inputs.

    ``setting`` is ``small`` (MNIST L∞ 0.1 / L2 0.75, CIFAR 2/255 / 0.25) or ``large``
    (MNIST 0.3 / 1.0, CIFAR 8/255 / 0.5). Other shapes have no sensible default: the user
    must give radii, so this raises a :class:`CertonnxError` saying so.
    """
    shape = tuple(int(d) for d in sample_shape)
    # channel-last (Keras/TF exports) and flat layouts of the same images
    if shape in ((784,), (28, 28), (1, 784), (784, 1), (28, 28, 1)):
        shape = (1, 28, 28)
    if shape in ((3072,), (32, 32, 3)):
        shape = (3, 32, 32)
    if setting not in ("small", "large"):
        raise CertonnxError(f"unknown radius setting {setting!r} (expected small or large)")
    if shape not in _DEFAULTS:
        raise CertonnxError(f"no default radii for inputs of shape {list(shape)}: give them explicitly, "
                            "e.g. --norm linf:0.1,l2:0.5")
    return dict(_DEFAULTS[shape][setting])


def parse_norms_with_defaults(text: str, sample_shape: Sequence[int], setting: str = "small"
                              ) -> dict[str, float]:
    """``'linf,l2'`` -> the default radii for the data's shape; ``'linf:0.2,l2'`` mixes explicit
    and default radii. Raises ValueError (one line) on bad input, like ``parse_norms``."""
    from certonnx.certify.norms import canonical_norm, parse_norms

    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise ValueError("expected NORM[:EPS][,NORM[:EPS]], e.g. linf,l2 or linf:0.1,l2:0.5")
    explicit = parse_norms(",".join(p for p in parts if ":" in p)) if any(":" in p for p in parts) else {}
    out: dict[str, float] = {}
    defaults: dict[str, float] | None = None
    for p in parts:
        norm = canonical_norm(p.split(":", 1)[0])
        if norm in out:
            raise ValueError(f"norm {norm} given twice")
        if ":" in p:
            out[norm] = explicit[norm]
            continue
        if defaults is None:
            try:
                defaults = default_norms(sample_shape, setting)
            except CertonnxError as e:
                raise ValueError(str(e)) from None
        out[norm] = defaults[norm]
    return out


__all__ = ["default_norms", "parse_norms_with_defaults"]
